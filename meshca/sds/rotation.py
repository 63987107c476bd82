"""Leaf rotation: when to renew (a pure function), and the scheduler loop that renews and republishes."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from meshca.audit import CaTransitions
from meshca.backoff import backoff_delay
from meshca.clock import Clock, format_duration
from meshca.files import describe_os_error
from meshca.identity.spiffe import SpiffeId


@dataclass(frozen=True)
class RenewalPolicy:
    """Renew at `fraction` of a certificate's lifetime ± `jitter` (of lifetime), and at once in the hard zone."""

    fraction: float = 0.5
    jitter: float = 0.1
    hard_zone: float = 0.1  # the last tenth of the lifetime: renew now, whatever the schedule said

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError(f"renewal fraction {self.fraction} must be between 0 and 1")
        if not 0 <= self.jitter < min(self.fraction, 1 - self.fraction):
            raise ValueError(f"jitter {self.jitter} must be >= 0 and keep the renewal inside the lifetime")
        if not 0 < self.hard_zone < 1 - self.fraction:
            raise ValueError(f"hard zone {self.hard_zone} must be > 0 and after the renewal point")


@dataclass(frozen=True)
class RotationSettings:
    """How leaves renew, and how re-issuing after a CA change is spread out."""

    policy: RenewalPolicy = RenewalPolicy()
    reissue_window: timedelta = timedelta(minutes=5)
    reissue_rate: float = 50.0  # certificates per second at most, unless a deadline forces faster
    ca_check_interval: timedelta = timedelta(seconds=1)
    # meshca serves its own certificate under a new root only once the root has been in the bundle this long,
    # so proxies that sync their trust in meshca (`meshca trust sync`) hold it first (meshca.sds.server_tls)
    trust_propagation: timedelta = timedelta(minutes=10)


def renewal_time(not_before: datetime, not_after: datetime, policy: RenewalPolicy, jitter_sample: float) -> datetime:
    """When to renew a certificate; `jitter_sample` in [-1, 1] spreads renewals of equal certificates."""
    if not -1 <= jitter_sample <= 1:
        raise ValueError(f"jitter sample {jitter_sample} must be in [-1, 1]")
    lifetime = not_after - not_before
    scheduled = not_before + lifetime * (policy.fraction + policy.jitter * jitter_sample)
    return min(scheduled, hard_zone_start(not_before, not_after, policy))


def hard_zone_start(not_before: datetime, not_after: datetime, policy: RenewalPolicy) -> datetime:
    return not_after - (not_after - not_before) * policy.hard_zone


def lifetime_start(not_before: datetime, issued_at: datetime, not_after: datetime) -> datetime:
    """Where a leaf's lifetime starts for renewal: when it was issued, not its backdated notBefore.

    Vault backdates notBefore by `not_before_duration` (60 s from `meshca vault setup`): for a 20 s
    leaf, half of notBefore..notAfter is already past when it arrives.
    """
    return min(max(not_before, issued_at), not_after)


def should_renew(
    now: datetime, not_before: datetime, not_after: datetime, policy: RenewalPolicy, jitter_sample: float
) -> bool:
    return now >= renewal_time(not_before, not_after, policy, jitter_sample)


def spread_schedule(
    count: int, now: datetime, window: timedelta, max_rate: float, deadline: datetime, rng: random.Random
) -> list[datetime]:
    """Start times for `count` re-issuances after a CA change: jittered across `window`, at most
    `max_rate` per second, and all before `deadline` (the old CA's leaves' expiry) — the deadline wins
    over the rate limit, because a late leaf is an outage and a fast one only costs CPU."""
    if count <= 0:
        return []
    # 90% of the window: the last re-issue (and its push) still lands inside it
    span = max(window * 0.9, timedelta(seconds=count / max_rate))
    span = min(span, max(deadline - now, timedelta(0)) * 0.9)
    slot = span / count
    return [now + slot * (i + rng.random()) for i in range(count)]


