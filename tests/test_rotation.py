"""Leaf rotation on a fake clock: renewal time with jitter bounds, hard zone, scheduling, retries, herd control."""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from fakes import T0, FakeClock, FakeScheduler

from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.identity.spiffe import SpiffeId
from meshca.sds.rotation import (
    LeafRotator,
    RenewalPolicy,
    hard_zone_start,
    renewal_time,
    should_renew,
    spread_schedule,
)
from meshca.sds.workloads import MeshPublisher, WorkloadSecrets
from meshca.xds.cache import SnapshotCache

HOUR = timedelta(hours=1)
POLICY = RenewalPolicy()


def test_renewal_at_half_life_with_jitter_bounds() -> None:
    not_after = T0 + HOUR
    assert renewal_time(T0, not_after, POLICY, 0.0) == T0 + HOUR / 2
    assert renewal_time(T0, not_after, POLICY, -1.0) == T0 + HOUR * 0.4
    assert renewal_time(T0, not_after, POLICY, 1.0) == T0 + HOUR * 0.6
    rng = random.Random(7)
    times = [renewal_time(T0, not_after, POLICY, rng.uniform(-1, 1)) for _ in range(1000)]
    assert min(times) >= T0 + HOUR * 0.4 and max(times) <= T0 + HOUR * 0.6
    assert max(times) - min(times) > HOUR * 0.15  # actually spread, not all equal


def test_hard_zone_caps_the_schedule() -> None:
    late = RenewalPolicy(fraction=0.8, jitter=0.15, hard_zone=0.1)
    assert renewal_time(T0, T0 + HOUR, late, 1.0) == hard_zone_start(T0, T0 + HOUR, late) == T0 + HOUR * 0.9
    assert should_renew(T0 + HOUR * 0.95, T0, T0 + HOUR, POLICY, 1.0)
    assert not should_renew(T0 + HOUR * 0.39, T0, T0 + HOUR, POLICY, -1.0)


@pytest.mark.parametrize(
    "kwargs", [{"fraction": 0}, {"fraction": 1.2}, {"jitter": 0.6}, {"hard_zone": 0}, {"hard_zone": 0.6}]
)
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RenewalPolicy(**kwargs)


def test_bad_jitter_sample_is_refused() -> None:
    with pytest.raises(ValueError):
        renewal_time(T0, T0 + HOUR, POLICY, 1.5)


def test_spread_schedule_respects_window_rate_and_deadline() -> None:
    rng = random.Random(1)
    times = spread_schedule(100, T0, timedelta(minutes=5), 10.0, T0 + HOUR, rng)
    assert len(times) == 100 and times == sorted(times)
    assert T0 <= times[0] and times[-1] <= T0 + timedelta(minutes=5)
    # the rate limit stretches the schedule: 1000 leaves at 1/s need 1000 s
    slow = spread_schedule(1000, T0, timedelta(minutes=1), 1.0, T0 + HOUR, rng)
    assert slow[-1] - T0 > timedelta(seconds=900)
    # but everything still lands before the deadline when the rate would be too slow
    urgent = spread_schedule(1000, T0, timedelta(minutes=1), 1.0, T0 + timedelta(minutes=2), rng)
    assert urgent[-1] < T0 + timedelta(minutes=2)
    assert spread_schedule(0, T0, HOUR, 1.0, T0 + HOUR, rng) == []


class Rig:
    def __init__(self, tmp_path: Path, ttl: timedelta = HOUR) -> None:
        self.clock = FakeClock(T0)
        self.ca = CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain="mesh.test"), self.clock)
        log = logging.getLogger("test.rotation")
        self.secrets = WorkloadSecrets(self.ca, self.clock, log, leaf_ttl=ttl)
        self.cache = SnapshotCache()
        self.publisher = MeshPublisher(self.cache, self.secrets, log)
        self.scheduler = FakeScheduler(self.clock)
        self.rotator = LeafRotator(
            self.secrets, self.publisher, self.scheduler, POLICY, self.clock, log, random.Random(3)
        )
        self.secrets.set_issue_listener(self.rotator.on_issued)

    def serial(self, spiffe_id: SpiffeId) -> int:
        from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret

        from meshca.xds.snapshot import ResourceType

        snapshot = self.cache.get(spiffe_id.uri)
        assert snapshot is not None
        secret = Secret.parse(snapshot.of_type(ResourceType.SECRET).resources["default"].payload)
        chain = secret.tls_certificate.certificate_chain.inline_bytes
        return x509.load_pem_x509_certificates(chain)[0].serial_number


