"""The internal CA's state in a real etcd: import, replicas following one leader's fenced commits, sealed keys,
and an etcd outage that issuance does not notice."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import secrets
import stat
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from meshca.ca.api import CaError, CaSettings, CaStateError
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock
from meshca.dev.etcd_process import EtcdProcess
from meshca.identity.spiffe import SpiffeId
from meshca.store.ca import ReplicatedCa, import_state_dir, read_store_files
from meshca.store.etcd import EtcdSettings, EtcdStore
from meshca.store.leader import LeaderElection

pytestmark = pytest.mark.e2e

TRUST_DOMAIN = "mesh.test"
KEK = secrets.token_bytes(32)



@dataclass
class Replica:
    store: EtcdStore
    election: LeaderElection
    ca: ReplicatedCa


def settings_for(endpoint: str, prefix: str, timeout: float = 5.0) -> EtcdSettings:
    return EtcdSettings((endpoint,), prefix=prefix, kek=KEK, lease_ttl=timedelta(seconds=2), timeout=timeout)


async def replica(settings: EtcdSettings, name: str, *, watch: bool = True) -> Replica:
    log = logging.getLogger(f"test.{name}")
    store = EtcdStore(settings, log)
    await store.connect()
    election = LeaderElection(store, name, log)
    ca = await ReplicatedCa.open(store, settings.kek, system_clock, log, leader=election, watch=watch)
    return Replica(store, election, ca)


async def close(*replicas: Replica) -> None:
    for r in replicas:
        await r.ca.close()
        await r.store.close()


async def imported(tmp_path: Path, settings: EtcdSettings) -> CertificateAuthority:
    ca = CertificateAuthority.init(tmp_path / "state", CaSettings(TRUST_DOMAIN), system_clock)
    store = EtcdStore(settings, logging.getLogger("test.import"))
    await store.connect()
    try:
        await import_state_dir(store, settings.kek, tmp_path / "state", system_clock)
    finally:
        await store.close()
    return ca


async def etcd_ca_files(store: EtcdStore) -> dict[str, bytes]:
    values, _ = await store.get_prefix("ca/files/")
    return {v.key.removeprefix("ca/files/"): v.value for v in values}


async def until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def rotation_due(ca: ReplicatedCa):  # type: ignore[no-untyped-def]
    """An instant at which the schedule prepares and activates the next intermediate."""
    active = next(s for s in ca.status().slots if s.kind == "intermediate" and s.state == "active")
    return active.not_before + (active.not_after - active.not_before) * 0.7


def active_intermediates(files: dict[str, bytes]) -> list[str]:
    slots = json.loads(files["ca.json"])["slots"]
    return [s["id"] for s in slots if s["kind"] == "intermediate" and s["state"] == "active"]


def journal_generations(files: dict[str, bytes]) -> list[int]:
    """One entry per committed transition: the journal's generations, in order (each must appear once, in a row)."""
    seen: list[int] = []
    for line in files["journal.jsonl"].splitlines():
        generation = json.loads(line)["generation"]
        if not seen or seen[-1] != generation:
            seen.append(generation)
    return seen


async def test_replicas_follow_the_leaders_rotation_and_a_follower_commits_nothing(etcd: EtcdProcess, tmp_path: Path) -> None:
    settings = settings_for(etcd.endpoint, "/ca1")
    original = await imported(tmp_path, settings)
    a = await replica(settings, "a")
    b = await replica(settings, "b")
    try:
        assert a.ca.active_intermediate_id == b.ca.active_intermediate_id == original.active_intermediate_id
        await a.election.step()
        await b.election.step()
        assert a.election.is_leader and not b.election.is_leader
        due = rotation_due(b.ca)
        writes, revision = b.store.writes, await b.store.revision()
        assert await asyncio.to_thread(b.ca.tick, due) == []
        assert b.store.writes == writes and await b.store.revision() == revision  # a follower writes nothing

        events = await asyncio.to_thread(a.ca.tick, due)
        assert [(e.event, e.kind) for e in events] == [
            ("prepared", "intermediate"), ("activated", "intermediate"), ("retired", "intermediate")]
        new_id = a.ca.active_intermediate_id
        assert new_id != original.active_intermediate_id
        await until(lambda: b.ca.active_intermediate_id == new_id)
        assert b.ca.intermediate_certificate_pem == a.ca.intermediate_certificate_pem
        files = await etcd_ca_files(a.store)
        assert active_intermediates(files) == [new_id] and journal_generations(files) == [1, 2, 3]
        # the mirror is private memory: 0700, keys 0600
        assert stat.S_IMODE(os.stat(b.ca.mirror).st_mode) == 0o700
        keys = [p for p in b.ca.mirror.iterdir() if p.name.endswith("-key.pem")]
        assert keys and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys)
        if Path("/dev/shm").is_dir():
            assert b.ca.mirror.parent == Path("/dev/shm")
    finally:
        await close(a, b)


