"""Forgetting identities: a grace period after an identity's last stream closed, its renewal job,
key, snapshot and metric series go (held forever, they were renewed forever)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from meshca.clock import Clock, format_duration
from meshca.identity.spiffe import SpiffeId


class Forgetter(Protocol):
    """Something that holds per-identity state (the rotator's job, SDS's key, the published snapshot)."""

    def forget(self, spiffe_id: SpiffeId) -> object: ...


class OneShotJobs(Protocol):
    def schedule(self, job_id: str, when: datetime, action: Callable[[], None]) -> None: ...

    def cancel(self, job_id: str) -> None: ...


class IdentityRetention:
    """Counts each identity's open streams; `grace` after the count drops to zero, forgets it.

    `opened` is called before the identity's certificate is looked up, and forgetting runs under the
    same lock, so a stream that opens while its identity is being forgotten either stops the
    forgetting or finds it finished (and gets a new certificate).
    """

    def __init__(
        self,
        forgetters: Sequence[Forgetter],
        jobs: OneShotJobs,
        grace: timedelta,
        clock: Clock,
        logger: logging.Logger,
    ) -> None:
        if grace < timedelta(0):
            raise ValueError(f"identity grace period must not be negative, got {grace}")
        self._forgetters = tuple(forgetters)
        self._jobs = jobs
        self._grace = grace
        self._clock = clock
        self._log = logger
        self._lock = threading.Lock()
        self._streams: dict[SpiffeId, int] = {}
        self._forgotten = 0

    @staticmethod
    def job_id(spiffe_id: SpiffeId) -> str:
        return f"forget:{spiffe_id.uri}"

    def opened(self, spiffe_id: SpiffeId) -> None:
        with self._lock:
            count = self._streams.get(spiffe_id, 0)
            self._streams[spiffe_id] = count + 1
            if count == 0:
                self._jobs.cancel(self.job_id(spiffe_id))

    def closed(self, spiffe_id: SpiffeId) -> None:
        with self._lock:
            count = self._streams.get(spiffe_id, 0) - 1
            if count > 0:
                self._streams[spiffe_id] = count
                return
            self._streams.pop(spiffe_id, None)
            self._jobs.schedule(self.job_id(spiffe_id), self._clock() + self._grace, lambda: self._forget(spiffe_id))

    def _forget(self, spiffe_id: SpiffeId) -> None:
        with self._lock:
            if self._streams.get(spiffe_id, 0) > 0:
                return  # came back within the grace period
            for forgetter in self._forgetters:
                forgetter.forget(spiffe_id)
            self._forgotten += 1
        self._log.info("forgot identity %s: no stream for %s", spiffe_id, format_duration(self._grace))

    def forgotten_total(self) -> int:
        with self._lock:
            return self._forgotten