class RenewableSecrets(Protocol):
    """What rotation needs from SDS (meshca.sds.workloads.WorkloadSecrets)."""

    def renew(self, spiffe_id: SpiffeId) -> LeafInfo: ...


class LeafInfo(Protocol):
    spiffe_id: SpiffeId
    serial_number: int
    not_before: datetime
    not_after: datetime
    issued_at: datetime


class Republisher(Protocol):
    """Pushes an identity's snapshot again after its secret changed (meshca.sds.workloads.MeshPublisher)."""

    def refresh(self, spiffe_id: SpiffeId) -> None: ...


class JobScheduler(Protocol):
    """One-shot jobs by id (apscheduler in production, a fake clock in tests)."""

    def schedule(self, job_id: str, when: datetime, action: Callable[[], None]) -> None: ...

    def cancel(self, job_id: str) -> None: ...


@dataclass(frozen=True)
class RotationCounters:
    leaf_rotations: int
    leaf_rotations_failed: int
    reissues_after_ca_change: int


class LeafRotator:
    """Schedules each issued leaf's renewal; renews, republishes, and schedules the next one.

    A failed renewal (CA unavailable) is retried with backoff, capped so that it is retried well
    before the hard zone ends; the current certificate keeps being served meanwhile.
    """

    def __init__(
        self,
        secrets: RenewableSecrets,
        publisher: Republisher,
        scheduler: JobScheduler,
        policy: RenewalPolicy,
        clock: Clock,
        logger: logging.Logger,
        rng: random.Random | None = None,
        retry_cap: timedelta = timedelta(seconds=30),
    ) -> None:
        self._secrets = secrets
        self._publisher = publisher
        self._scheduler = scheduler
        self._policy = policy
        self._clock = clock
        self._log = logger
        self._rng = rng or random.Random()
        self._retry_cap = retry_cap
        self._lock = threading.Lock()
        self._tracked: dict[SpiffeId, LeafInfo] = {}
        self._rotations = 0
        self._failures = 0
        self._reissues = 0

    @staticmethod
    def job_id(spiffe_id: SpiffeId) -> str:
        return f"renew:{spiffe_id.uri}"

    def on_issued(self, leaf: LeafInfo) -> datetime:
        """Track a newly issued leaf and schedule its renewal; returns when it will be renewed.

        The renewal is never scheduled in the past: a leaf already due is renewed at once.
        """
        start = lifetime_start(leaf.not_before, leaf.issued_at, leaf.not_after)
        when = renewal_time(start, leaf.not_after, self._policy, self._rng.uniform(-1, 1))
        when = max(when, self._clock())
        with self._lock:
            self._tracked[leaf.spiffe_id] = leaf
        self._scheduler.schedule(self.job_id(leaf.spiffe_id), when, lambda: self.renew(leaf.spiffe_id))
        return when

    def renew(self, spiffe_id: SpiffeId, attempt: int = 0) -> None:
        try:
            leaf = self._secrets.renew(spiffe_id)  # on_issued is called back from there
        except Exception as error:  # any CA failure: keep serving the current one, retry
            with self._lock:
                self._failures += 1
            delay = backoff_delay(attempt + 1, timedelta(seconds=1), self._retry_cap)
            self._log.error(
                "renewal of %s failed (attempt %d), retrying in %s: %s",
                spiffe_id,
                attempt + 1,
                format_duration(delay),
                error,
            )
            self._scheduler.schedule(
                self.job_id(spiffe_id), self._clock() + delay, lambda: self.renew(spiffe_id, attempt + 1)
            )
            return
        with self._lock:
            self._rotations += 1
        self._log.info("rotated workload certificate: identity=%s serial=%x", spiffe_id, leaf.serial_number)
        self._publisher.refresh(spiffe_id)

    def renew_soon(self, spiffe_id: SpiffeId) -> None:
        """Renew now, on the scheduler (e.g. its current certificate was revoked)."""
        self._scheduler.schedule(self.job_id(spiffe_id), self._clock(), lambda: self.renew(spiffe_id))

    def reissue_all(self, window: timedelta, max_rate: float, deadline: datetime | None = None) -> list[datetime]:
        """After a CA change: re-issue every tracked leaf, spread out (herd control).

        Without a deadline, the earliest expiry of the tracked leaves is the deadline.
        """
        now = self._clock()
        with self._lock:
            identities: Sequence[SpiffeId] = list(self._tracked)
            self._reissues += len(identities)
            if deadline is None:
                deadline = min((leaf.not_after for leaf in self._tracked.values()), default=now + window)
        times = spread_schedule(len(identities), now, window, max_rate, deadline, self._rng)
        order = list(identities)
        self._rng.shuffle(order)
        for spiffe_id, when in zip(order, times, strict=True):
            self._scheduler.schedule(self.job_id(spiffe_id), when, lambda s=spiffe_id: self.renew(s))
        spread = times[-1] - now if times else timedelta(0)
        self._log.info("re-issuing %d workload certificates over %s after a CA change", len(order), format_duration(spread))
        return times

    def reissue(
        self, identities: Sequence[SpiffeId], window: timedelta, max_rate: float, deadline: datetime
    ) -> list[datetime]:
        """Re-issue these tracked identities, spread over `window` and all before `deadline` (the leaves of a
        tainted intermediate before its revocation takes effect: meshca.sds.taint)."""
        now = self._clock()
        with self._lock:
            chosen = [spiffe_id for spiffe_id in identities if spiffe_id in self._tracked]
            self._reissues += len(chosen)
        times = spread_schedule(len(chosen), now, window, max_rate, deadline, self._rng)
        self._rng.shuffle(chosen)
        for spiffe_id, when in zip(chosen, times, strict=True):
            self._scheduler.schedule(self.job_id(spiffe_id), when, lambda s=spiffe_id: self.renew(s))
        return times

    def forget(self, spiffe_id: SpiffeId) -> None:
        with self._lock:
            self._tracked.pop(spiffe_id, None)
        self._scheduler.cancel(self.job_id(spiffe_id))

    def counters(self) -> RotationCounters:
        with self._lock:
            return RotationCounters(self._rotations, self._failures, self._reissues)


