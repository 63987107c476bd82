"""Integration: the real meshca gRPC server (TLS, JWT gate, SDS) driven by a Python delta xDS client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from envoy_data_plane.envoy.service.discovery.v3 import DeltaDiscoveryResponse
from meshca_harness import TRUST_DOMAIN, RunningMeshca, running_meshca
from test_xds_server import mesh
from xds_client import DeltaXdsClient

from meshca.mesh import resources as r
from meshca.xds.delta import DeltaResponse
from meshca.xds.server import DELTA_PER_TYPE_METHODS, frame_delta_response
from meshca.xds.snapshot import ResourceType

CDS = ResourceType.CLUSTER.type_url
EDS = ResourceType.ENDPOINT.type_url
SDS = ResourceType.SECRET.type_url


@pytest.fixture
async def meshca(tmp_path: Path) -> AsyncIterator[RunningMeshca]:
    async with running_meshca(tmp_path) as running:
        running.app.publisher.set_mesh(mesh({"backend": 8080}))
        yield running


def by_name(response: DeltaDiscoveryResponse) -> dict[str, tuple[str, bytes]]:
    """name -> (resource version, resource bytes)."""
    return {res.name: (res.version, res.resource.value) for res in response.resources}


def open_client(meshca: RunningMeshca, ns: str = "shop", sa: str = "frontend", node_id: str = "node-1") -> DeltaXdsClient:
    return DeltaXdsClient(meshca.channel(), meshca.token(ns, sa, node_id=node_id))


async def exchange(client: DeltaXdsClient, type_url: str, subscribe: tuple[str, ...] = ()) -> DeltaDiscoveryResponse:
    """Subscribe, receive the answer and ACK it."""
    await client.send(type_url, subscribe)
    response = await client.recv()
    await client.ack(response)
    return response


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def published_version(meshca: RunningMeshca, key: str, resource_type: ResourceType, name: str) -> str:
    snapshot = meshca.app.cache.get(key)
    assert snapshot is not None
    return snapshot.of_type(resource_type).resources[name].version


async def test_wildcard_cds_and_own_secrets_with_per_resource_versions(meshca: RunningMeshca) -> None:
    client = open_client(meshca)
    await client.send(CDS, node_id="node-1")
    cds = await client.recv()
    assert cds.type_url == CDS and cds.removed_resources == [] and cds.nonce
    key = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"
    ((version, payload),) = by_name(cds).values()
    assert Cluster.parse(payload).name == "backend"
    assert version == published_version(meshca, key, ResourceType.CLUSTER, "backend")
    await client.ack(cds)
    assert await client.silent_for(0.3)  # an ACK is not answered
    sds = await exchange(client, SDS, ("default", "ROOTCA"))
    secrets = by_name(sds)
    assert set(secrets) == {"default", "ROOTCA"}
    chain = Secret.parse(secrets["default"][1]).tls_certificate.certificate_chain.inline_bytes
    leaf = x509.load_pem_x509_certificates(chain)[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [key]
    await eventually(lambda: meshca.app.registry.snapshot()[0].acked.get(ResourceType.SECRET) == sds.system_version_info)
    client.close()


async def test_sds_delta_gives_each_identity_its_own_default_only(meshca: RunningMeshca) -> None:
    alice = DeltaXdsClient(
        meshca.channel(), meshca.token("shop", "alice", node_id="a"), DELTA_PER_TYPE_METHODS[ResourceType.SECRET]
    )
    bob = DeltaXdsClient(
        meshca.channel(), meshca.token("shop", "bob", node_id="b"), DELTA_PER_TYPE_METHODS[ResourceType.SECRET]
    )
    bob_uri = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/bob"
    await alice.send("", ("default", bob_uri), node_id="a")
    await bob.send("", ("default",), node_id="b")
    alice_secrets, bob_secrets = by_name(await alice.recv()), by_name(await bob.recv())
    assert set(alice_secrets) == {"default"}  # another identity's name is never served
    assert alice_secrets["default"] != bob_secrets["default"]
    chain = Secret.parse(alice_secrets["default"][1]).tls_certificate.certificate_chain.inline_bytes
    assert f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/alice".encode() in x509.load_pem_x509_certificates(chain)[
        0
    ].extensions.get_extension_for_class(x509.SubjectAlternativeName).value.public_bytes()
    alice.close()
    bob.close()


async def test_only_changes_then_removals_are_pushed(meshca: RunningMeshca) -> None:
    client = open_client(meshca)
    await client.send(CDS, node_id="node-1")
    await client.ack(await client.recv())
    await exchange(client, EDS, ("backend", "payments"))  # payments does not exist yet
    meshca.app.publisher.set_mesh(mesh({"backend": 8080, "payments": 9090}))
    cds = await client.recv()
    assert cds.type_url == CDS and list(by_name(cds)) == ["payments"]  # backend unchanged: not resent
    await client.ack(cds)
    eds = await client.recv()
    assert eds.type_url == EDS and list(by_name(eds)) == ["payments"]  # sent once it appeared
    await client.ack(eds)
    assert await client.silent_for(0.3)
    meshca.app.publisher.set_mesh(mesh({"backend": 8080}))
    removals = {}
    for _ in range(2):
        response = await client.recv()
        assert response.resources == []
        removals[response.type_url] = response.removed_resources
        await client.ack(response)
    assert removals == {CDS: ["payments"], EDS: ["payments"]}
    assert await client.silent_for(0.3)
    client.close()


async def test_reconnect_with_initial_resource_versions_gets_nothing_already_held(meshca: RunningMeshca) -> None:
    first = open_client(meshca)
    await first.send(CDS, node_id="node-1")
    cds = await first.recv()
    await first.ack(cds)
    eds = await exchange(first, EDS, ("backend",))
    first.close()
    held_clusters = {name: version for name, (version, _) in by_name(cds).items()}
    held_endpoints = {name: version for name, (version, _) in by_name(eds).items()}

    again = open_client(meshca)
    await again.send(CDS, node_id="node-1", initial_versions=held_clusters)
    answer = await again.recv()  # the first wildcard request is answered, with nothing already held
    assert answer.resources == [] and answer.removed_resources == []
    await again.ack(answer)
    await again.send(EDS, ("backend",), initial_versions=held_endpoints)
    assert await again.silent_for(0.5)
    # what changed while it was away, and only that, is sent on the next reconnect
    meshca.app.publisher.set_mesh(mesh({"backend": 8081, "payments": 9090}))
    again.close()
    third = open_client(meshca)
    await third.send(CDS, node_id="node-1", initial_versions=held_clusters)
    assert list(by_name(await third.recv())) == ["payments"]
    await third.send(EDS, ("backend",), initial_versions=held_endpoints)
    assert list(by_name(await third.recv())) == ["backend"]
    third.close()


async def test_stale_nonce_subscription_change_is_applied(meshca: RunningMeshca) -> None:
    meshca.app.publisher.set_mesh(mesh({"backend": 8080, "payments": 9090}))
    client = open_client(meshca)
    await client.send(CDS, node_id="node-1")
    await client.ack(await client.recv())
    old = await exchange(client, EDS, ("backend",))
    meshca.app.publisher.set_mesh(mesh({"backend": 8081, "payments": 9090}))
    pushed = await client.recv()
    assert pushed.type_url == EDS and pushed.nonce != old.nonce
    # answers the older response, subscribes to payments: still applied (after the ACK of `pushed`)
    await client.send(EDS, ("payments",), nonce=old.nonce)
    assert await client.silent_for(0.3)
    await client.ack(pushed)
    caught_up = await client.recv()
    assert list(by_name(caught_up)) == ["payments"]
    client.close()


async def test_nack_is_recorded_and_not_answered_with_the_same_versions(meshca: RunningMeshca) -> None:
    client = open_client(meshca)
    await client.send(CDS, node_id="node-1")
    first = await client.recv()
    await client.send(CDS, nonce=first.nonce, error="rejected by test")
    assert await client.silent_for(0.5)
    proxies = meshca.app.registry.snapshot()
    assert proxies[0].last_nack is not None and proxies[0].last_nack.message == "rejected by test"
    assert proxies[0].last_nack.rejected_version == first.system_version_info
    meshca.app.publisher.set_mesh(mesh({"backend": 8080}))  # same content: still nothing
    assert await client.silent_for(0.3)
    meshca.app.publisher.set_mesh(mesh({"backend": 8080, "payments": 9090}))
    fixed = await client.recv()
    assert list(by_name(fixed)) == ["payments"]  # the rejected backend version is not sent again
    client.close()


@pytest.mark.parametrize("resource_type", list(DELTA_PER_TYPE_METHODS))
async def test_per_type_delta_services(meshca: RunningMeshca, resource_type: ResourceType) -> None:
    names = {
        ResourceType.CLUSTER: (),
        ResourceType.LISTENER: (),
        ResourceType.ENDPOINT: ("backend",),
        ResourceType.ROUTE: ("routes",),
        ResourceType.SECRET: ("default",),
    }[resource_type]
    client = DeltaXdsClient(
        meshca.channel(), meshca.token("shop", "frontend"), DELTA_PER_TYPE_METHODS[resource_type]
    )
    await client.send("", names, node_id="n")
    response = await client.recv()
    assert response.type_url == resource_type.type_url and len(response.resources) == 1
    assert response.resources[0].resource.type_url == resource_type.type_url
    client.close()


async def test_per_type_delta_service_refuses_another_type(meshca: RunningMeshca) -> None:
    client = DeltaXdsClient(
        meshca.channel(), meshca.token("shop", "frontend"), DELTA_PER_TYPE_METHODS[ResourceType.CLUSTER]
    )
    await client.send(SDS, ("default",), node_id="n")
    code, details = await client.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "CDS" in details


async def test_delta_streams_pass_the_same_gate(meshca: RunningMeshca) -> None:
    anonymous = DeltaXdsClient(meshca.channel(), None)
    with contextlib.suppress(grpc.aio.AioRpcError):  # refused before any message is read: may race the write
        await anonymous.send(CDS, node_id="n")
    assert (await anonymous.status())[0] == grpc.StatusCode.UNAUTHENTICATED
    impostor = DeltaXdsClient(meshca.channel(), meshca.token("shop", "frontend", node_id="frontend-1"))
    await impostor.send(CDS, node_id="backend-1")
    assert (await impostor.status())[0] == grpc.StatusCode.PERMISSION_DENIED
    garbage = open_client(meshca)
    await garbage.send_raw(b"\x0a\xff\xff\xff\xff\x0f garbage")
    code, details = await garbage.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "DeltaDiscoveryRequest" in details


def test_delta_framing_is_a_valid_delta_discovery_response() -> None:
    cluster = r.cluster(r.ClusterSpec("a", connect_timeout=timedelta(seconds=3)))
    endpoints = r.cluster_load_assignment("a", [("127.0.0.1", 1)])
    response = DeltaResponse(ResourceType.CLUSTER, "v7", (cluster, cluster), ("gone", "also-gone"), "n1")
    parsed = DeltaDiscoveryResponse.parse(frame_delta_response(response))
    assert (parsed.system_version_info, parsed.type_url, parsed.nonce) == ("v7", CDS, "n1")
    assert parsed.removed_resources == ["gone", "also-gone"]
    assert parsed.control_plane is not None and parsed.control_plane.identifier == "meshca"
    for resource in parsed.resources:
        assert (resource.name, resource.version) == ("a", cluster.version)
        assert resource.resource.type_url == CDS and resource.resource.value == cluster.payload
        assert Cluster.parse(resource.resource.value).connect_timeout == timedelta(seconds=3)
    (eds,) = DeltaDiscoveryResponse.parse(
        frame_delta_response(DeltaResponse(ResourceType.ENDPOINT, "v", (endpoints,), (), "n2"))
    ).resources
    assert (eds.name, eds.version, eds.resource.value) == ("a", endpoints.version, endpoints.payload)
