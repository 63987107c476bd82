"""`meshca ca taint --config` with `store:`: the rotation and the delayed revocation both land in a real etcd."""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest
import yaml

from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.ca.revocation import Revocation
from meshca.cli.main import build_parser
from meshca.cli.taint import cmd_ca_taint
from meshca.clock import system_clock
from meshca.dev.etcd_process import EtcdProcess
from meshca.store.ca import ReplicatedCa, import_state_dir
from meshca.store.etcd import EtcdSettings, EtcdStore
from meshca.store.revocation import read_revocations

pytestmark = pytest.mark.e2e

TD = "mesh.test"
T = TypeVar("T")


def test_a_taint_through_a_store_config_commits_the_rotation_and_the_delayed_revocation(
    etcd: EtcdProcess, etcd_prefix: str, tmp_path: Path
) -> None:
    kek = secrets.token_bytes(32)
    (tmp_path / "kek").write_bytes(kek)
    config = tmp_path / "meshca.yaml"
    config.write_text(yaml.safe_dump({
        "store": {"etcd": {"endpoints": [etcd.endpoint], "prefix": etcd_prefix, "kek_file": "kek"}},
        "rotation": {"reissue_window": "20s"},
    }))
    settings = EtcdSettings((etcd.endpoint,), prefix=etcd_prefix, kek=kek, lease_ttl=timedelta(seconds=2))
    tainted = CertificateAuthority.init(tmp_path / "state", CaSettings(TD), system_clock).active_intermediate_id

    async def with_store(work: Callable[[EtcdStore], Awaitable[T]]) -> T:
        store = EtcdStore(settings, logging.getLogger("test.store"))
        await store.connect()
        try:
            return await work(store)
        finally:
            await store.close()

    async def imported(store: EtcdStore) -> None:
        await import_state_dir(store, kek, tmp_path / "state", system_clock)

    asyncio.run(with_store(imported))

    def taint() -> tuple[int, str]:
        args = build_parser().parse_args(["ca", "taint", "--intermediate", tainted, "--config", str(config)])
        out = io.StringIO()
        return cmd_ca_taint(args, out, system_clock), out.getvalue()

    started = system_clock()
    code, out = taint()
    assert code == 0 and f"tainted intermediate {tainted}" in out, out

    async def state(store: EtcdStore) -> tuple[str, Revocation | None]:
        ca = await ReplicatedCa.open(store, kek, system_clock, logging.getLogger("test.ca"), watch=False)
        try:
            listed, _ = await read_revocations(store)
            return ca.active_intermediate_id, listed.find("intermediate", tainted)
        finally:
            await ca.close()

    active, entry = asyncio.run(with_store(state))
    assert active != tainted
    assert entry is not None and entry.effective_at is not None
    delay = entry.effective_at - started
    assert timedelta(seconds=49) <= delay <= timedelta(seconds=52)  # the config's 20 s window plus the 30 s margin
    code, out = taint()
    assert code == 0 and out.startswith("nothing to do")
    assert asyncio.run(with_store(state))[0] == active  # no second rotation
