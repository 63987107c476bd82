"""Registered endpoints in a real etcd: what one replica's streams register reaches every replica's EDS view, a dead
replica's registrations leave with its lease, a replica that wakes from SIGSTOP deletes only its own keys, writes
missed while etcd was down are made when it is back, and a bad stored value is skipped in one bounded line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from etcd_store import connected
from test_endpoint_registration import BACKEND, FRONTEND, ep, mesh

from meshca.dev.etcd_process import EtcdProcess
from meshca.mesh.endpoints import RegisteredEndpoints, Registration, with_registered
from meshca.store.endpoints import ENDPOINTS_PREFIX, StoredRegistrations, registration_key
from meshca.store.etcd import EtcdSettings, EtcdStore

pytestmark = pytest.mark.e2e

LOGGER = "meshca.test.endpoints-store"
TTL = timedelta(seconds=2)


async def until(condition: object, timeout: float = 10.0) -> float:
    """Seconds it took `condition()` to hold."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not condition():  # type: ignore[operator]
        assert loop.time() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return loop.time() - started


def addresses(local: RegisteredEndpoints) -> set[tuple[str, str, int]]:
    """The registered endpoints EDS is built with (with_registered: those the mesh gives their identity)."""
    static = {(s.name, address, port) for s in mesh().services for address, port in s.endpoints}
    merged = with_registered(mesh(), local.snapshot())
    return {(s.name, address, port) for s in merged.services for address, port in s.endpoints} - static


@contextlib.asynccontextmanager
async def replica(endpoint: str, prefix: str, name: str, **settings: object) -> AsyncIterator[
        tuple[StoredRegistrations, RegisteredEndpoints, EtcdStore]]:
    """One replica's sink (its own etcd connection) and the registrations its EDS is built from."""
    async with connected(endpoint, prefix, lease_ttl=TTL, **settings) as store:
        local = RegisteredEndpoints(lambda: None)
        sink = await StoredRegistrations.open(store, name, local, mesh, logging.getLogger(f"{LOGGER}.{name}"),
                                              retry=0.2)
        try:
            yield sink, local, store
        finally:
            await sink.stop()


async def own_keys(store: EtcdStore, replica_id: str) -> list[str]:
    values, _ = await store.get_prefix(f"{ENDPOINTS_PREFIX}{replica_id}/")
    return sorted(value.key for value in values)


async def test_a_registration_at_one_replica_is_in_every_replicas_view_until_removed(
    etcd: EtcdProcess, etcd_prefix: str
) -> None:
    async with replica(etcd.endpoint, etcd_prefix, "a") as (a, local_a, store), \
            replica(etcd.endpoint, etcd_prefix, "b") as (b, local_b, _):
        await a.put("r1", Registration(BACKEND, (ep("backend", "10.0.0.7"), ep("agent-only", "10.0.0.7", 15007))))
        assert addresses(local_a) == {("backend", "10.0.0.7", 15006), ("agent-only", "10.0.0.7", 15007)}  # at once
        await until(lambda: addresses(local_b) == addresses(local_a))
        await keys_become(store, "a", [registration_key("a", "r1")])
        stored = await store.get(registration_key("a", "r1"))
        assert stored is not None and stored.lease != 0  # under the replica's lease
        assert Registration.from_json(json.loads(stored.value)) == a.live()["r1"]

        await a.put("r1", Registration(BACKEND, (ep("agent-only", "10.0.0.8", 15007),)))  # a request replaces the set
        await until(lambda: addresses(local_b) == {("agent-only", "10.0.0.8", 15007)})
        await b.put("r2", Registration(BACKEND, (ep("backend", "10.0.0.9"),)))
        await until(lambda: addresses(local_a) == {("agent-only", "10.0.0.8", 15007), ("backend", "10.0.0.9", 15006)})

        await a.remove("r1")
        await until(lambda: addresses(local_b) == {("backend", "10.0.0.9", 15006)})
        await keys_become(store, "a", [])
        await b.remove("r2")
        await until(lambda: local_a.snapshot() == ())


async def test_a_dead_replicas_registrations_leave_with_its_lease(etcd: EtcdProcess, etcd_prefix: str) -> None:
    async with replica(etcd.endpoint, etcd_prefix, "b") as (_, local_b, _):
        async with replica(etcd.endpoint, etcd_prefix, "dying") as (dying, _, _):
            await dying.put("r1", Registration(BACKEND, (ep("backend", "10.0.0.7"),)))
            await until(lambda: addresses(local_b) == {("backend", "10.0.0.7", 15006)})
            await dying.stop()  # killed: nothing refreshes its lease or deletes its keys any more
        seconds = await until(lambda: local_b.snapshot() == (), timeout=TTL.total_seconds() * 3)
        print(f"\nreplica dead: its registrations left the other replica's view {seconds:.1f} s later "
              f"(lease TTL {TTL.total_seconds():g} s)")