def test_rotation_renews_republishes_and_reschedules(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    alice = SpiffeId.for_service_account("mesh.test", "shop", "alice")
    rig.publisher.ensure_identity(alice)
    first = rig.serial(alice)
    (when, _), = rig.scheduler.jobs.values()
    lifetime = rig.secrets.certificates()[0].not_after - rig.secrets.certificates()[0].not_before
    assert T0 - timedelta(minutes=2) + lifetime * 0.4 <= when <= T0 + lifetime * 0.6
    rig.scheduler.advance_to(when - timedelta(seconds=1))
    assert rig.serial(alice) == first  # not before its time
    rig.scheduler.advance_to(when)
    second = rig.serial(alice)
    assert second != first
    assert rig.rotator.counters().leaf_rotations == 1
    # and again, two more times over the next hours: it keeps rotating by itself
    rig.scheduler.advance_to(T0 + 3 * HOUR)
    assert rig.rotator.counters().leaf_rotations >= 3
    assert rig.secrets.certificates()[0].not_after > T0 + 3 * HOUR


def test_failed_renewal_keeps_the_current_certificate_and_retries(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    bob = SpiffeId.for_service_account("mesh.test", "shop", "bob")
    rig.publisher.ensure_identity(bob)
    first = rig.serial(bob)
    real_issue = rig.ca.issue_workload
    failures = {"left": 3}

    def flaky(spiffe_id: SpiffeId, ttl: timedelta | None = None):  # type: ignore[no-untyped-def]
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("CA unavailable")
        return real_issue(spiffe_id, ttl)

    rig.ca.issue_workload = flaky  # type: ignore[method-assign]
    (when, _), = rig.scheduler.jobs.values()
    rig.scheduler.advance_to(when)
    assert rig.serial(bob) == first  # still served
    assert rig.rotator.counters().leaf_rotations_failed == 1
    rig.scheduler.advance_to(when + timedelta(seconds=10))  # retries after 1 s, 2 s, 4 s
    assert rig.rotator.counters().leaf_rotations_failed == 3
    assert rig.serial(bob) != first
    assert rig.rotator.counters().leaf_rotations == 1


def test_reissue_all_after_a_ca_change_is_spread_out(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    identities = [SpiffeId.for_service_account("mesh.test", "ns", f"sa{i}") for i in range(50)]
    for spiffe_id in identities:
        rig.publisher.ensure_identity(spiffe_id)
    before = {s: rig.serial(s) for s in identities}
    times = rig.rotator.reissue_all(timedelta(minutes=2), max_rate=5.0, deadline=T0 + HOUR)
    assert len(times) == 50 and times[-1] - times[0] > timedelta(seconds=8)  # 50 at <= 5/s
    rig.scheduler.advance_to(T0 + timedelta(seconds=5))
    changed = sum(rig.serial(s) != before[s] for s in identities)
    assert 0 < changed < 50  # a herd is not issued at once
    rig.scheduler.advance_to(T0 + timedelta(minutes=3))
    assert all(rig.serial(s) != before[s] for s in identities)


def test_ca_watcher_pushes_new_bundle_and_reissues_after_rotation_by_another_process(tmp_path: Path) -> None:
    from meshca.sds.rotation import CaWatcher, RotationSettings

    rig = Rig(tmp_path)
    identities = [SpiffeId.for_service_account("mesh.test", "ns", f"sa{i}") for i in range(5)]
    for spiffe_id in identities:
        rig.publisher.ensure_identity(spiffe_id)
    before = {s: rig.serial(s) for s in identities}
    settings = RotationSettings(reissue_window=timedelta(seconds=10), reissue_rate=100)
    watcher = CaWatcher(rig.ca, rig.publisher, rig.rotator, settings, rig.clock, logging.getLogger("test"))
    watcher.check()
    assert watcher.ca_rotations() == 0

    # `meshca ca rotate --root --now` in another process: a second CA object on the same state dir
    other = CertificateAuthority.load(tmp_path / "ca", rig.clock)
    old_bundle = x509.load_pem_x509_certificates(rig.ca.trust_bundle_pem())
    other.rotate_root(now=True)
    new_root, = (r for r in x509.load_pem_x509_certificates(other.trust_bundle_pem()) if r not in old_bundle)
    old_intermediate = rig.ca.active_intermediate_id
    watcher.check()
    assert rig.ca.active_intermediate_id != old_intermediate
    assert watcher.ca_rotations() == 1
    # the new bundle (old and new root) reached every identity's snapshot at once
    from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret

    from meshca.xds.snapshot import ResourceType

    for spiffe_id in identities:
        snapshot = rig.cache.get(spiffe_id.uri)
        assert snapshot is not None
        rootca = Secret.parse(snapshot.of_type(ResourceType.SECRET).resources["ROOTCA"].payload)
        assert len(x509.load_pem_x509_certificates(rootca.validation_context.trusted_ca.inline_bytes)) == 2
    # leaves are re-issued from the new intermediate within the window, not all at once
    rig.scheduler.advance_to(T0 + timedelta(seconds=11))
    assert all(rig.serial(s) != before[s] for s in identities)
    old_root, = (r for r in x509.load_pem_x509_certificates(other.trust_bundle_pem()) if r.serial_number != new_root.serial_number)
    snapshot = rig.cache.get(identities[0].uri)
    assert snapshot is not None
    default = Secret.parse(snapshot.of_type(ResourceType.SECRET).resources["default"].payload)
    chain = x509.load_pem_x509_certificates(default.tls_certificate.certificate_chain.inline_bytes)
    chain[1].verify_directly_issued_by(new_root)  # the intermediate now chains to the new (active) root
    with pytest.raises(Exception):
        chain[1].verify_directly_issued_by(old_root)


def test_ca_watcher_survives_a_failing_transition(tmp_path: Path) -> None:
    from meshca.sds.rotation import CaWatcher, RotationSettings

    rig = Rig(tmp_path)

    class BrokenCa:
        active_intermediate_id = "x"

        def trust_bundle_pem(self) -> bytes:
            return b"bundle"

        def reload_if_changed(self) -> bool:
            raise OSError("disk full")

        def tick(self, now: datetime | None = None) -> list[object]:
            return []

    watcher = CaWatcher(BrokenCa(), rig.publisher, rig.rotator, RotationSettings(), rig.clock, logging.getLogger("t"))
    watcher.check()
    assert watcher.failures() == 1


class BackdatingIssuer:
    """Stands in for Vault's sign/<role>: notBefore backdated by 60 s (`not_before_duration` from
    `meshca vault setup`) however short the leaf; the internal CA backdates by at most a quarter."""

    def __init__(self, ca: CertificateAuthority, clock: FakeClock) -> None:
        self.ca = ca
        self.clock = clock
        self.trust_domain = ca.trust_domain

    def issue_workload(self, spiffe_id: SpiffeId, ttl: timedelta | None = None):  # type: ignore[no-untyped-def]
        from dataclasses import replace

        leaf = self.ca.issue_workload(spiffe_id, ttl)
        return replace(leaf, not_before=self.clock() - timedelta(seconds=60))

    def trust_bundle_pem(self) -> bytes:
        return self.ca.trust_bundle_pem()


def test_short_backdated_leaves_renew_from_their_issue_time_and_keep_renewing(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    ca = CertificateAuthority.init(
        tmp_path / "ca", CaSettings(trust_domain="mesh.test", leaf_ttl_min=timedelta(seconds=10)), clock
    )
    log = logging.getLogger("test.rotation")
    secrets = WorkloadSecrets(BackdatingIssuer(ca, clock), clock, log, leaf_ttl=timedelta(seconds=20))
    publisher = MeshPublisher(SnapshotCache(), secrets, log)
    scheduler = FakeScheduler(clock)
    rotator = LeafRotator(secrets, publisher, scheduler, POLICY, clock, log, random.Random(3))
    secrets.set_issue_listener(rotator.on_issued)
    carol = SpiffeId.for_service_account("mesh.test", "shop", "carol")
    publisher.ensure_identity(carol)
    (when, _), = scheduler.jobs.values()
    # half of the 20 s from issuance ± 10%, not half of notBefore..notAfter (80 s, 20 s in the past)
    assert T0 + timedelta(seconds=8) <= when <= T0 + timedelta(seconds=12)
    # a stream reopening in the first 90% of the real lifetime gets the held certificate back
    clock.now = T0 + timedelta(seconds=15)
    assert secrets.held_secret(carol) is not None
    clock.now = T0
    renewed_at = []
    for _ in range(10):
        (when, _), = scheduler.jobs.values()
        assert when >= clock.now  # never scheduled into the past
        scheduler.advance_to(when)
        renewed_at.append(clock.now)
    assert rotator.counters().leaf_rotations == 10
    assert renewed_at[-1] - T0 < timedelta(seconds=10 * 12 + 1)
    assert secrets.certificates()[0].not_after > clock.now


def test_a_renewal_already_due_is_scheduled_now_not_in_the_past(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    dave = SpiffeId.for_service_account("mesh.test", "shop", "dave")
    rig.publisher.ensure_identity(dave)
    leaf = rig.secrets.certificates()[0]
    rig.clock.now = leaf.not_after - timedelta(seconds=1)  # e.g. the process was suspended
    assert rig.rotator.on_issued(leaf) == rig.clock.now


def test_apscheduler_jobs_run_a_job_that_reschedules_itself_while_it_runs() -> None:
    import threading
    import time

    from meshca.sds.rotation import ApschedulerJobs

    jobs = ApschedulerJobs(logging.getLogger("test.jobs"))
    runs: list[float] = []
    done = threading.Event()

    def renew() -> None:
        runs.append(time.monotonic())
        if len(runs) < 3:
            # what a renewal does through on_issued: the same id, due now (or already past)
            jobs.schedule("renew:x", datetime.now(UTC) - timedelta(seconds=1), renew)
            time.sleep(0.2)  # then it republishes: still running when the scheduler looks again
        else:
            done.set()

    jobs.start()
    try:
        jobs.schedule("renew:x", datetime.now(UTC), renew)
        assert done.wait(5), f"the job ran {len(runs)} time(s); a re-added run was dropped"
        assert jobs.job_ids() == []
    finally:
        jobs.shutdown()
