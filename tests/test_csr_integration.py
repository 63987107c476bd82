"""Integration: the CSR service inside the real meshca app, over TLS, authenticated by a real JWT."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from meshca_harness import TRUST_DOMAIN, RunningMeshca, running_meshca

from meshca.ca import crypto
from meshca.v1 import certificate_pb2, certificate_pb2_grpc


@pytest.fixture
async def meshca(tmp_path: Path) -> AsyncIterator[RunningMeshca]:
    async with running_meshca(tmp_path) as running:
        yield running


def csr(uris: tuple[str, ...] = (), is_ca: bool = False) -> str:
    return crypto.build_csr_pem(crypto.generate_private_key_pem(), uris=uris, is_ca=is_ca).decode()


async def sign(meshca: RunningMeshca, token: str | None, csr_pem: str, ttl: int | None = None):  # type: ignore[no-untyped-def]
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with meshca.channel() as channel:
        stub = certificate_pb2_grpc.CertificateServiceStub(channel)
        request = certificate_pb2.SignRequest(csr_pem=csr_pem)
        if ttl is not None:
            request.ttl_seconds = ttl
        return await stub.Sign(request, metadata=metadata)


async def test_signed_chain_verifies_and_names_the_token_identity(meshca: RunningMeshca) -> None:
    response = await sign(meshca, meshca.token("shop", "frontend"), csr(), ttl=600)
    expected = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"
    assert response.spiffe_id == expected
    chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in response.certificate_chain]
    roots = x509.load_pem_x509_certificates(response.trust_bundle_pem.encode())
    verifier = PolicyBuilder().store(Store(roots)).time(datetime.now(timezone.utc)).build_client_verifier()
    verified = verifier.verify(chain[0], chain[1:])
    assert [str(u.value) for u in verified.subjects or []] == [expected]
    lifetime = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert 600 <= lifetime.total_seconds() <= 600 + 120  # requested TTL plus the backdating


async def test_csr_for_another_identity_is_permission_denied(meshca: RunningMeshca) -> None:
    other = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/payments"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await sign(meshca, meshca.token("shop", "frontend"), csr(uris=(other,)))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "payments" in (error.value.details() or "")


async def test_ca_csr_is_invalid_argument(meshca: RunningMeshca) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await sign(meshca, meshca.token("shop", "frontend"), csr(is_ca=True))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_no_token_is_unauthenticated(meshca: RunningMeshca) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await sign(meshca, None, csr())
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
