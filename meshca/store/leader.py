"""One leader among the replicas for the singleton jobs: an etcd key held under the leader's lease, and the fence
every leader-only commit is conditioned on."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from meshca.store.etcd import EtcdStore, StoreUnavailable

LEADER_KEY = "ca/leader"


@dataclass(frozen=True)
class Fence:
    """This replica's hold on the leader key: a commit conditioned on `compares` applies only while the key is
    still the one this replica created (a new leader's key has another create_revision)."""

    key: str
    replica_id: str
    lease: int
    create_revision: int

    def compares(self, store: EtcdStore) -> list[Any]:
        full = store.full_key(self.key)
        return [
            store.kv.txn_compare_create_revision(full, self.create_revision),
            store.kv.txn_compare_value(full, self.replica_id.encode()),
        ]


class LeaderElection:
    """Campaign for `key` (put if absent, under this replica's own lease) and keep the lease alive.

    `run()` loops until cancelled: every third of the lease TTL it refreshes the lease and, when not leader,
    takes the key if it is free. Leadership is dropped at once when a keep-alive fails or the lease or key is
    gone; a replica that was frozen (SIGSTOP) past its lease may still believe it leads for a moment, which is
    why every leader-only commit also carries `fence().compares()`: etcd refuses it then.
    """

    def __init__(self, store: EtcdStore, replica_id: str, logger: logging.Logger, key: str = LEADER_KEY,
                 ttl: timedelta | None = None) -> None:
        self._store = store
        self.replica_id = replica_id
        self._log = logger
        self._key = key
        self._ttl = ttl or store.settings.lease_ttl
        self._lease: int | None = None
        self._fence: Fence | None = None
        self._failing = False
        self.changed = asyncio.Event()  # set whenever leadership is won or lost

    @property
    def is_leader(self) -> bool:
        return self._fence is not None

    def fence(self) -> Fence | None:
        """The condition of a leader-only commit; None when not leader (then commit nothing)."""
        return self._fence

    @property
    def interval(self) -> float:
        return max(self._ttl.total_seconds() / 3, 0.2)

    async def run(self) -> None:
        try:
            while True:
                await self.step()
                await asyncio.sleep(self.interval)
        finally:
            self._lose("stopping")

    async def step(self) -> None:
        """One round: keep the lease alive, check the key, campaign when it is free."""
        try:
            await self._step()
        except StoreUnavailable as error:
            self._lose("etcd unreachable")
            if not self._failing:
                self._log.warning("leader election waits for etcd: %s", error)
            self._failing = True
            return
        if self._failing:
            self._log.info("leader election: etcd answers again")
            self._failing = False

    async def _step(self) -> None:
        store = self._store
        if self._lease is not None and not await store.refresh_lease(self._lease):
            self._lose("lease expired")
            self._lease = None
        if self._lease is None:
            self._lease = await store.grant_lease(self._ttl)
        held = await store.get(self._key)
        if held is not None:
            mine = held.value == self.replica_id.encode() and held.lease == self._lease
            if mine and self._fence is None:  # kept through an etcd outage shorter than the lease
                self._win(held.create_revision)
            elif not mine:
                self._lose(f"leader is now {held.value.decode(errors='replace')}")
            return
        self._lose("leader key gone")
        full = store.full_key(self._key)
        kv = store.kv
        won, revision = await store.txn(
            [kv.txn_compare_create_revision(full, 0)], [kv.txn_op_put(full, self.replica_id.encode(), lease=self._lease)]
        )
        if won:
            self._win(revision)

    def _win(self, create_revision: int) -> None:
        assert self._lease is not None
        self._fence = Fence(self._key, self.replica_id, self._lease, create_revision)
        self._log.info("this replica (%s) is the leader: it runs the CA transitions", self.replica_id)
        self.changed.set()

    def _lose(self, why: str) -> None:
        if self._fence is None:
            return
        self._fence = None
        self._log.warning("this replica (%s) is no longer the leader: %s", self.replica_id, why)
        self.changed.set()

    async def resign(self) -> None:
        """Give the key up at once (on a graceful stop) so another replica takes over without waiting for the TTL."""
        self._fence = None
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                await self._store.revoke_lease(lease)
            except StoreUnavailable:
                pass