class ApschedulerJobs:
    """JobScheduler on apscheduler 3.x's BackgroundScheduler (one worker: renewals never overlap).

    A job that schedules its own id while it runs (a renewal scheduling the next one, or its retry)
    is added when it returns: added earlier, apscheduler would find the id still running, skip the
    new run ("maximum number of running instances reached") and drop a one-shot job for good.
    """

    def __init__(self, logger: logging.Logger) -> None:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
            timezone="UTC",
        )
        self._log = logger
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._deferred: dict[str, tuple[datetime, Callable[[], None]]] = {}

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def schedule(self, job_id: str, when: datetime, action: Callable[[], None]) -> None:
        with self._lock:
            if job_id in self._running:
                self._deferred[job_id] = (when, action)
            else:
                self._add(job_id, when, action)

    def _add(self, job_id: str, when: datetime, action: Callable[[], None]) -> None:
        self._scheduler.add_job(
            self._run, "date", run_date=when, id=job_id, args=(job_id, action), replace_existing=True
        )

    def _run(self, job_id: str, action: Callable[[], None]) -> None:
        with self._lock:
            self._running.add(job_id)
        try:
            action()
        finally:
            with self._lock:
                self._running.discard(job_id)
                deferred = self._deferred.pop(job_id, None)
                if deferred is not None:
                    self._add(job_id, *deferred)

    def every(self, job_id: str, seconds: float, action: Callable[[], None]) -> None:
        self._scheduler.add_job(action, "interval", seconds=seconds, id=job_id, replace_existing=True)

    def cancel(self, job_id: str) -> None:
        from apscheduler.jobstores.base import JobLookupError

        with self._lock:
            self._deferred.pop(job_id, None)
            try:
                self._scheduler.remove_job(job_id)
            except JobLookupError:
                pass

    def job_ids(self) -> list[str]:
        """The ids of the jobs waiting to run (and of those deferred until their running self returns)."""
        with self._lock:
            return sorted({job.id for job in self._scheduler.get_jobs()} | set(self._deferred))


