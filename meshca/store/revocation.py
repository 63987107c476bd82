"""The revocation list of the CA in etcd (one key, written compare-and-swap), followed by every replica."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from etcd3aio.kv import Compare

from meshca.ca.api import CaError
from meshca.ca.revocation import RevocationList
from meshca.clock import Clock
from meshca.store.etcd import EtcdSettings, EtcdStore, StoreUnavailable
from meshca.store.tasks import follow_prefix, stop_tasks

REVOCATIONS_KEY = "revocations.json"
_CAS_ATTEMPTS = 8

Change = Callable[[RevocationList], RevocationList]


async def read_revocations(store: EtcdStore) -> tuple[RevocationList, int]:
    """The list in etcd and its key's mod_revision (0: no list yet, an empty one)."""
    value = await store.get(REVOCATIONS_KEY)
    if value is None:
        return RevocationList(), 0
    return RevocationList.from_bytes(value.value, f"{store.settings.prefix}/{REVOCATIONS_KEY}"), value.mod_revision


async def update_revocations(store: EtcdStore, change: Change) -> RevocationList:
    """Apply `change` to the list in etcd in one compare-and-swap (retried when another writer came first)."""
    kv = store.kv
    key = store.full_key(REVOCATIONS_KEY)
    for _ in range(_CAS_ATTEMPTS):
        current, revision = await read_revocations(store)
        new = change(current)
        if new.entries == current.entries:
            return current
        new = new.recorded_after(current)
        raw = new.to_bytes()
        compare = (kv.txn_compare_create_revision(key, 0) if revision == 0 else
                   Compare(result=Compare.EQUAL, target=Compare.MOD, key=key, mod_revision=revision))
        ok, _ = await store.txn([compare], [kv.txn_op_put(key, raw)])
        if ok:
            return replace(new, raw=raw)
    raise CaError(f"{store.settings.prefix}/{REVOCATIONS_KEY}: changed by others {_CAS_ATTEMPTS} times in a row; "
                  "try again")


class EtcdRevocations:
    """A replica's view of the list in etcd (meshca.sds.crl.RevocationSource): a watch keeps it current, `read`
    and `changed` answer from memory (no etcd call on the scheduler's thread), `update` writes through etcd.

    Create with `await EtcdRevocations.open(...)` on the store's loop."""

    def __init__(self, store: EtcdStore, logger: logging.Logger) -> None:
        self._store = store
        self._log = logger
        self._list = RevocationList()
        self._revision = 0
        self._seen: RevocationList | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    @classmethod
    async def open(cls, store: EtcdStore, logger: logging.Logger, *, watch: bool = True) -> EtcdRevocations:
        source = cls(store, logger)
        await source.sync()
        if watch:
            source._task = asyncio.create_task(source.follow(), name="revocations-store-watch")
        return source

    async def close(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task], self._log)
            self._task = None

    async def sync(self) -> None:
        current, revision = await read_revocations(self._store)
        if revision != self._revision or current.version != self._list.version:
            self._list, self._revision = current, revision

    async def follow(self) -> None:
        """Watch the key and adopt every write (runs until cancelled; etcd outages are waited out)."""
        await follow_prefix(self._store, REVOCATIONS_KEY, lambda: self._revision, self._sync_logged,
                            lambda error: self._log.debug("revocations watch ended: %s", error))

    async def _sync_logged(self) -> None:
        try:
            await self.sync()
            self._failing = False
        except (StoreUnavailable, CaError) as error:
            if not self._failing:
                self._log.error("cannot read the revocation list from etcd; the current one stays in force: %s",
                                error)
            self._failing = True

    def read(self) -> RevocationList:
        self._seen = self._list
        return self._list

    def changed(self) -> RevocationList | None:
        current = self._list
        if current is self._seen:
            return None
        self._seen = current
        return current

    def update(self, change: Change) -> RevocationList:
        """From a worker thread (never the store's loop)."""
        try:
            updated = self._store.call(update_revocations(self._store, change), timeout=30)
        except StoreUnavailable as error:
            raise CaError(f"revocation list: {error}") from None
        return updated


def update_in_store(
    settings: EtcdSettings, clock: Clock, change: Callable[[str, Any], Change]
) -> tuple[RevocationList, str]:
    """The CLI's write: `change(trust_domain, the CA's crl_signers())` applied to the list in etcd."""
    from meshca.store.ca import ReplicatedCa
    from meshca.store.serving import run_with_store

    async def run(store: EtcdStore) -> RevocationList:
        ca = await ReplicatedCa.open(store, settings.kek, clock, logging.getLogger("meshca.cli.revoke"), watch=False)
        try:
            return await update_revocations(store, change(ca.trust_domain, ca.crl_signers()))
        finally:
            await ca.close()

    try:
        after = run_with_store(settings, run, logging.getLogger("meshca.cli.store"))
    except StoreUnavailable as error:
        raise CaError(str(error)) from None
    return after, f"etcd {settings.prefix}/{REVOCATIONS_KEY}"


def update_list_in_store(settings: EtcdSettings, change: Change) -> tuple[RevocationList, str]:
    """The CLI's write in the Vault modes (no CA in etcd): `change` applied to the list in etcd."""
    from meshca.store.serving import run_with_store

    async def run(store: EtcdStore) -> RevocationList:
        return await update_revocations(store, change)

    try:
        after = run_with_store(settings, run, logging.getLogger("meshca.cli.store"))
    except StoreUnavailable as error:
        raise CaError(str(error)) from None
    return after, f"etcd {settings.prefix}/{REVOCATIONS_KEY}"
