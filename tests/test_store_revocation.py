"""The revocation list in a real etcd: a CLI write reaches every replica's view; concurrent writers both land."""

from __future__ import annotations

import asyncio
import logging
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.ca.revocation import Revocation, RevocationList, intermediate_revocation
from meshca.clock import system_clock
from meshca.dev.etcd_process import EtcdProcess
from meshca.store.ca import import_state_dir
from meshca.store.etcd import EtcdSettings, EtcdStore
from meshca.store.revocation import EtcdRevocations, update_in_store, update_revocations

pytestmark = pytest.mark.e2e

TD = "mesh.test"
KEK = secrets.token_bytes(32)
FRONTEND = f"spiffe://{TD}/ns/shop/sa/frontend"


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_cli_revocation_reaches_every_replica(etcd: EtcdProcess, tmp_path: Path) -> None:
    settings = EtcdSettings((etcd.endpoint,), prefix="/rev1", kek=KEK, lease_ttl=timedelta(seconds=2))
    ca = CertificateAuthority.init(tmp_path / "state", CaSettings(TD), system_clock)
    ca.rotate_intermediate(now=True)
    old = next(r.id for r, _ in ca.crl_signers() if r.kind == "intermediate" and r.state == "old")
    stores = [EtcdStore(settings, logging.getLogger(f"test.{n}")) for n in "ab"]
    for store in stores:
        await store.connect()
    try:
        await import_state_dir(stores[0], KEK, tmp_path / "state", system_clock)
        views = [await EtcdRevocations.open(store, logging.getLogger("test.rev")) for store in stores]
        assert all(view.read().entries == () and view.changed() is None for view in views)

        def revoke(trust_domain: str, signers: Any) -> Any:
            entry = intermediate_revocation(signers, old, "cACompromise", system_clock())
            return lambda current: current.with_entries([entry])

        after, where = await asyncio.to_thread(update_in_store, settings, system_clock, revoke)
        assert after.version == 1 and where.endswith("revocations.json")
        await until(lambda: all(view.read().find("intermediate", old) is not None for view in views))
        seen = views[1].changed()
        assert seen is None or seen.find("intermediate", old) is not None

        def identity(n: int) -> Any:
            entry = Revocation("spiffe_id", f"{FRONTEND}{n}", "unspecified", system_clock())
            return lambda current: current.with_entries([entry])

        # two writers at once: compare-and-swap retries, both entries land
        await asyncio.gather(update_revocations(stores[0], identity(1)), update_revocations(stores[1], identity(2)))
        await until(lambda: views[0].read().denied_spiffe_ids == {f"{FRONTEND}1", f"{FRONTEND}2"})
        assert views[0].read().version == 3
        # a replica's own write (the serials of a revoked identity) goes through etcd too
        added = await asyncio.to_thread(views[1].update, lambda current: current.without("spiffe_id", f"{FRONTEND}1"))
        assert isinstance(added, RevocationList) and added.version == 4
        await until(lambda: views[0].read().version == 4)
        for view in views:
            await view.close()
    finally:
        for store in stores:
            await store.close()
