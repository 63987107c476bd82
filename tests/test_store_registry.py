"""The fleet's proxy registry in etcd: two in-process replicas each see both replicas' proxies in /status, a push to
many streams costs a replica a few etcd writes, a dead replica leaves the view with its lease, and a summary
over etcd's request limit is split. Against a real etcd member and real meshca xDS servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import urllib.request
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from etcd_store import connected as store_connection
from meshca_harness import RunningMeshca, running_meshca
from xds_client import XdsClient

from meshca.admin.server import status_json
from meshca.cli.status import format_status
from meshca.clock import system_clock
from meshca.dev.etcd_process import EtcdProcess
from meshca.mesh.model import parse_mesh_config
from meshca.store.etcd import EtcdSettings, EtcdStore, StoreUnavailable
from meshca.store.registry import CHUNK_BYTES, RegistryPublisher, encode_summary
from meshca.xds.snapshot import ResourceType

pytestmark = pytest.mark.e2e

CDS = ResourceType.CLUSTER.type_url
LOGGER = "meshca.test.registry"



@pytest.fixture
def prefix(etcd_prefix: str) -> str:
    return etcd_prefix


def connected(endpoint: str, prefix: str) -> contextlib.AbstractAsyncContextManager[EtcdStore]:
    return store_connection(endpoint, prefix, lease_ttl=timedelta(seconds=2))


@contextlib.asynccontextmanager
async def publishing(store: EtcdStore, meshca: RunningMeshca, replica_id: str,
                     interval: float = 0.05) -> AsyncIterator[RegistryPublisher]:
    """The publisher `meshca serve` runs with a store (meshca.cli.replica), on an in-process replica."""
    app = meshca.app
    publisher = RegistryPublisher(store, lambda: status_json(app.registry), app.registry.changes, system_clock,
                                  logging.getLogger(LOGGER), replica_id=replica_id, interval=interval)
    app.observability.set_fleet(publisher)
    task = asyncio.create_task(publisher.run())
    try:
        yield publisher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await publisher.close()


def mesh(*extra: str) -> object:
    """frontend -> backend, plus a service per name in `extra` (each adds a cluster: a CDS push)."""
    services = {name: {"namespace": "shop", "inbound": {"port": 15006, "app": "127.0.0.1:8080"}}
                for name in ("backend", *extra)}
    return parse_mesh_config(Path("mesh.yaml"), {
        "trust_domain": "mesh.test",
        "services": {**services, "frontend": {"namespace": "shop", "outbound": {"port": 15001}}},
        "routes": [{"prefix": "/", "to": "backend"}],
    })


def reader(store: EtcdStore) -> RegistryPublisher:
    """Another replica's view of the store (it publishes nothing itself)."""
    return RegistryPublisher(store, list, lambda: 0, system_clock, logging.getLogger(LOGGER), replica_id="reader")


async def synced_stream(meshca: RunningMeshca, node_id: str) -> XdsClient:
    client = XdsClient(meshca.channel(), meshca.token("shop", "frontend", node_id=node_id))
    await client.send(CDS, node_id=node_id)
    await client.ack(await client.recv())
    return client


async def until(condition: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def nodes(view: list[dict[str, object]]) -> set[tuple[object, object]]:
    return {(proxy["node_id"], proxy["replica"]) for proxy in view}


async def test_each_replica_shows_every_replicas_proxies_and_a_stopped_one_leaves(
    tmp_path: Path, etcd: EtcdProcess, prefix: str
) -> None:
    async with running_meshca(tmp_path / "a") as a, running_meshca(tmp_path / "b") as b, \
            connected(etcd.endpoint, prefix) as store_a, connected(etcd.endpoint, prefix) as store_b:
        a.app.publisher.set_mesh([])
        b.app.publisher.set_mesh([])
        streams = [await synced_stream(a, "a-1"), await synced_stream(b, "b-1"), await synced_stream(b, "b-2")]
        everyone = {("a-1", "replica-a"), ("b-1", "replica-b"), ("b-2", "replica-b")}
        async with publishing(store_a, a, "replica-a") as pub_a:
            async with publishing(store_b, b, "replica-b") as pub_b:
                await until(lambda: pub_a.last_proxies == 1 and pub_b.last_proxies == 2)
                assert nodes(await pub_b.fleet_async(status_json(b.app.registry))) == everyone
                # A's admin /status over HTTP (its own thread, as `meshca status` reads it)
                port = a.app.observability.start("127.0.0.1", 0)
                url = f"http://127.0.0.1:{port}/status"
                view = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read()))
                assert nodes(view) == everyone
                table = format_status(view).splitlines()
                assert table[0].split()[:3] == ["NODE", "IDENTITY", "REPLICA"] and "replica-b" in table[2]
            # B stopped (SIGTERM): it revoked its lease, so it is gone from A's view at once
            assert nodes(await pub_a.fleet_async(status_json(a.app.registry))) == {("a-1", "replica-a")}
            a.app.observability.stop()
        for client in streams:
            client.close()


