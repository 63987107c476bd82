"""Test doubles shared by the test modules: fake clocks and time, a fake scheduler, recording and fixed-answer stand-ins."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from meshca.identity.jwt import AuthenticationError, VerifiedIdentity
from meshca.identity.spiffe import SpiffeId

# The fixed start of the fake clocks of most tests.
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


class FakeClock:
    """Stands in for meshca.clock.Clock: returns `now`, which tests set or advance by hand.

    Starts at T0 unless told otherwise; at_real_now() for code checked against a real server that
    stamps certificates and tokens with its own (real) time, such as OpenBao.
    """

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    @classmethod
    def at_real_now(cls) -> FakeClock:
        return cls(datetime.now(UTC).replace(microsecond=0))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FakeMonotonic:
    """Stands in for time.monotonic and, with its sleep method, time.sleep: sleeping moves the time, nothing waits."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class FakeLoopTime:
    """Stands in for the running event loop's clock (loop.time, which call_later timers follow): a timer
    fires when the test advances this clock past it, and nothing waits. The loop_time fixture installs it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.now = loop.time()

    def __call__(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        """Move the clock, then return once the loop has run every timer now due."""
        self.now += seconds
        # A marker due at the new now: the loop moves it to its ready queue in the same pass as every
        # earlier timer, and runs them all before this coroutine resumes.
        done = self._loop.create_future()
        self._loop.call_at(self.now, done.set_result, None)
        await done


class FakeScheduler:
    """Stands in for apscheduler: one-shot jobs by id, run when advance_to moves the fake clock past them."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.jobs: dict[str, tuple[datetime, Callable[[], None]]] = {}

    def schedule(self, job_id: str, when: datetime, action: Callable[[], None]) -> None:
        self.jobs[job_id] = (when, action)

    def cancel(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def advance_to(self, when: datetime) -> int:
        ran = 0
        while True:
            due = sorted((t, job_id) for job_id, (t, _) in self.jobs.items() if t <= when)
            if not due:
                break
            at, job_id = due[0]
            self.clock.now = max(self.clock.now, at)
            _, action = self.jobs.pop(job_id)
            action()
            ran += 1
        self.clock.now = when
        return ran


class RecordingPublisher:
    """Stands in for meshca.sds.rotation.BundlePublisher: counts the trust-bundle pushes asked of it."""

    def __init__(self) -> None:
        self.pushes = 0

    def refresh_all(self) -> None:
        self.pushes += 1


class RecordingRotator:
    """Stands in for meshca.sds.rotation.LeafRotator's reissue_all: counts the re-issues asked of it."""

    def __init__(self) -> None:
        self.reissues = 0

    def reissue_all(self, window: timedelta, max_rate: float, deadline: datetime | None = None) -> list[datetime]:
        self.reissues += 1
        return []


class FakeTokenAuthenticator:
    """Stands in for meshca.identity.jwt.IdentityGate: a fixed map of bearer tokens to identities."""

    def __init__(self, tokens: dict[str, SpiffeId]) -> None:
        self._tokens = tokens

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> VerifiedIdentity:
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            raise AuthenticationError("missing authorization metadata")
        value = values[0] if isinstance(values[0], str) else values[0].decode()
        token = value.removeprefix("Bearer ")
        if token not in self._tokens:
            raise AuthenticationError("token signature is invalid")
        return VerifiedIdentity(
            spiffe_id=self._tokens[token],
            issuer="https://issuer.test",
            subject=token,
            node_id=None,
            pod_name=None,
            expires_at=T0 + timedelta(hours=1),
        )
