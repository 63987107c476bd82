"""CertificateService over a real grpc.aio server on loopback: authentication, CSR policy, issued chain."""

from __future__ import annotations

import base64
import dataclasses
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from fakes import FakeTokenAuthenticator

from meshca.ca import crypto
from meshca.ca.api import CaSettings, IssuedCertificate
from meshca.ca.csr_service import CertificateServicer, add_to_server
from meshca.ca.internal import CertificateAuthority
from meshca.identity.spiffe import SpiffeId
from meshca.v1 import certificate_pb2, certificate_pb2_grpc

TD = "example.org"
T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc)
FRONTEND = SpiffeId.for_service_account(TD, "shop", "frontend")
PAYMENTS = SpiffeId.for_service_account(TD, "shop", "payments")
STRANGER = SpiffeId.for_service_account("other.org", "shop", "frontend")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", CaSettings(TD), lambda: T0)


@pytest.fixture
async def stub(ca: CertificateAuthority) -> AsyncIterator[certificate_pb2_grpc.CertificateServiceStub]:
    server = grpc.aio.server()
    authenticator = FakeTokenAuthenticator({"frontend-token": FRONTEND, "stranger-token": STRANGER})
    add_to_server(server, CertificateServicer(authenticator, ca))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield certificate_pb2_grpc.CertificateServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def csr(**kwargs: object) -> str:
    return crypto.build_csr_pem(crypto.generate_private_key_pem(), **kwargs).decode()  # type: ignore[arg-type]


async def sign_error(stub: certificate_pb2_grpc.CertificateServiceStub, request: certificate_pb2.SignRequest, token: str | None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Sign(request, metadata=bearer(token) if token else None)
    return info.value


async def test_sign_issues_chain_for_the_callers_identity(stub: certificate_pb2_grpc.CertificateServiceStub, ca: CertificateAuthority) -> None:
    response = await stub.Sign(certificate_pb2.SignRequest(csr_pem=csr(uris=[FRONTEND.uri])), metadata=bearer("frontend-token"))

    assert response.spiffe_id == FRONTEND.uri
    assert len(response.certificate_chain) == 2
    assert response.trust_bundle_pem.encode() == ca.trust_bundle_pem()
    assert "PRIVATE KEY" not in str(response)
    leaf, intermediate = (x509.load_pem_x509_certificate(p.encode()) for p in response.certificate_chain)
    verified = (
        PolicyBuilder()
        .store(Store(x509.load_pem_x509_certificates(response.trust_bundle_pem.encode())))
        .time(T0)
        .build_client_verifier()
        .verify(leaf, [intermediate])
    )
    assert verified.subjects == [x509.UniformResourceIdentifier(FRONTEND.uri)]
    assert response.expires_at == int((T0 + timedelta(hours=1)).timestamp())
    assert response.not_before == int((T0 - timedelta(seconds=60)).timestamp())
    assert int(response.serial_number, 16) == leaf.serial_number


async def test_sign_honours_ttl_seconds(stub: certificate_pb2_grpc.CertificateServiceStub) -> None:
    response = await stub.Sign(certificate_pb2.SignRequest(csr_pem=csr(), ttl_seconds=600), metadata=bearer("frontend-token"))

    leaf = x509.load_pem_x509_certificate(response.certificate_chain[0].encode())
    assert leaf.not_valid_after_utc == T0 + timedelta(minutes=10)
    assert list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier(FRONTEND.uri)
    ]


async def test_a_request_without_ttl_gets_meshcas_leaf_ttl(ca: CertificateAuthority) -> None:
    server = grpc.aio.server()
    authenticator = FakeTokenAuthenticator({"frontend-token": FRONTEND})
    add_to_server(server, CertificateServicer(authenticator, ca, default_ttl=timedelta(minutes=20)))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = certificate_pb2_grpc.CertificateServiceStub(channel)
            default = await stub.Sign(certificate_pb2.SignRequest(csr_pem=csr()), metadata=bearer("frontend-token"))
            asked = await stub.Sign(certificate_pb2.SignRequest(csr_pem=csr(), ttl_seconds=600),
                                    metadata=bearer("frontend-token"))
    finally:
        await server.stop(None)
    assert default.expires_at == int((T0 + timedelta(minutes=20)).timestamp())  # as meshca's own leaves
    assert asked.expires_at == int((T0 + timedelta(minutes=10)).timestamp())  # a request's ttl still wins


async def test_missing_token_is_unauthenticated(stub: certificate_pb2_grpc.CertificateServiceStub) -> None:
    error = await sign_error(stub, certificate_pb2.SignRequest(csr_pem=csr()), None)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing authorization" in (error.details() or "")


async def test_invalid_token_is_unauthenticated(stub: certificate_pb2_grpc.CertificateServiceStub) -> None:
    error = await sign_error(stub, certificate_pb2.SignRequest(csr_pem=csr()), "forged")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "token signature is invalid"


async def test_csr_for_another_identity_is_permission_denied(stub: certificate_pb2_grpc.CertificateServiceStub) -> None:
    error = await sign_error(stub, certificate_pb2.SignRequest(csr_pem=csr(uris=[PAYMENTS.uri])), "frontend-token")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    details = error.details() or ""
    assert PAYMENTS.uri in details and FRONTEND.uri in details


