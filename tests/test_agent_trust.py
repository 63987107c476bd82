"""The agent follows meshca's trust material (WatchTrust): a real MeshcaApp's gRPC server and the agent's client, no
Envoy. Revocations and root rotations reach every workload's ROOTCA without a CSR and without touching `default`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from fakes import FakeClock

from meshca.agent.csr import SignedCertificate
from meshca.agent.settings import WorkloadSettings
from meshca.agent.trust import (
    TrustAnchor,
    TrustMaterial,
    UnusableMaterial,
    follow_trust,
    parse_material,
)
from meshca.agent.workload import Retry, WorkloadIdentity
from meshca.app import MeshcaApp, crl_publishing
from meshca.ca import crypto
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.ca.revocation import Revocation, StateDirRevocations
from meshca.ca.trust_service import material_version
from meshca.identity.spiffe import SpiffeId
from meshca.mesh.resources import DEFAULT_CERT_SECRET, ROOT_CA_SECRET, validation_context_secret
from meshca.sds.rotation import RenewalPolicy
from meshca.v1 import trust_pb2
from meshca.xds.cache import SnapshotCache
from meshca.xds.snapshot import ResourceType

TD = "mesh.test"
FRONTEND = SpiffeId.parse(f"spiffe://{TD}/ns/shop/sa/frontend")
LOG = logging.getLogger("meshca.test.trust")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock.at_real_now()


@pytest.fixture
def ca(tmp_path: Path, clock: FakeClock) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain=TD), clock)


class Received:
    """What follow_trust handed the agent, with a way to wait for the next one."""

    def __init__(self) -> None:
        self.materials: list[TrustMaterial] = []
        self._event = asyncio.Event()

    def __call__(self, material: TrustMaterial) -> None:
        self.materials.append(material)
        self._event.set()

    async def wait_for(self, check: Callable[[TrustMaterial], bool], timeout: float = 5.0) -> TrustMaterial:
        deadline = time.monotonic() + timeout
        while True:
            if self.materials and check(self.materials[-1]):
                return self.materials[-1]
            self._event.clear()
            left = deadline - time.monotonic()
            assert left > 0, f"no such material within {timeout} s (got {len(self.materials)})"
            try:
                await asyncio.wait_for(self._event.wait(), left)
            except asyncio.TimeoutError:
                pass


async def no_sleep(seconds: float) -> None:
    await asyncio.sleep(0.01)


def insecure(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target)


async def serving(app: MeshcaApp) -> str:
    port = await app.start("127.0.0.1", 0, None)  # plaintext: the TLS channel is the e2e tests' part
    return f"127.0.0.1:{port}"


@pytest.fixture
async def follower() -> AsyncIterator[Callable[..., tuple[Received, asyncio.Task[None]]]]:
    tasks: list[asyncio.Task[None]] = []

    def start(targets: list[str], **options: object) -> tuple[Received, asyncio.Task[None]]:
        received = Received()
        task = asyncio.create_task(follow_trust(targets, insecure, received, LOG, sleep=no_sleep, **options))  # type: ignore[arg-type]
        tasks.append(task)
        return received, task

    yield start
    for task in tasks:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


def rootca_payload(app: MeshcaApp) -> bytes:
    return next(s for s in app.secrets.bundle_secrets() if s.name == ROOT_CA_SECRET).payload


async def test_the_agent_gets_the_rootca_material_at_once_and_each_revocation_and_root_rotation(
    ca: CertificateAuthority, clock: FakeClock, follower: Callable[..., tuple[Received, asyncio.Task[None]]]
) -> None:
    app = MeshcaApp(ca, [], clock, LOG, revocations=crl_publishing(StateDirRevocations(ca.state_dir)))
    target = await serving(app)
    try:
        received, _ = follower([target])
        first = await received.wait_for(lambda m: True)
        # the same bundle and CRLs as meshca's own ROOTCA secret: agent-mode and normal nodes validate alike
        assert validation_context_secret(ROOT_CA_SECRET, first.bundle_pem, first.crls_pem).payload == rootca_payload(app)
        assert first.crls == 2 and first.roots == 1  # the root's and the intermediate's CRL

        leaf = ca.issue_workload(FRONTEND, ttl=timedelta(hours=1))
        StateDirRevocations(ca.state_dir).update(lambda current: current.with_entries(
            [Revocation("serial", f"{leaf.serial_number:x}", "keyCompromise", clock(), leaf.not_after,
                        ca.active_intermediate_id, leaf.serial_number)]
        ))
        await asyncio.to_thread(app._check_ca)  # what the CA-check job runs every second
        revoked = await received.wait_for(lambda m: m.version != first.version)
        serials = {r.serial_number for b in crypto.split_pem_crls(revoked.crls_pem) for r in crypto.parse_crl_pem(b).revoked}
        assert serials == {leaf.serial_number}
        assert validation_context_secret(ROOT_CA_SECRET, revoked.bundle_pem, revoked.crls_pem).payload == rootca_payload(app)

        ca.rotate_root()  # a prepared root: in the bundle at once, its CAs get CRLs
        await asyncio.to_thread(app._check_ca)
        rotated = await received.wait_for(lambda m: m.roots == 2)
        assert rotated.crls == 4
        assert validation_context_secret(ROOT_CA_SECRET, rotated.bundle_pem, rotated.crls_pem).payload == rootca_payload(app)

        count = len(received.materials)
        await asyncio.to_thread(app._check_ca)  # nothing changed: nothing sent
        await asyncio.sleep(0.3)
        assert len(received.materials) == count
    finally:
        started = time.monotonic()
        await app.stop(5)
        assert time.monotonic() - started < 2, "an open watch must not hold meshca's stop for its grace"


async def test_the_next_replica_is_followed_when_a_stream_breaks(
    tmp_path: Path, ca: CertificateAuthority, clock: FakeClock,
    follower: Callable[..., tuple[Received, asyncio.Task[None]]],
) -> None:
    first = MeshcaApp(ca, [], clock, LOG, revocations=crl_publishing(StateDirRevocations(ca.state_dir)))
    other_ca = CertificateAuthority.load(ca.state_dir, clock)
    second = MeshcaApp(other_ca, [], clock, LOG, revocations=crl_publishing(StateDirRevocations(ca.state_dir)))
    targets = [await serving(first), await serving(second)]
    try:
        received, _ = follower(targets)
        await received.wait_for(lambda m: m.source == targets[0])
        await first.stop(0)
        moved = await received.wait_for(lambda m: m.source == targets[1])  # its own CRLs: a new version
        assert moved.roots == 1
    finally:
        await first.stop(0)
        await second.stop(0)


def material(bundle: bytes, crls: list[bytes], version: str | None = None) -> trust_pb2.TrustMaterial:
    bundle_text, crl_texts = bundle.decode(), [c.decode() for c in crls]
    return trust_pb2.TrustMaterial(
        version=material_version(bundle_text, crl_texts) if version is None else version,
        bundle_pem=bundle_text, crl_pem=crl_texts,
    )


def test_material_is_checked_before_envoy_gets_it(ca: CertificateAuthority, clock: FakeClock) -> None:
    app = MeshcaApp(ca, [], clock, LOG, revocations=crl_publishing(StateDirRevocations(ca.state_dir)))
    bundle, crls_pem = app.secrets.trust_material()
    crls = crypto.split_pem_crls(crls_pem)
    parsed = parse_material(material(bundle, crls))
    assert (parsed.bundle_pem, parsed.crls_pem) == (bundle, crls_pem)
    leaf = ca.issue_workload(FRONTEND, ttl=timedelta(hours=1)).chain_pem
    bad = [
        (material(bundle, crls, version="0" * 16), "does not match its content"),
        (material(b"", crls), "holds no PEM certificate"),
        (material(crypto.split_pem_certificates(leaf)[0], crls), "not a CA certificate"),
        (material(bundle, [b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"]), "crl_pem[0]"),
        (material(bundle, [b"junk"]), "crl_pem[0] is not one PEM CRL"),
    ]
    for message, why in bad:
        with pytest.raises(UnusableMaterial, match=why.replace("[", r"\[").replace("]", r"\]")):
            parse_material(message)


def test_the_anchor_trusts_the_ca_file_and_the_bundle_followed(tmp_path: Path, ca: CertificateAuthority) -> None:
    day_one = ca.trust_bundle_pem()
    (tmp_path / "root.pem").write_bytes(day_one)
    anchor = TrustAnchor(tmp_path / "root.pem")
    assert anchor.roots() == day_one
    ca.rotate_root()
    anchor.adopt(ca.trust_bundle_pem())  # the new root first, then the old one (already in the file): once each
    assert crypto.split_pem_certificates(anchor.roots()) == crypto.split_pem_certificates(ca.trust_bundle_pem())
    (tmp_path / "root.pem").unlink()  # the file gone: what was followed still verifies meshca
    assert anchor.roots() == ca.trust_bundle_pem()
    with pytest.raises(OSError):
        TrustAnchor(tmp_path / "root.pem").roots()


class Signs:
    """Stands in for meshca's CSR service (a real CA signs)."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.calls = 0

    async def sign(self, csr_pem: bytes, token: str, ttl: timedelta | None = None) -> SignedCertificate:
        self.calls += 1
        issued = self.ca.sign_csr(csr_pem, FRONTEND, ttl)
        return SignedCertificate(issued.chain_pem, self.ca.trust_bundle_pem(), FRONTEND.uri,
                                 f"{issued.serial_number:x}", issued.not_before, issued.not_after)


