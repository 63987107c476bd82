"""The etcd client the store parts share, against a real etcd member: prefixed keys, transactions, leases,
watches, and what an unreachable etcd looks like."""

from __future__ import annotations

import asyncio
import base64
import logging
from datetime import timedelta
from pathlib import Path

import pytest

from meshca.dev.etcd_process import EtcdProcess
from meshca.fields import ConfigError, FieldReader
from meshca.store.etcd import EtcdSettings, EtcdStore, StoreUnavailable, parse_store_settings

pytestmark = pytest.mark.e2e



async def test_keys_live_under_the_prefix_and_transactions_compare(etcd: EtcdProcess) -> None:
    store = EtcdStore(EtcdSettings((etcd.endpoint,), prefix="/t1"), logging.getLogger("t"))
    await store.connect()
    try:
        await store.put("a/one", b"1")
        assert (await store.get("a/one")).value == b"1"
        values, revision = await store.get_prefix("a/")
        assert [v.key for v in values] == ["a/one"] and revision >= values[0].mod_revision
        kv = store.kv
        ok, _ = await store.txn([kv.txn_compare_version(store.full_key("a/one"), 0)], [kv.txn_op_put(store.full_key("a/one"), b"2")])
        assert not ok and (await store.get("a/one")).value == b"1"
        assert store.writes == 2 and store.reachable
    finally:
        await store.close()


async def test_a_lease_ends_its_keys_and_a_watch_sees_it(etcd: EtcdProcess) -> None:
    store = EtcdStore(EtcdSettings((etcd.endpoint,), prefix="/t2"), logging.getLogger("t"))
    await store.connect()
    try:
        start = await store.revision() + 1
        lease = await store.grant_lease(timedelta(seconds=2))
        await store.put("r/x", b"here", lease=lease)
        assert await store.refresh_lease(lease)
        seen: list[tuple[str, bytes | None]] = []

        async def watch() -> None:
            async for events in store.watch_prefix("r/", start):
                seen.extend((e.key, e.value) for e in events)
                if any(value is None for _, value in seen):
                    return

        await store.revoke_lease(lease)
        await asyncio.wait_for(watch(), 10)
        assert seen == [("r/x", b"here"), ("r/x", None)]
        assert not await store.refresh_lease(lease)
    finally:
        await store.close()


async def test_an_unreachable_etcd_is_one_clear_error() -> None:
    with EtcdProcess() as member:
        store = EtcdStore(EtcdSettings((member.endpoint,), timeout=1.0), logging.getLogger("t"))
        await store.connect()
        member.kill()
        with pytest.raises(StoreUnavailable, match=f"etcd at {member.endpoint} did not answer"):
            await store.get("x")
        assert not store.reachable
        member.start()
        for _ in range(50):
            try:
                await store.get("x")
                break
            except StoreUnavailable:
                await asyncio.sleep(0.2)
        assert store.reachable
        await store.close()


def test_store_settings_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"

    def parse(data: dict, environ: dict | None = None) -> EtcdSettings | None:
        return parse_store_settings(FieldReader(path, data), environ or {})

    assert parse({}) is None
    settings = parse({"store": {"etcd": {"endpoints": ["127.0.0.1:2379"]}}})
    assert settings is not None and settings.prefix == "/meshca" and settings.kek is None
    with pytest.raises(ConfigError, match=r"store\.etcd\.endpoints\[0\]"):
        parse({"store": {"etcd": {"endpoints": ["nope"]}}})
    with pytest.raises(ConfigError, match=r"store\.etcd\.prefix"):
        parse({"store": {"etcd": {"endpoints": ["127.0.0.1:1"], "prefix": "x"}}})
    key = bytes(range(32))
    (tmp_path / "kek").write_bytes(key)
    assert parse({"store": {"etcd": {"endpoints": ["127.0.0.1:1"], "kek_file": "kek"}}}).kek == key
    assert parse({"store": {"etcd": {"endpoints": ["127.0.0.1:1"]}}},
                 {"MESHCA_STORE_KEK": base64.b64encode(key).decode()}).kek == key
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(ConfigError, match=r"kek_file.*32 random bytes"):
        parse({"store": {"etcd": {"endpoints": ["127.0.0.1:1"], "kek_file": "short"}}})
