"""The agent renews at once when a CRL it follows lists the certificate it serves (or its intermediate), on a fake
clock with a real CA behind a fake transport (test_agent.FakeMeshca); once per served serial, never a tight loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from fakes import FakeClock
from test_agent import FakeMeshca, identity, served_secrets

from meshca.agent.csr import SignedCertificate, SignFailed
from meshca.agent.workload import WorkloadIdentity
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.ca.revocation import CrlSettings, Revocation, RevocationList, build_crls, intermediate_revocation
from meshca.mesh.resources import DEFAULT_CERT_SECRET
from meshca.xds.cache import SnapshotCache

TRUST_DOMAIN = "mesh.test"


class RefusingMeshca(FakeMeshca):
    """FakeMeshca whose CSR service refuses the identity (`meshca revoke --spiffe-id`) once `refuse` is set."""

    refuse = False

    async def sign(self, csr_pem: bytes, token: str, ttl: timedelta | None = None) -> SignedCertificate:
        if self.refuse:
            self.calls += 1
            raise SignFailed("meshca at 127.0.0.1:1: PERMISSION_DENIED: identity is revoked", retryable=False)
        return await super().sign(csr_pem, token, ttl)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock.at_real_now()


@pytest.fixture
def meshca(tmp_path: Path, clock: FakeClock) -> RefusingMeshca:
    settings = CaSettings(trust_domain=TRUST_DOMAIN, leaf_ttl_default=timedelta(minutes=10))
    return RefusingMeshca(CertificateAuthority.init(tmp_path / "ca", settings, clock))


def crls(meshca: FakeMeshca, clock: FakeClock, *entries: Revocation) -> bytes:
    """The CRLs meshca would send (one per CA certificate), listing `entries`."""
    return build_crls(meshca.ca.crl_signers(), RevocationList(entries, version=len(entries) + 1), clock(), CrlSettings())


def serial_entry(serial: str, clock: FakeClock) -> Revocation:
    return Revocation("serial", serial, "keyCompromise", clock(), clock() + timedelta(hours=1), None, int(serial, 16))


class Sleeps:
    """run's sleep: records each wait and then waits (really) until cancelled, as a long renewal wait does."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.Event().wait()


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(what)


async def running(agent: WorkloadIdentity, sleep: Callable[[float], Awaitable[None]]) -> asyncio.Task[None]:
    task = asyncio.create_task(agent.run(sleep))
    await until(lambda: agent.served is not None, "the first certificate")
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_crl_listing_the_served_serial_renews_at_once_with_a_new_key(
    tmp_path: Path, meshca: RefusingMeshca, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    cache = SnapshotCache()
    agent = identity(tmp_path, meshca, clock, cache)
    sleeps = Sleeps()
    task = await running(agent, sleeps)
    first = agent.served
    assert first is not None and meshca.calls == 1 and len(sleeps.waits) == 1 and sleeps.waits[0] > 200
    before = served_secrets(cache)[DEFAULT_CERT_SECRET]
    bundle = meshca.ca.trust_bundle_pem()
    with caplog.at_level(logging.INFO):
        agent.set_trust(bundle, crls(meshca, clock, serial_entry(first.serial_number, clock)))
        await until(lambda: meshca.calls == 2 and len(sleeps.waits) == 2, "a CSR at once")
    second = agent.served
    assert second is not None and second.serial_number != first.serial_number
    assert second.key_sha256 != first.key_sha256
    assert served_secrets(cache)[DEFAULT_CERT_SECRET] != before  # the new certificate and key are served
    assert sleeps.waits[1] > 200  # then the usual renewal wait
    lines = [r.getMessage() for r in caplog.records if "CRL" in r.getMessage()]
    assert len(lines) == 1 and first.serial_number in lines[0], lines
    # the same CRLs again, re-signed CRLs still listing only the old serial: no further CSR
    agent.set_trust(bundle, crls(meshca, clock, serial_entry(first.serial_number, clock)))
    clock.advance(60)
    agent.set_trust(bundle, crls(meshca, clock, serial_entry(first.serial_number, clock)))
    await asyncio.sleep(0.05)
    assert meshca.calls == 2
    await stop(task)


async def test_an_unrelated_crl_change_makes_no_csr(tmp_path: Path, meshca: RefusingMeshca, clock: FakeClock) -> None:
    agent = identity(tmp_path, meshca, clock, SnapshotCache())
    sleeps = Sleeps()
    task = await running(agent, sleeps)
    bundle = meshca.ca.trust_bundle_pem()
    agent.set_trust(bundle, crls(meshca, clock))
    agent.set_trust(bundle, crls(meshca, clock, serial_entry("abcdef0123", clock)))
    await asyncio.sleep(0.05)
    assert meshca.calls == 1 and len(sleeps.waits) == 1
    await stop(task)


async def test_a_revoked_intermediate_renews_the_leaves_it_signed(
    tmp_path: Path, meshca: RefusingMeshca, clock: FakeClock
) -> None:
    agent = identity(tmp_path, meshca, clock, SnapshotCache())
    task = await running(agent, Sleeps())
    old = meshca.ca.status().active_intermediate_id
    meshca.ca.rotate_intermediate(now=True)  # `meshca ca taint`: a new one active, the old one revoked later
    entry = intermediate_revocation(meshca.ca.crl_signers(), old, "cACompromise", clock())
    agent.set_trust(meshca.ca.trust_bundle_pem(), crls(meshca, clock, entry))
    await until(lambda: meshca.calls == 2, "a CSR at once")
    assert meshca.ca.status().active_intermediate_id != old
    await stop(task)


async def test_a_refused_renewal_backs_off_instead_of_looping(
    tmp_path: Path, meshca: RefusingMeshca, clock: FakeClock
) -> None:
    agent = identity(tmp_path, meshca, clock, SnapshotCache())
    sleeps = Sleeps()
    task = await running(agent, sleeps)
    served = agent.served
    assert served is not None
    meshca.refuse = True  # the identity was revoked too: its serials are on the CRLs and its CSRs refused
    bundle = meshca.ca.trust_bundle_pem()
    agent.set_trust(bundle, crls(meshca, clock, serial_entry(served.serial_number, clock)))
    await until(lambda: meshca.calls == 2 and len(sleeps.waits) == 2, "one CSR at once")
    assert sleeps.waits[1] == 1.0  # the backoff's first step (Retry(1 s, 30 s))
    for _ in range(5):  # every later change of the CRLs (re-signed, other revocations) still lists it
        clock.advance(1)
        agent.set_trust(bundle, crls(meshca, clock, serial_entry(served.serial_number, clock),
                                     serial_entry("abcdef", clock)))
    await asyncio.sleep(0.05)
    assert meshca.calls == 2 and agent.served == served  # the old one stays served until the backoff's next try
    await stop(task)