async def test_rootca_follows_the_material_and_default_is_left_alone(
    tmp_path: Path, ca: CertificateAuthority, clock: FakeClock
) -> None:
    token = tmp_path / "frontend.jwt"
    token.write_text("t")
    cache, signer = SnapshotCache(), Signs(ca)
    identity = WorkloadIdentity(WorkloadSettings("frontend", token, tmp_path / "f.sock"), signer, cache, clock, LOG,
                                RenewalPolicy(), Retry())
    app = MeshcaApp(ca, [], clock, LOG, revocations=crl_publishing(StateDirRevocations(ca.state_dir)))
    await identity.attempt()

    def secrets() -> dict[str, object]:
        snapshot = cache.get("frontend")
        assert snapshot is not None
        return dict(snapshot.of_type(ResourceType.SECRET).resources)

    before = secrets()
    assert b"X509 CRL" not in before[ROOT_CA_SECRET].payload  # type: ignore[attr-defined]
    bundle, crls = app.secrets.trust_material()
    identity.set_trust(bundle, crls)
    after = secrets()
    assert after[DEFAULT_CERT_SECRET] is before[DEFAULT_CERT_SECRET]  # the same secret, the same version
    assert after[ROOT_CA_SECRET].payload == rootca_payload(app)  # type: ignore[attr-defined]
    assert signer.calls == 1  # no CSR for it
    identity.set_trust(bundle, crls)  # unchanged: nothing published
    assert secrets()[ROOT_CA_SECRET] is after[ROOT_CA_SECRET]
    await identity.attempt()  # a renewal keeps serving the followed material (the CRLs too)
    renewed = secrets()
    assert renewed[DEFAULT_CERT_SECRET] is not before[DEFAULT_CERT_SECRET]
    assert renewed[ROOT_CA_SECRET].payload == rootca_payload(app)  # type: ignore[attr-defined]
