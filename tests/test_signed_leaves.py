"""Leaves signed by the CSR service (node agents'): tracked per identity, bounded, and put on the CRLs when their
identity is revoked (meshca.ca.signed, meshca.sds.crl)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from fakes import FakeClock, FakeTokenAuthenticator

from meshca.app import MeshcaApp, crl_publishing
from meshca.ca import crypto
from meshca.ca.api import CaSettings
from meshca.ca.csr_service import CertificateServicer, add_to_server
from meshca.ca.internal import CertificateAuthority
from meshca.ca.revocation import Revocation, StateDirRevocations
from meshca.ca.signed import SignedLeaf, SignedLeaves
from meshca.identity.spiffe import SpiffeId
from meshca.v1 import certificate_pb2, certificate_pb2_grpc

TD = "mesh.test"
FRONTEND = SpiffeId.parse(f"spiffe://{TD}/ns/shop/sa/frontend")
BACKEND = SpiffeId.parse(f"spiffe://{TD}/ns/shop/sa/backend")
LOG = logging.getLogger("meshca.test")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock.at_real_now()


@pytest.fixture
def ca(tmp_path: Path, clock: FakeClock) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain=TD), clock)


@pytest.fixture
def app(ca: CertificateAuthority, clock: FakeClock) -> MeshcaApp:
    return MeshcaApp(ca, [], clock, LOG, revocations=crl_publishing(StateDirRevocations(ca.state_dir)))


@pytest.fixture
async def stub(app: MeshcaApp) -> AsyncIterator[certificate_pb2_grpc.CertificateServiceStub]:
    """meshca's CSR service wired as MeshcaApp.start wires it (a fake authenticator stands in for the JWT gate)."""
    server = grpc.aio.server()
    authenticator = FakeTokenAuthenticator({"frontend": FRONTEND, "backend": BACKEND})
    add_to_server(server, CertificateServicer(authenticator, app.ca, revoked=app.secrets.is_denied,
                                              signed=app.signed_leaves))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield certificate_pb2_grpc.CertificateServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def sign(stub: certificate_pb2_grpc.CertificateServiceStub, token: str) -> int:
    answer = await stub.Sign(
        certificate_pb2.SignRequest(csr_pem=crypto.build_csr_pem(crypto.generate_private_key_pem()).decode()),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    return int(answer.serial_number, 16)


def revoke_identity(ca: CertificateAuthority, clock: FakeClock, spiffe_id: SpiffeId) -> None:
    StateDirRevocations(ca.state_dir).update(
        lambda current: current.with_entries([Revocation("spiffe_id", spiffe_id.uri, "keyCompromise", clock())])
    )


def listed_by_active_intermediate(app: MeshcaApp, ca: CertificateAuthority) -> set[int]:
    assert app.revocations is not None
    (active,) = [i for r, i in ca.crl_signers() if r.id == ca.active_intermediate_id]
    for block in crypto.split_pem_crls(app.revocations.crls_pem):
        if crypto.crl_issued_by(block, active.certificate_pem):
            return {r.serial_number for r in crypto.parse_crl_pem(block).revoked}
    raise AssertionError("no CRL of the active intermediate")


async def test_a_csr_signed_leaf_of_a_revoked_identity_is_listed_on_the_crls(
    app: MeshcaApp, ca: CertificateAuthority, clock: FakeClock, stub: certificate_pb2_grpc.CertificateServiceStub
) -> None:
    assert app.revocations is not None
    first, second = await sign(stub, "frontend"), await sign(stub, "frontend")  # a renewal: both unexpired
    other = await sign(stub, "backend")
    revoke_identity(ca, clock, FRONTEND)
    assert app.revocations.check()
    # on the CRL of the intermediate that signed them (the issuer the CSR service recorded), the other identity not
    assert listed_by_active_intermediate(app, ca) == {first, second}
    assert other not in listed_by_active_intermediate(app, ca)
    on_disk = StateDirRevocations(ca.state_dir).read()  # written back: every replica's CRLs list them
    assert {e.serial for e in on_disk.entries if e.kind == "serial"} == {first, second}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await sign(stub, "frontend")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_leaf_signed_while_its_identity_is_revoked_is_not_handed_out(
    app: MeshcaApp, ca: CertificateAuthority, clock: FakeClock, stub: certificate_pb2_grpc.CertificateServiceStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert app.revocations is not None
    revocations = app.revocations
    original = ca.sign_csr

    def sign_then_revoke(*args: object, **kwargs: object) -> object:
        issued = original(*args, **kwargs)  # type: ignore[arg-type]
        revoke_identity(ca, clock, FRONTEND)  # adopted between the first check and the answer
        revocations.check()
        return issued

    monkeypatch.setattr(ca, "sign_csr", sign_then_revoke)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await sign(stub, "frontend")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_expired_entries_leave(clock: FakeClock) -> None:
    leaves = SignedLeaves(clock, LOG)
    leaves.record(SignedLeaf(clock() + timedelta(minutes=5), 1, FRONTEND))
    leaves.record(SignedLeaf(clock() + timedelta(minutes=60), 2, FRONTEND))
    leaves.record(SignedLeaf(clock() - timedelta(seconds=1), 3, FRONTEND))  # already expired: not kept
    assert [leaf.serial for leaf in leaves.serials_of([FRONTEND])] == [1, 2]
    clock.advance(5 * 60)
    assert [leaf.serial for leaf in leaves.serials_of([FRONTEND])] == [2]
    assert len(leaves) == 1
    clock.advance(3600)
    leaves.record(SignedLeaf(clock() + timedelta(minutes=5), 4, BACKEND))  # prunes every identity
    assert len(leaves) == 1 and leaves.serials_of([FRONTEND]) == []


def test_the_bound_per_identity_drops_its_soonest_expiring(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    leaves = SignedLeaves(clock, LOG, per_identity=3, total=100)
    leaves.record(SignedLeaf(clock() + timedelta(minutes=30), 100, BACKEND))
    for serial in range(1, 11):  # a flood of CSRs by one identity
        leaves.record(SignedLeaf(clock() + timedelta(minutes=serial), serial, FRONTEND))
    assert [leaf.serial for leaf in leaves.serials_of([FRONTEND])] == [8, 9, 10]
    assert [leaf.serial for leaf in leaves.serials_of([BACKEND])] == [100]
    untracked = leaves.untracked(FRONTEND)
    assert untracked is not None and untracked.count == 7 and untracked.until == clock() + timedelta(minutes=7)
    assert len([r for r in caplog.records if "no longer tracked" in r.message]) == 1  # one line, not seven
    clock.advance(7 * 60)
    assert leaves.untracked(FRONTEND) is None  # the dropped ones have expired anyway


def test_the_total_bound_drops_from_the_identity_holding_most(clock: FakeClock) -> None:
    leaves = SignedLeaves(clock, LOG, per_identity=100, total=4)
    leaves.record(SignedLeaf(clock() + timedelta(minutes=1), 100, BACKEND))
    for serial in range(1, 6):
        leaves.record(SignedLeaf(clock() + timedelta(minutes=10 + serial), serial, FRONTEND))
    assert len(leaves) == 4
    assert [leaf.serial for leaf in leaves.serials_of([BACKEND])] == [100]  # the flooder lost its own
    assert [leaf.serial for leaf in leaves.serials_of([FRONTEND])] == [3, 4, 5]