async def test_a_killed_replica_leaves_the_view_when_its_lease_expires(
    tmp_path: Path, etcd: EtcdProcess, prefix: str
) -> None:
    async with running_meshca(tmp_path) as meshca, connected(etcd.endpoint, prefix) as store, \
            connected(etcd.endpoint, prefix) as other:
        meshca.app.publisher.set_mesh([])
        client = await synced_stream(meshca, "n-1")
        app = meshca.app
        dying = RegistryPublisher(store, lambda: status_json(app.registry), app.registry.changes, system_clock,
                                  logging.getLogger(LOGGER), replica_id="dying")
        assert await dying.publish_once()
        watcher = reader(other)
        assert nodes(await watcher.fleet_async([])) == {("n-1", "dying")}
        # killed: nothing refreshes its lease any more (TTL 2 s)
        started = asyncio.get_running_loop().time()
        while nodes(await watcher.fleet_async([])):
            assert asyncio.get_running_loop().time() - started < 6, "the dead replica is still in the view"
            await asyncio.sleep(0.2)
        client.close()


async def test_a_push_to_many_streams_is_a_few_etcd_writes(
    tmp_path: Path, etcd: EtcdProcess, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    streams_n = 40
    async with running_meshca(tmp_path) as meshca, connected(etcd.endpoint, prefix) as store:
        app = meshca.app
        app.apply_mesh_config(mesh())  # type: ignore[arg-type]
        clients = [await synced_stream(meshca, f"node-{i}") for i in range(streams_n)]
        async with publishing(store, meshca, "replica-a", interval=0.2) as publisher:
            await until(lambda: publisher.last_proxies == streams_n)
            await asyncio.sleep(0.5)
            before = store.writes
            app.apply_mesh_config(mesh("cart"))  # type: ignore[arg-type]: a push to every stream
            for client in clients:
                await client.ack(await client.recv())
            def acked() -> set[str | None]:
                return {p.acked.get(ResourceType.CLUSTER) for p in app.registry.snapshot()}

            await until(lambda: len(acked()) == 1)
            await asyncio.sleep(1.0)  # five intervals: whatever the push causes is written by now
            writes = store.writes - before
            view = await reader(store).fleet_async([])  # what the others read: every stream ACKed the push
            assert {proxy["types"]["CDS"]["acked"] for proxy in view} == acked()  # type: ignore[index]
        assert 1 <= writes <= 3, writes
        sample = status_json(app.registry)[0]
        for client in clients:
            client.close()
    with capsys.disabled():
        print(f"\nregistry: a push to {streams_n} streams cost {writes} etcd write(s)")
    # the size at 10,000 proxies: the real status of one stream, every type sent and ACKed as an Envoy has them
    # (a version shared by all plus each identity's own part; SDS each identity's own), unique names, connection
    # times over an hour, and 1% with a NACK message
    proxies = []
    shared = {name: secrets.token_hex(8) for name in sample["types"]}
    for i in range(10_000):
        proxy = json.loads(json.dumps(sample))
        proxy.update(stream_id=i, node_id=f"frontend-{i}-{secrets.token_hex(3)}",
                     identity=f"spiffe://mesh.test/ns/ns-{i % 50}/sa/sa-{i}",
                     connected_at=f"2025-01-01T10:{i % 60:02d}:{secrets.randbelow(60):02d}.{secrets.randbelow(10**6):06d}+00:00")
        for name, entry in proxy["types"].items():
            own = secrets.token_hex(8)  # conservative: each type's own part differs
            version = own if name == "SDS" else f"{shared[name]}+{own}"
            entry.update(sent=version, acked=version)
        if i % 100 == 0:
            proxy["last_nack"] = {"type": "LDS", "rejected_version": secrets.token_hex(8), "message": "x" * 200,
                                  "at": proxy["connected_at"]}
        proxies.append(proxy)
    size = len(encode_summary("replica-a", "2025-01-01T00:00:00+00:00", proxies))
    with capsys.disabled():
        print(f"registry: 10,000 proxies = {size:,} bytes compressed ({size / 10_000:.0f} bytes per proxy, "
              f"{len(json.dumps(proxies)) / 10_000:.0f} uncompressed); split above {CHUNK_BYTES:,}")
    assert size / 10_000 < 200
    async with connected(etcd.endpoint, prefix) as store:  # etcd takes it (split when over CHUNK_BYTES)
        big = RegistryPublisher(store, lambda: proxies, lambda: 1, system_clock, logging.getLogger(LOGGER),
                                replica_id="big")
        assert await big.publish_once()
        assert len(await reader(store).fleet_async([])) == 10_000
        with capsys.disabled():
            print(f"registry: writing it took {big.registry_writes} etcd requests")
        await big.close()


async def test_a_summary_over_the_chunk_size_is_split_and_read_whole(
    tmp_path: Path, etcd: EtcdProcess, prefix: str
) -> None:
    many = [{"node_id": f"n-{i}", "identity": secrets.token_hex(16), "stream_id": i, "types": {}} for i in range(400)]
    current = list(many)
    async with connected(etcd.endpoint, prefix) as store, connected(etcd.endpoint, prefix) as other:
        publisher = RegistryPublisher(store, lambda: current, lambda: len(current), system_clock,
                                      logging.getLogger(LOGGER), replica_id="big", chunk_bytes=4_000)
        assert await publisher.publish_once()
        keys = {value.key for value in (await store.get_prefix("replicas/"))[0]}
        assert publisher.last_bytes > 4_000 and len(keys) >= 3 and "replicas/big/0" in keys
        assert len(await reader(other).fleet_async([])) == 400
        current = many[:3]
        assert await publisher.publish_once()
        keys = {value.key for value in (await store.get_prefix("replicas/"))[0]}
        assert keys == {"replicas/big"}  # the chunks of the bigger summary were deleted
        assert [p["node_id"] for p in await reader(other).fleet_async([])] == ["n-0", "n-1", "n-2"]
        assert not await publisher.publish_once()  # nothing changed: no write
        await publisher.close()
        assert await reader(other).fleet_async([]) == []


async def test_a_summary_not_written_while_etcd_was_down_is_written_when_it_is_back(prefix: str) -> None:
    current = [{"node_id": "n-1", "stream_id": 1}]
    with EtcdProcess() as member:
        store = EtcdStore(EtcdSettings((member.endpoint,), prefix=prefix, timeout=1.0), logging.getLogger(LOGGER))
        await store.connect()
        try:
            publisher = RegistryPublisher(store, lambda: current, lambda: len(current), system_clock,
                                          logging.getLogger(LOGGER), replica_id="r1")
            assert await publisher.publish_once()
            member.kill()
            current = [*current, {"node_id": "n-2", "stream_id": 2}]
            with pytest.raises(StoreUnavailable):
                await publisher.publish_once()
            member.start()
            for _ in range(100):
                with contextlib.suppress(StoreUnavailable):
                    assert await publisher.publish_once()  # nothing changed since the failed write: written anyway
                    break
                await asyncio.sleep(0.1)
            assert [p["node_id"] for p in await reader(store).fleet_async([])] == ["n-1", "n-2"]
        finally:
            await store.close()


async def test_the_fleet_view_answers_at_once_with_etcd_down_and_warns_once(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """/status (the admin thread) must not wait out the store's 5 s timeout on each call while etcd is down."""
    local = [{"node_id": "n-1", "stream_id": 1}]
    with EtcdProcess() as member:
        store = EtcdStore(EtcdSettings((member.endpoint,), prefix=prefix), logging.getLogger(LOGGER))
        await store.connect()
        try:
            view = reader(store)
            assert await asyncio.to_thread(view.fleet, local) == [{**local[0], "replica": "reader"}]
            member.kill()
            loop = asyncio.get_running_loop()
            started = loop.time()
            first = await asyncio.to_thread(view.fleet, local)  # etcd still believed reachable: a bounded wait
            first_took = loop.time() - started
            with contextlib.suppress(StoreUnavailable):
                await store.revision()  # what the leader election's next step finds out
            started = loop.time()
            for _ in range(5):
                assert await asyncio.to_thread(view.fleet, local) == first
            assert [p["node_id"] for p in first] == ["n-1"]
            assert first_took < 3.0 and loop.time() - started < 0.5, (first_took, loop.time() - started)
            assert len([r for r in caplog.records if "fleet view" in r.getMessage()]) == 1
        finally:
            await store.close()
