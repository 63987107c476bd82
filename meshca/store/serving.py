"""What `meshca serve` builds from the `store:` settings: the etcd connection and, for the internal CA, the
replicated CA with its leader election."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from meshca.ca.backends import CaBackend, build_ca_backend, read_ca_mode
from meshca.clock import Clock
from meshca.fields import ConfigError
from meshca.store.ca import ReplicatedCa, missing_kek_message
from meshca.store.etcd import EtcdSettings, EtcdStore
from meshca.store.leader import LeaderElection
from meshca.store.tasks import stop_tasks

T = TypeVar("T")


async def connect_store(settings: EtcdSettings, logger: logging.Logger) -> EtcdStore:
    """The one EtcdStore of a process, connected on the running loop (StoreUnavailable: etcd did not answer)."""
    store = EtcdStore(settings, logger)
    try:
        await store.connect()
    except BaseException:
        await store.close()
        raise
    return store


def run_with_store(settings: EtcdSettings, work: Callable[[EtcdStore], Awaitable[T]], logger: logging.Logger) -> T:
    """`work(store)` on a store connected for it alone (the CLI's commands); StoreUnavailable passes through."""

    async def run() -> T:
        store = await connect_store(settings, logger)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


@dataclass
class StoreCa:
    """The CA backend of a replica on etcd and what keeps it current: `start()` after the server is up, `close()`
    at the end. `replicated`/`election` are None in the Vault modes (their CA keys never enter etcd)."""

    backend: CaBackend
    replicated: ReplicatedCa | None = None
    election: LeaderElection | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("meshca.store"))
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        """Campaign for the CA leader (once: two campaigns of one election would race over its lease)."""
        if self.election is not None and not self._tasks:
            self._tasks.append(asyncio.create_task(self.election.run(), name="ca-leader-election"))

    async def close(self) -> None:
        await stop_tasks(self._tasks, self.log)
        self._tasks.clear()
        if self.election is not None:
            await self.election.resign()
        if self.replicated is not None:
            await self.replicated.close()


async def build_store_ca(config_path: Path, store: EtcdStore, clock: Clock, logger: logging.Logger,
                         replica_id: str) -> StoreCa:
    """The CA of `meshca serve` with `store:`.

    internal: the CA state is in etcd (`meshca ca import`), sealed with the KEK; this replica serves from its
    private mirror and campaigns for `ca/leader`, which runs the scheduled transitions. `state_dir` is not read.
    vault-leaf: as without a store (Vault signs; no CA key anywhere here). vault-intermediate: each replica keeps
    its own state_dir and intermediate, as without a store: that key never enters etcd.
    """
    mode = read_ca_mode(config_path)
    if mode != "internal":
        return StoreCa(build_ca_backend(config_path, clock, logger))
    if store.settings.kek is None:
        raise ConfigError(config_path, "store.etcd.kek_file", missing_kek_message(store.settings.prefix))
    election = LeaderElection(store, replica_id, logger.getChild("leader"))
    replicated = await ReplicatedCa.open(store, store.settings.kek, clock, logger.getChild("ca-store"),
                                         leader=election)
    return StoreCa(CaBackend(mode, replicated, None), replicated, election, logger)