async def test_caller_from_another_trust_domain_is_permission_denied(stub: certificate_pb2_grpc.CertificateServiceStub) -> None:
    error = await sign_error(stub, certificate_pb2.SignRequest(csr_pem=csr()), "stranger-token")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "other.org" in (error.details() or "")


async def test_ca_csr_is_invalid_argument(stub: certificate_pb2_grpc.CertificateServiceStub) -> None:
    error = await sign_error(stub, certificate_pb2.SignRequest(csr_pem=csr(is_ca=True)), "frontend-token")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "CA certificates cannot be requested" in (error.details() or "")


async def test_tampered_csr_signature_is_invalid_argument(stub: certificate_pb2_grpc.CertificateServiceStub) -> None:
    lines = csr().encode().strip().splitlines()
    der = bytearray(base64.b64decode(b"".join(lines[1:-1])))
    der[-3] ^= 0x01
    tampered = "\n".join([lines[0].decode(), base64.b64encode(bytes(der)).decode(), lines[-1].decode(), ""])

    error = await sign_error(stub, certificate_pb2.SignRequest(csr_pem=tampered), "frontend-token")

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "signature" in (error.details() or "")


async def test_dns_san_and_garbage_are_invalid_argument(stub: certificate_pb2_grpc.CertificateServiceStub) -> None:
    for pem in (csr(dns_names=["frontend.shop.svc"]), "not a csr", ""):
        error = await sign_error(stub, certificate_pb2.SignRequest(csr_pem=pem), "frontend-token")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("ttl_seconds", [0, -5, 60, 2**62])
async def test_bad_ttl_is_invalid_argument_naming_the_field(stub: certificate_pb2_grpc.CertificateServiceStub, ttl_seconds: int) -> None:
    error = await sign_error(stub, certificate_pb2.SignRequest(csr_pem=csr(), ttl_seconds=ttl_seconds), "frontend-token")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ttl_seconds" in (error.details() or "")


class SwitchableChainSigner:
    """A CsrSigner whose chain after the leaf can be replaced between calls (an intermediate rotation)."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self._ca = ca
        self.tail = b""
        self.leaf_suffix = b""

    def sign_csr(self, csr_pem: bytes, spiffe_id: SpiffeId, ttl: timedelta | None) -> IssuedCertificate:
        issued = self._ca.sign_csr(csr_pem, spiffe_id, ttl)
        leaf = issued.certificate_pem + self.leaf_suffix
        return dataclasses.replace(issued, certificate_pem=leaf, chain_pem=leaf + self.tail)

    def trust_bundle_pem(self) -> bytes:
        return self._ca.trust_bundle_pem()


@pytest.fixture
async def switchable(
    ca: CertificateAuthority,
) -> AsyncIterator[tuple[SwitchableChainSigner, certificate_pb2_grpc.CertificateServiceStub]]:
    signer = SwitchableChainSigner(ca)
    server = grpc.aio.server()
    add_to_server(server, CertificateServicer(FakeTokenAuthenticator({"frontend-token": FRONTEND}), signer))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield signer, certificate_pb2_grpc.CertificateServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


def pem_block(label: str) -> bytes:
    body = base64.b64encode(label.encode() * 8).decode()
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n".encode()


async def test_chain_follows_a_changed_intermediate(
    switchable: tuple[SwitchableChainSigner, certificate_pb2_grpc.CertificateServiceStub],
) -> None:
    signer, stub = switchable
    chains = []
    for tail in (pem_block("one"), pem_block("one"), pem_block("two") + pem_block("root-ish"), b""):
        signer.tail = tail
        response = await stub.Sign(certificate_pb2.SignRequest(csr_pem=csr()), metadata=bearer("frontend-token"))
        assert x509.load_pem_x509_certificate(response.certificate_chain[0].encode()).serial_number == int(
            response.serial_number, 16
        )
        chains.append(list(response.certificate_chain[1:]))
    assert chains == [
        [pem_block("one").decode()],
        [pem_block("one").decode()],
        [pem_block("two").decode(), pem_block("root-ish").decode()],
        [],
    ]


async def test_chain_of_an_unusual_shape_is_split_block_by_block(
    switchable: tuple[SwitchableChainSigner, certificate_pb2_grpc.CertificateServiceStub],
) -> None:
    signer, stub = switchable
    signer.leaf_suffix = b"trailing text\n" + pem_block("glued")
    signer.tail = pem_block("one").replace(b"\n", b"\r\n")
    response = await stub.Sign(certificate_pb2.SignRequest(csr_pem=csr()), metadata=bearer("frontend-token"))
    assert len(response.certificate_chain) == 3
    assert response.certificate_chain[1] == pem_block("glued").decode()
    assert response.certificate_chain[2] == pem_block("one").replace(b"\n", b"\r\n").decode()
    assert all("trailing text" not in block for block in response.certificate_chain)


async def test_issued_certificate_is_logged_with_identity_and_serial(
    stub: certificate_pb2_grpc.CertificateServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="meshca.ca.csr_service"):
        response = await stub.Sign(certificate_pb2.SignRequest(csr_pem=csr()), metadata=bearer("frontend-token"))
    messages = [r.getMessage() for r in caplog.records if r.name == "meshca.ca.csr_service"]
    assert len(messages) == 1
    assert response.serial_number in messages[0] and FRONTEND.uri in messages[0]
    assert "PRIVATE KEY" not in messages[0]
