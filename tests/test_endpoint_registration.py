"""Endpoints that register themselves: the ownership check, the merge with static endpoints, removal at stream end."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from fakes import T0, FakeClock, FakeTokenAuthenticator

from meshca.app import MeshcaApp
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.identity.spiffe import SpiffeId
from meshca.mesh.endpoints import (
    EndpointRefused,
    EndpointServicer,
    RegisteredEndpoint,
    RegisteredEndpoints,
    Registration,
    RegistrationTiming,
    add_to_server,
    check_registration,
    registered_only_services,
    with_registered,
)
from meshca.mesh.model import MeshConfig, parse_mesh_config
from meshca.sds.workloads import MeshPublisher
from meshca.v1 import endpoints_pb2, endpoints_pb2_grpc
from meshca.xds.server import NodeInfo
from meshca.xds.snapshot import ResourceType

TD = "mesh.test"
LOG = logging.getLogger("test.endpoints")
BACKEND = SpiffeId.for_service_account(TD, "shop", "backend")
FRONTEND = SpiffeId.for_service_account(TD, "shop", "frontend")
MESH = {
    "trust_domain": TD,
    "services": {
        "backend": {"namespace": "shop", "inbound": {"port": 15006, "app": "127.0.0.1:8080"},
                    "endpoints": ["10.0.0.1:15006"]},
        "agent-only": {"namespace": "shop", "service_account": "backend",
                       "inbound": {"port": 15007, "app": "127.0.0.1:8081"}, "endpoints": []},
        "frontend": {"namespace": "shop", "inbound": {"port": 15008, "app": "127.0.0.1:8082"},
                     "outbound": {"port": 15001}},
        "client": {"namespace": "shop", "service_account": "frontend", "outbound": {"port": 15002}},
    },
}


def mesh() -> MeshConfig:
    return parse_mesh_config(Path("mesh.yaml"), yaml.safe_load(yaml.safe_dump(MESH)))


def ep(service: str, address: str = "10.0.0.9", port: int = 15006) -> RegisteredEndpoint:
    return RegisteredEndpoint(service, address, port)


def refusal(spiffe_id: SpiffeId, *endpoints: RegisteredEndpoint) -> EndpointRefused:
    with pytest.raises(EndpointRefused) as caught:
        check_registration(mesh(), spiffe_id, endpoints)
    return caught.value


def test_an_identity_registers_only_the_services_the_mesh_gives_it() -> None:
    assert check_registration(mesh(), BACKEND, [ep("backend"), ep("agent-only"), ep("backend", port=1)]) == (
        "agent-only", "backend"
    )
    other = refusal(FRONTEND, ep("frontend"), ep("backend"))
    assert other.code is grpc.StatusCode.PERMISSION_DENIED
    assert other.message == (
        f"endpoints[1]: service 'backend' is served by {BACKEND.uri}, not by {FRONTEND.uri}"
    )
    unknown = refusal(BACKEND, ep("nope"))
    assert (unknown.code, unknown.message) == (grpc.StatusCode.PERMISSION_DENIED,
                                               "endpoints[0]: service 'nope' is not in the mesh")
    assert "has no 'inbound'" in refusal(FRONTEND, ep("client")).message
    bad_address = refusal(BACKEND, ep("backend", address="backend.local"))
    assert bad_address.code is grpc.StatusCode.INVALID_ARGUMENT and "endpoints[0].address" in bad_address.message
    assert "endpoints[0].port: 0" in refusal(BACKEND, ep("backend", port=0)).message
    with pytest.raises(EndpointRefused, match="not in the mesh"):
        check_registration(None, BACKEND, [ep("backend")])  # no mesh applied yet


def test_registered_endpoints_follow_the_static_ones_and_count_only_for_their_owner() -> None:
    config = mesh()
    merged = with_registered(config, [
        Registration(BACKEND, (ep("backend", "10.0.0.9"), ep("backend", "10.0.0.1"), ep("agent-only", "fd00::7"))),
        Registration(BACKEND, (ep("backend", "10.0.0.2"),)),
        Registration(FRONTEND, (ep("backend", "10.6.6.6"),)),  # accepted once, the mesh changed since: ignored
    ])
    backend, agent_only = merged.service("backend"), merged.service("agent-only")
    assert backend is not None and agent_only is not None
    assert backend.endpoints == (("10.0.0.1", 15006), ("10.0.0.2", 15006), ("10.0.0.9", 15006))
    assert agent_only.endpoints == (("fd00::7", 15006),)
    assert merged.service("frontend") is config.service("frontend")  # unchanged: the same object for the memo
    assert with_registered(config, []) is config


def cla(app: MeshcaApp, cluster: str) -> list[tuple[str, int]]:
    snapshot = app.cache.get(MeshPublisher.snapshot_key(FRONTEND))
    assert snapshot is not None
    resource = snapshot.of_type(ResourceType.ENDPOINT).resources[cluster]
    decoded = ClusterLoadAssignment().parse(resource.payload)
    return [(lb.endpoint.address.socket_address.address, lb.endpoint.address.socket_address.port_value)
            for group in decoded.endpoints for lb in group.lb_endpoints]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[MeshcaApp, endpoints_pb2_grpc.EndpointServiceStub]]:
    clock = FakeClock(T0)
    ca = CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain=TD), clock)
    app = MeshcaApp(ca, [], clock, LOG)
    app.apply_mesh_config(mesh())
    app.publisher.ensure_identity(FRONTEND)
    server = grpc.aio.server()
    tokens = FakeTokenAuthenticator({"backend-token": BACKEND, "frontend-token": FRONTEND})
    add_to_server(server, EndpointServicer(tokens, app.registration_sink, lambda: app.mesh_config, LOG, grace=GRACE,
                                           clock=clock))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield app, endpoints_pb2_grpc.EndpointServiceStub(channel)
    finally:
        await server.stop(None)


GRACE = timedelta(seconds=0.4)


def request(*endpoints: tuple[str, str, int]) -> endpoints_pb2.RegisterRequest:
    return endpoints_pb2.RegisterRequest(
        endpoints=[endpoints_pb2.Endpoint(service=s, address=a, port=p) for s, a, p in endpoints]
    )


async def eventually(check: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_registration_is_in_eds_while_its_stream_lives(
    served: tuple[MeshcaApp, endpoints_pb2_grpc.EndpointServiceStub],
) -> None:
    app, stub = served
    assert cla(app, "outbound|backend") == [("10.0.0.1", 15006)]
    assert cla(app, "outbound|agent-only") == []
    memo_before = app.cache.get(MeshPublisher.snapshot_key(FRONTEND))
    assert memo_before is not None
    listeners_before = memo_before.of_type(ResourceType.LISTENER).resources
    call = stub.Register(metadata=(("authorization", "Bearer backend-token"),))
    await call.write(request(("agent-only", "10.0.0.7", 15007), ("backend", "10.0.0.7", 15006)))
    answer = await call.read()
    assert answer.spiffe_id == BACKEND.uri and list(answer.accepted_services) == ["agent-only", "backend"]
    assert cla(app, "outbound|backend") == [("10.0.0.1", 15006), ("10.0.0.7", 15006)]
    assert cla(app, "outbound|agent-only") == [("10.0.0.7", 15007)]
    after = app.cache.get(MeshPublisher.snapshot_key(FRONTEND))
    assert after is not None
    for name, listener in after.of_type(ResourceType.LISTENER).resources.items():
        assert listener is listeners_before[name]  # the memo: only EDS (and the clusters beside it) re-encoded
    await call.write(request(("agent-only", "10.0.0.8", 15007)))  # replaces the stream's whole set
    await call.read()
    assert cla(app, "outbound|backend") == [("10.0.0.1", 15006)]
    assert cla(app, "outbound|agent-only") == [("10.0.0.8", 15007)]
    call.cancel()
    await eventually(lambda: cla(app, "outbound|agent-only") == [])
    assert app.endpoints.snapshot() == ()


async def test_a_refused_endpoint_ends_the_stream_naming_the_service(
    served: tuple[MeshcaApp, endpoints_pb2_grpc.EndpointServiceStub],
) -> None:
    app, stub = served
    call = stub.Register(metadata=(("authorization", "Bearer frontend-token"),))
    await call.write(request(("frontend", "10.0.0.3", 15008)))
    await call.read()
    assert cla(app, "outbound|frontend") == [("127.0.0.1", 15008), ("10.0.0.3", 15008)]
    await call.write(request(("frontend", "10.0.0.3", 15008), ("backend", "10.0.0.3", 15006)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "service 'backend' is served by" in (caught.value.details() or "")
    await eventually(lambda: cla(app, "outbound|frontend") == [("127.0.0.1", 15008)])  # its earlier set went too
    unauthenticated = stub.Register(metadata=(("authorization", "Bearer nope"),))
    await unauthenticated.write(request(("backend", "10.0.0.3", 15006)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unauthenticated.read()
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_the_collection_notifies_only_on_change() -> None:
    changes: list[int] = []
    collection = RegisteredEndpoints(lambda: changes.append(1))
    registration = Registration(BACKEND, (ep("backend"),))
    asyncio.run(collection.put("a", registration))
    asyncio.run(collection.put("a", registration))
    collection.replace_all({"a": registration})
    asyncio.run(collection.remove("b"))
    assert len(changes) == 1 and collection.count() == 1
    asyncio.run(collection.remove("a"))
    assert len(changes) == 2 and collection.snapshot() == ()
    assert Registration.from_json(registration.to_json()) == registration


async def test_an_ended_registration_stays_for_its_grace_so_a_restarting_agent_leaves_no_gap(
    served: tuple[MeshcaApp, endpoints_pb2_grpc.EndpointServiceStub],
) -> None:
    app, stub = served
    seen: list[list[tuple[str, int]]] = []

    async def register() -> grpc.aio.StreamStreamCall:
        call = stub.Register(metadata=(("authorization", "Bearer backend-token"),))
        await call.write(request(("agent-only", "10.0.0.7", 15007)))
        await call.read()
        return call

    first = await register()
    first.cancel()  # the agent stops (or dies): the kernel ends its stream
    await asyncio.sleep(GRACE.total_seconds() / 4)
    seen.append(cla(app, "outbound|agent-only"))
    second = await register()  # the restarted agent registers again within the grace
    for _ in range(6):  # past the first stream's grace: the second stream's registration carries on, no gap
        await asyncio.sleep(GRACE.total_seconds() / 4)
        seen.append(cla(app, "outbound|agent-only"))
    assert seen == [[("10.0.0.7", 15007)]] * 7
    assert len(app.endpoints.snapshot()) == 1  # the first stream's registration was removed after its grace
    ended = time.monotonic()
    second.cancel()
    await eventually(lambda: cla(app, "outbound|agent-only") == [])
    assert time.monotonic() - ended >= GRACE.total_seconds() * 0.9  # removed after the grace, not before


async def test_an_empty_request_removes_the_streams_endpoints_at_once(
    served: tuple[MeshcaApp, endpoints_pb2_grpc.EndpointServiceStub],
) -> None:
    app, stub = served
    call = stub.Register(metadata=(("authorization", "Bearer backend-token"),))
    await call.write(request(("agent-only", "10.0.0.7", 15007)))
    await call.read()
    assert cla(app, "outbound|agent-only") == [("10.0.0.7", 15007)]
    await call.write(request())  # e.g. the agent's workload went away: deregistered without waiting for a grace
    answer = await call.read()
    assert list(answer.accepted_services) == []
    assert cla(app, "outbound|agent-only") == []
    call.cancel()


def test_registered_only_services_are_those_with_an_empty_endpoints_list() -> None:
    assert registered_only_services(mesh()) == ("agent-only",)
    assert registered_only_services(None) == ()


async def test_a_restarted_meshca_holds_only_proxies_that_come_back_with_config_for_its_warmup(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    ca = CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain=TD), clock)
    warmup = timedelta(seconds=0.5)
    app = MeshcaApp(ca, [], clock, LOG, registration=RegistrationTiming(warmup=warmup))
    app.apply_mesh_config(mesh())
    await app.start("127.0.0.1", 0, None)
    try:
        loop = asyncio.get_running_loop()

        async def held(node: NodeInfo) -> float:
            started = loop.time()
            await app._hold_in_warmup(node)
            return loop.time() - started

        assert await held(NodeInfo("fresh", "c")) < 0.05  # a first start is served at once
        resumed = NodeInfo("back", "c", resumed=True)
        assert 0.3 < await held(resumed) < 0.7  # a reconnect waits for the agents to register again
        assert await held(resumed) < 0.05  # after the warmup nobody waits
    finally:
        await app.stop(0)
    app = MeshcaApp(ca, [], clock, LOG, registration=RegistrationTiming(warmup=warmup))
    static_only = parse_mesh_config(Path("mesh.yaml"), {"trust_domain": TD, "services": {
        "backend": MESH["services"]["backend"]}})  # type: ignore[index]
    app.apply_mesh_config(static_only)
    await app.start("127.0.0.1", 0, None)
    try:
        started = asyncio.get_running_loop().time()
        await app._hold_in_warmup(NodeInfo("back", "c", resumed=True))
        assert asyncio.get_running_loop().time() - started < 0.05  # nothing registered-only: nothing to wait for
    finally:
        await app.stop(0)


def test_a_first_request_with_config_the_proxy_holds_marks_a_reconnect() -> None:
    from meshca.v1 import xds_wire_pb2
    from meshca.xds.server import _decode

    def node_of(message: object, wire: type) -> NodeInfo | None:
        return _decode(message.SerializeToString(), wire, None).node  # type: ignore[attr-defined]

    sotw = xds_wire_pb2.DiscoveryRequest
    delta = xds_wire_pb2.DeltaDiscoveryRequest
    first = sotw(type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster")
    first.node.id = "n"
    again = sotw()
    again.CopyFrom(first)
    again.version_info = "abc"
    assert node_of(first, sotw).resumed is False  # type: ignore[union-attr]
    assert node_of(again, sotw).resumed is True  # type: ignore[union-attr]
    fresh = delta(type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster")
    fresh.node.id = "n"
    back = delta()
    back.CopyFrom(fresh)
    back.initial_resource_versions["outbound|backend"] = "v1"
    assert node_of(fresh, delta).resumed is False  # type: ignore[union-attr]
    assert node_of(back, delta).resumed is True  # type: ignore[union-attr]


async def test_registrations_arriving_during_a_rebuild_fold_into_one_following_rebuild(
    served: tuple[MeshcaApp, endpoints_pb2_grpc.EndpointServiceStub],
) -> None:
    app, stub = served
    published: list[int] = []
    release = threading.Event()
    original = app.publisher.set_mesh

    def slow_first(*args: Any, **kwargs: Any) -> Any:
        published.append(1)
        if len(published) == 1:
            release.wait(5)  # the first rebuild is still running while every other registration arrives
        return original(*args, **kwargs)

    app.publisher.set_mesh = slow_first  # type: ignore[method-assign]
    n = 50
    calls = [stub.Register(metadata=(("authorization", "Bearer backend-token"),)) for _ in range(n)]
    for i, call in enumerate(calls):
        await call.write(request(("agent-only", f"10.0.1.{i + 1}", 15007)))
    await eventually(lambda: app.endpoints.count() == n)
    release.set()
    for call in calls:
        assert (await call.read()).accepted_services == ["agent-only"]  # answered once published
    expected = sorted((f"10.0.1.{i + 1}", 15007) for i in range(n))
    assert sorted(cla(app, "outbound|agent-only")) == expected
    assert len(published) == 2, f"{len(published)} rebuilds for {n} registrations"
    last = stub.Register(metadata=(("authorization", "Bearer backend-token"),))
    await last.write(request(("agent-only", "10.0.2.1", 15007)))
    await last.read()  # a lone change: rebuilt at once, once
    assert ("10.0.2.1", 15007) in cla(app, "outbound|agent-only") and len(published) == 3
    for call in [*calls, last]:
        call.cancel()
    await eventually(lambda: cla(app, "outbound|agent-only") == [])


async def test_addresses_are_registered_in_canonical_form(
    served: tuple[MeshcaApp, endpoints_pb2_grpc.EndpointServiceStub],
) -> None:
    app, stub = served
    call = stub.Register(metadata=(("authorization", "Bearer backend-token"),))
    await call.write(request(("agent-only", "fd00::0:7", 15007), ("agent-only", "FD00:0::7", 15007)))
    await call.read()
    assert cla(app, "outbound|agent-only") == [("fd00::7", 15007)]  # one endpoint, as Envoy would compare them
    call.cancel()



def test_a_stored_registration_is_read_in_canonical_form() -> None:
    import json

    from meshca.store.endpoints import ENDPOINTS_PREFIX, parse_stored

    raw = json.dumps({"spiffe_id": BACKEND.uri, "endpoints": [
        {"service": "agent-only", "address": "FD00::0:7", "port": 15007}]}).encode()
    registration, why = parse_stored(f"{ENDPOINTS_PREFIX}replica-a/r1", raw, mesh())
    assert why is None and registration is not None
    assert registration.endpoints[0].address == "fd00::7"