async def test_a_replica_waking_from_sigstop_deletes_only_its_own_keys(
    etcd: EtcdProcess, etcd_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP is simulated in process: the replica's tasks stop and start again, its state kept."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    registration = Registration(BACKEND, (ep("backend", "10.0.0.7"),))
    async with replica(etcd.endpoint, etcd_prefix, "a") as (a, _, store), \
            replica(etcd.endpoint, etcd_prefix, "b") as (b, local_b, _):
        await a.put("stream-at-a", registration)
        await until(lambda: addresses(local_b) == {("backend", "10.0.0.7", 15006)})
        await a.stop()  # stopped: its lease expires
        await until(lambda: local_b.snapshot() == (), timeout=TTL.total_seconds() * 3)
        await b.put("stream-at-b", registration)  # the agent registered again at B
        await keys_become(store, "b", [registration_key("b", "stream-at-b")])

        a.start()  # woken: its stream to the agent is found dead and ends
        await a.remove("stream-at-a")
        await until(lambda: not a.live())
        await asyncio.sleep(TTL.total_seconds() / 2)
        assert await own_keys(store, "a") == []
        assert await own_keys(store, "b") == [registration_key("b", "stream-at-b")]
        assert addresses(local_b) == {("backend", "10.0.0.7", 15006)}


async def test_a_registration_made_while_etcd_is_down_is_written_when_it_is_back(
    etcd_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with EtcdProcess() as member:
        async with replica(member.endpoint, etcd_prefix, "a", timeout=1.0) as (a, local_a, store):
            await a.put("before", Registration(BACKEND, (ep("backend", "10.0.0.7"),)))
            await until(lambda: a.failing is False and not a._wake.is_set())
            member.kill()
            await asyncio.sleep(0.5)
            await a.put("during", Registration(BACKEND, (ep("backend", "10.0.0.8"),)))
            assert addresses(local_a) == {("backend", "10.0.0.7", 15006), ("backend", "10.0.0.8", 15006)}
            await until(lambda: a.failing)
            await asyncio.sleep(3.0)  # retried every 0.2 s meanwhile
            member.start()
            await until(lambda: not a.failing, timeout=20)
            await keys_become(store, "a", [registration_key("a", "before"), registration_key("a", "during")])
            assert addresses(local_a) == {("backend", "10.0.0.7", 15006), ("backend", "10.0.0.8", 15006)}
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER)]
    assert sum("not written to etcd" in line for line in lines) == 1, lines  # one line per outage, not per retry
    assert sum("written to etcd again" in line for line in lines) == 1, lines


async def test_a_bad_stored_value_is_skipped_in_one_bounded_line_and_the_rest_kept(
    etcd: EtcdProcess, etcd_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with connected(etcd.endpoint, etcd_prefix) as writer:
        good = Registration(BACKEND, (ep("backend", "10.0.0.7"),))
        await writer.put(registration_key("x", "good"), json.dumps(good.to_json()).encode())
        await writer.put(registration_key("x", "not-json"), b"\xff" + b"z" * 5000)
        bad_address = {"spiffe_id": BACKEND.uri, "endpoints": [{"service": "backend", "address": "h" * 300, "port": 1}]}
        await writer.put(registration_key("x", "bad-address"), json.dumps(bad_address).encode())
        unknown = Registration(BACKEND, (ep("no-such-service", "10.0.0.5"),))
        await writer.put(registration_key("x", "unknown-service"), json.dumps(unknown.to_json()).encode())
        await writer.put(f"{ENDPOINTS_PREFIX}no-registration-id", b"{}")
        async with replica(etcd.endpoint, etcd_prefix, "b") as (b, local_b, _):
            assert addresses(local_b) == {("backend", "10.0.0.7", 15006)}
            other = Registration(FRONTEND, (ep("frontend", "10.0.0.3", 15008),))
            await writer.put(registration_key("x", "later"), json.dumps(other.to_json()).encode())
            await until(lambda: ("frontend", "10.0.0.3", 15008) in addresses(local_b))
            await b.sync()  # a re-read logs nothing new
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER)]
    assert len(lines) == 4, lines
    assert all(len(line) < 600 for line in lines), lines
    assert any("not-json" in line and "skipped" in line for line in lines)
    assert any("bad-address" in line and "is not an IP address" in line for line in lines)
    assert any("unknown-service" in line and "not in the mesh" in line for line in lines)


async def keys_become(store: EtcdStore, replica_id: str, keys: list[str], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (found := await own_keys(store, replica_id)) != keys:
        assert loop.time() < deadline, f"{replica_id}'s keys are {found}, not {keys}"
        await asyncio.sleep(0.02)


def test_a_replica_id_with_a_slash_is_refused() -> None:
    store = EtcdStore(EtcdSettings(("127.0.0.1:1",)), logging.getLogger(LOGGER))
    with pytest.raises(ValueError, match="without '/'"):
        StoredRegistrations(store, "a/b", RegisteredEndpoints(lambda: None), mesh, logging.getLogger(LOGGER))