class RotatingCa(Protocol):
    """What the CA watcher needs from the CA (every meshca.ca.api.MeshCa fits)."""

    def reload_if_changed(self) -> bool: ...

    def tick(self, now: datetime | None = None) -> Sequence[object]: ...

    def trust_bundle_pem(self) -> bytes: ...

    @property
    def active_intermediate_id(self) -> str: ...


class BundlePublisher(Protocol):
    def refresh_all(self) -> None: ...


class CaWatcher:
    """Runs the CA's scheduled transitions and notices `meshca ca rotate` from another process.

    A new trust bundle is pushed to every stream first; a new signing intermediate then triggers
    a spread-out re-issue of every workload certificate. A failing check is logged once and
    counted, and the next ones are skipped for a doubling delay (up to `max_backoff`); the current
    CA keeps issuing.
    """

    def __init__(
        self,
        ca: RotatingCa,
        publisher: BundlePublisher,
        rotator: LeafRotator,
        settings: RotationSettings,
        clock: Clock,
        logger: logging.Logger,
        max_backoff: timedelta = timedelta(seconds=60),
        audit: CaTransitions | None = None,
    ) -> None:
        """`audit`: records every transition committed here or noticed on reload."""
        self._ca = ca
        self._audit = audit
        self._publisher = publisher
        self._rotator = rotator
        self._settings = settings
        self._clock = clock
        self._log = logger
        self._lock = threading.Lock()
        self._bundle = ca.trust_bundle_pem()
        self._intermediate = ca.active_intermediate_id
        self._ca_rotations = 0
        self._failures = 0
        self._max_backoff = max_backoff
        self._failed_in_row = 0
        self._retry_at: datetime | None = None

    def check(self) -> None:
        with self._lock:
            now = self._clock()
            if self._retry_at is not None and now < self._retry_at:
                return
            try:
                self._ca.reload_if_changed()
                if self._audit is not None:  # by the generation: a store's watch may have reloaded the CA already
                    self._audit.observe()
                events = self._ca.tick(now)
                if events and self._audit is not None:
                    self._audit.committed(events)  # type: ignore[arg-type]
            except Exception as error:  # a failed transition must not stop issuance
                self._failures += 1
                self._failed_in_row += 1
                base = max(self._settings.ca_check_interval, timedelta(seconds=1))
                delay = backoff_delay(self._failed_in_row, base, self._max_backoff)
                self._retry_at = now + delay
                reason = describe_os_error(error) if isinstance(error, OSError) else str(error)
                self._log.error(
                    "CA check failed (%d in a row); the current CA keeps issuing; next try in %s: %s",
                    self._failed_in_row, format_duration(delay), reason,
                )
                return
            if self._failed_in_row:
                self._log.info("CA check works again after %d failed attempts", self._failed_in_row)
                self._failed_in_row, self._retry_at = 0, None
            for event in events:
                self._log.info("CA event: %s", event)
            bundle = self._ca.trust_bundle_pem()
            intermediate = self._ca.active_intermediate_id
            if bundle != self._bundle:
                self._bundle = bundle
                self._log.info("trust bundle changed: pushing it to every proxy")
                self._publisher.refresh_all()
            if intermediate != self._intermediate:
                self._log.info("signing intermediate changed %s -> %s", self._intermediate, intermediate)
                self._intermediate = intermediate
                self._ca_rotations += 1
                self._rotator.reissue_all(self._settings.reissue_window, self._settings.reissue_rate)

    def ca_rotations(self) -> int:
        with self._lock:
            return self._ca_rotations

    def failures(self) -> int:
        with self._lock:
            return self._failures
