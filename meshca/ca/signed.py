"""The leaves the CSR service signed, per identity, until they expire: what a revoked identity's CRL entries list."""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from meshca.clock import Clock
from meshca.identity.spiffe import SpiffeId

# A node agent renews at half the lifetime, so each workload instance holds about two unexpired leaves (three
# around an agent restart): 1,024 per identity is ~400 instances of one identity; 65,536 entries are ~10 MB.
DEFAULT_PER_IDENTITY = 1024
DEFAULT_TOTAL = 65536
PRUNE_EVERY = timedelta(seconds=60)


@dataclass(frozen=True, order=True)
class SignedLeaf:
    """One leaf signed here: `issuer_id` is the slot id of the intermediate that signed it (None: unknown)."""

    not_after: datetime
    serial: int
    spiffe_id: SpiffeId = field(compare=False)
    issuer_id: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Untracked:
    """Leaves of one identity dropped at the bound (still valid, on no CRL if it is revoked): how many, and when
    the last of them expires."""

    count: int
    until: datetime


class SignedLeaves:
    """Thread-safe record of what this replica's CSR service signed (the CSR service on the event loop records,
    the revocation check on the scheduler reads). Entries leave once their certificate expired (pruned on every
    record of the same identity, on every read, and across all identities at most every PRUNE_EVERY).

    Bounds: at most `per_identity` unexpired entries per identity and `total` in all. At the per-identity bound
    the entry of that identity expiring first is dropped; at the total bound, the one expiring first of the
    identity holding the most (so a flood of CSRs by one identity drops its own entries, not others'). A dropped
    leaf stays valid and will not be listed if its identity is revoked (RBAC still refuses its requests): the
    first drop of an identity logs one warning, and `untracked` says how many and until when.
    """

    def __init__(
        self,
        clock: Clock,
        logger: logging.Logger,
        per_identity: int = DEFAULT_PER_IDENTITY,
        total: int = DEFAULT_TOTAL,
    ) -> None:
        if per_identity < 1 or total < 1:
            raise ValueError("SignedLeaves bounds must be at least 1")
        self._clock = clock
        self._log = logger
        self._per_identity = per_identity
        self._total = total
        self._lock = threading.Lock()
        self._by_id: dict[SpiffeId, list[SignedLeaf]] = {}  # a heap per identity, soonest expiry first
        self._count = 0
        self._untracked: dict[SpiffeId, Untracked] = {}
        self._next_prune: datetime | None = None

    def record(self, leaf: SignedLeaf) -> None:
        now = self._clock()
        if leaf.not_after <= now:
            return
        with self._lock:
            self._prune_all_if_due(now)
            heap = self._by_id.setdefault(leaf.spiffe_id, [])
            self._prune(heap, now)
            if len(heap) >= self._per_identity:
                self._drop(leaf.spiffe_id, heap)
            elif self._count >= self._total:
                largest = max(self._by_id, key=lambda spiffe_id: len(self._by_id[spiffe_id]))
                self._drop(largest, self._by_id[largest])
            heapq.heappush(self._by_id.setdefault(leaf.spiffe_id, heap), leaf)
            self._count += 1

    def serials_of(self, identities: Iterable[SpiffeId]) -> list[SignedLeaf]:
        """The unexpired leaves signed here for these identities (those dropped at the bound excepted)."""
        now = self._clock()
        with self._lock:
            found: list[SignedLeaf] = []
            for spiffe_id in identities:
                heap = self._by_id.get(spiffe_id)
                if heap is not None:
                    self._prune(heap, now)
                    found += sorted(heap)
            return found

    def untracked(self, spiffe_id: SpiffeId) -> Untracked | None:
        """Leaves of `spiffe_id` dropped at the bound and not yet expired (None: every unexpired one is tracked)."""
        with self._lock:
            dropped = self._untracked.get(spiffe_id)
            if dropped is not None and dropped.until <= self._clock():
                del self._untracked[spiffe_id]
                return None
            return dropped

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def _prune(self, heap: list[SignedLeaf], now: datetime) -> None:
        while heap and heap[0].not_after <= now:
            heapq.heappop(heap)
            self._count -= 1

    def _prune_all_if_due(self, now: datetime) -> None:
        if self._next_prune is not None and now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY
        for spiffe_id, heap in list(self._by_id.items()):
            self._prune(heap, now)
            if not heap:
                del self._by_id[spiffe_id]
        for spiffe_id, dropped in list(self._untracked.items()):
            if dropped.until <= now:
                del self._untracked[spiffe_id]

    def _drop(self, spiffe_id: SpiffeId, heap: list[SignedLeaf]) -> None:
        dropped = heapq.heappop(heap)
        self._count -= 1
        before = self._untracked.get(spiffe_id)
        if before is None:
            self._log.warning(
                "more than %d certificates of %s signed here are unexpired (bound: %d per identity, %d in all): the "
                "oldest are no longer tracked, so a revocation of the identity cannot list them on the CRLs (its "
                "requests are still refused per route)", len(heap) + 1, spiffe_id, self._per_identity, self._total,
            )
            self._untracked[spiffe_id] = Untracked(1, dropped.not_after)
        else:
            self._untracked[spiffe_id] = Untracked(before.count + 1, max(before.until, dropped.not_after))
        if not heap:
            del self._by_id[spiffe_id]