async def test_a_leader_frozen_past_its_lease_cannot_commit(etcd: EtcdProcess, tmp_path: Path) -> None:
    settings = settings_for(etcd.endpoint, "/ca2")
    await imported(tmp_path, settings)
    a = await replica(settings, "a", watch=False)  # A sleeps: nothing updates its mirror behind its back
    b = await replica(settings, "b")
    try:
        await a.election.step()
        assert a.election.is_leader
        due = rotation_due(a.ca)
        # A is SIGSTOPped: its lease ends while it sleeps, B takes over.
        held = await b.store.get("ca/leader")
        assert held is not None and held.value == b"a"
        await b.store.revoke_lease(held.lease)
        await b.election.step()
        assert b.election.is_leader and a.election.is_leader  # A has not noticed yet

        # A wakes and runs its tick on the very state B holds: only the fence stops it.
        before = await etcd_ca_files(b.store)
        assert await asyncio.to_thread(a.ca.tick, due) == []
        assert await etcd_ca_files(b.store) == before

        assert [e.event for e in await asyncio.to_thread(b.ca.tick, due)][-1] == "retired"
        b_state = await etcd_ca_files(b.store)
        # A tries again, now on a stale mirror too: refused, and it ends up with B's state.
        assert await asyncio.to_thread(a.ca.tick, due) == []
        after = await etcd_ca_files(b.store)
        assert after == b_state
        assert a.ca.active_intermediate_id == b.ca.active_intermediate_id == active_intermediates(after)[0]
        assert journal_generations(after) == [1, 2, 3]  # one rotation (prepare, activate), committed once
        await a.election.step()
        assert not a.election.is_leader
    finally:
        await close(a, b)


async def test_the_keyspace_holds_no_ca_key_in_clear(etcd: EtcdProcess, tmp_path: Path) -> None:
    settings = settings_for(etcd.endpoint, "/ca3")
    await imported(tmp_path, settings)
    a = await replica(settings, "a")
    try:
        await a.election.step()
        await asyncio.to_thread(a.ca.rotate_root, True)  # more keys: a new root and intermediate
        keys = {p.name: p.read_bytes() for p in a.ca.mirror.iterdir() if p.name.endswith("-key.pem")}
        assert len(keys) == 4
        everything = await asyncio.wait_for(a.store.kv.get(b"\0", range_end=b"\0"), 10)
        blob = b"".join(bytes(kv.key) + bytes(kv.value) for kv in everything.kvs)
        assert b"ca/files/root-" in blob
        assert b"PRIVATE KEY" not in blob
        for pem in keys.values():
            body = re.sub(rb"-----[^-]+-----|\s", b"", pem)
            der = base64.b64decode(body)
            assert der not in blob and body not in blob
    finally:
        await close(a)


async def test_a_wrong_kek_is_one_clear_error(etcd: EtcdProcess, tmp_path: Path) -> None:
    settings = settings_for(etcd.endpoint, "/ca4")
    await imported(tmp_path, settings)
    wrong = secrets.token_bytes(32)
    store = EtcdStore(settings, logging.getLogger("test"))
    await store.connect()
    try:
        with pytest.raises(CaStateError) as raised:
            await ReplicatedCa.open(store, wrong, system_clock, logging.getLogger("test"))
        message = str(raised.value)
        assert "/ca4/ca/files/" in message and "key-encryption key" in message and "\n" not in message
        assert wrong.hex() not in message and KEK.hex() not in message
        with pytest.raises(CaError, match="already holds a CA under /ca4/ca/"):
            await import_state_dir(store, KEK, tmp_path / "state", system_clock)
    finally:
        await store.close()


async def test_issuing_goes_on_while_etcd_is_down_and_rotation_resumes(tmp_path: Path) -> None:
    with EtcdProcess() as member:
        settings = settings_for(member.endpoint, "/ca5", timeout=1.0)
        await imported(tmp_path, settings)
        a = await replica(settings, "a")
        try:
            await a.election.step()
            assert a.election.is_leader
            member.kill()
            leaf = a.ca.issue_workload(SpiffeId.for_service_account(TRUST_DOMAIN, "default", "web"), timedelta(minutes=10))
            assert leaf.chain_pem.endswith(a.ca.intermediate_certificate_pem)
            with pytest.raises(CaError, match="CA transition waits for etcd") as raised:
                await asyncio.to_thread(a.ca.tick, rotation_due(a.ca))
            assert "\n" not in str(raised.value)
            await a.election.step()
            assert not a.election.is_leader
            assert await asyncio.to_thread(a.ca.tick, rotation_due(a.ca)) == []  # not leader: waits
            member.start()
            for _ in range(100):
                await a.election.step()
                if a.election.is_leader:
                    break
                await asyncio.sleep(0.2)
            assert a.election.is_leader
            old = a.ca.active_intermediate_id
            events = await asyncio.to_thread(a.ca.tick, rotation_due(a.ca))
            assert events and a.ca.active_intermediate_id != old
            assert active_intermediates(await etcd_ca_files(a.store)) == [a.ca.active_intermediate_id]
        finally:
            await close(a)


async def test_a_commit_returns_only_once_the_mirror_serves_it_even_when_the_watch_adopted_it_first(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    """The watch and the commit adopt the same state from two threads: the one that finds it already written waits
    for the other's reload (it returned at once, and a caller read the CA before it served the commit)."""
    settings = settings_for(etcd.endpoint, "/ca6")
    await imported(tmp_path, settings)
    a = await replica(settings, "a")
    b = await replica(settings, "b", watch=False)
    try:
        await a.election.step()
        await asyncio.to_thread(a.ca.tick, rotation_due(a.ca))
        files, revision = await read_store_files(b.store, KEK)
        reloading, release = threading.Event(), threading.Event()
        real_reload = b.ca._ca.reload_if_changed

        def slow_reload() -> bool:  # the real reload, held until released: the watch's thread in mid-reload
            reloading.set()
            release.wait(10)
            return real_reload()

        b.ca._ca.reload_if_changed = slow_reload  # type: ignore[method-assign]
        watch_adopt = asyncio.create_task(asyncio.to_thread(b.ca._adopt, files, revision))
        await asyncio.to_thread(reloading.wait, 10)
        commit_adopt = asyncio.create_task(asyncio.to_thread(b.ca._adopt, files, revision))
        await asyncio.sleep(0.3)
        assert not commit_adopt.done()
        release.set()
        assert await watch_adopt and not await commit_adopt
        assert b.ca.active_intermediate_id == a.ca.active_intermediate_id
    finally:
        await close(a, b)
