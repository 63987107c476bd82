"""Integration: the real meshca gRPC server (TLS, JWT gate, SDS) driven by a Python xDS client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from meshca_harness import TRUST_DOMAIN, RunningMeshca, running_meshca
from xds_client import DeltaXdsClient, XdsClient

from meshca.dev.tokens import mint_token
from meshca.mesh import resources as r
from meshca.xds.server import PER_TYPE_METHODS
from meshca.xds.snapshot import InconsistentSnapshot, ResourceType

CDS = ResourceType.CLUSTER.type_url
EDS = ResourceType.ENDPOINT.type_url
LDS = ResourceType.LISTENER.type_url
RDS = ResourceType.ROUTE.type_url
SDS = ResourceType.SECRET.type_url
TLS = r.MtlsPeer()


def mesh(clusters: dict[str, int]) -> list:
    resources = []
    for name, port in clusters.items():
        resources.append(r.cluster(r.ClusterSpec(name, upstream_tls=TLS)))
        resources.append(r.cluster_load_assignment(name, [("127.0.0.1", port)]))
    first = next(iter(clusters))
    resources.append(
        r.route_configuration("routes", [r.VirtualHostSpec("all", routes=(r.RouteSpec("/", ((first, 1),)),))])
    )
    resources.append(r.http_listener(r.HttpListenerSpec("inbound", "127.0.0.1", 15006, "routes", TLS)))
    return resources


@pytest.fixture
async def meshca(tmp_path: Path) -> AsyncIterator[RunningMeshca]:
    async with running_meshca(tmp_path) as running:
        running.app.publisher.set_mesh(mesh({"backend": 8080}))
        yield running


def uri_sans(secret_payload: bytes) -> tuple[list[str], x509.Certificate]:
    secret = Secret.parse(secret_payload)
    chain = secret.tls_certificate.certificate_chain.inline_bytes
    leaf = x509.load_pem_x509_certificates(chain)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier), leaf


async def open_stream(meshca: RunningMeshca, ns: str, sa: str, node_id: str = "node-1") -> XdsClient:
    client = XdsClient(meshca.channel(), meshca.token(ns, sa, node_id=node_id))
    await client.send(CDS, node_id=node_id)
    return client


async def test_ads_serves_clusters_and_own_secrets(meshca: RunningMeshca) -> None:
    client = await open_stream(meshca, "shop", "frontend")
    cds = await client.recv()
    assert cds.type_url == CDS
    assert [Cluster.parse(any_.value).name for any_ in cds.resources] == ["backend"]
    await client.ack(cds)
    await client.send(SDS, ["default", "ROOTCA"])
    sds = await client.recv()
    secrets = {Secret.parse(any_.value).name: any_.value for any_ in sds.resources}
    assert set(secrets) == {"default", "ROOTCA"}
    sans, leaf = uri_sans(secrets["default"])
    assert sans == [f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"]
    bundle = Secret.parse(secrets["ROOTCA"]).validation_context.trusted_ca.inline_bytes
    assert bundle == meshca.root_pem
    assert leaf.not_valid_after_utc - datetime.now(timezone.utc) <= timedelta(hours=1, minutes=1)
    client.close()


async def test_identity_a_never_receives_identity_b_secret(meshca: RunningMeshca) -> None:
    alice = await open_stream(meshca, "shop", "alice", "alice-node")
    bob = await open_stream(meshca, "shop", "bob", "bob-node")
    await alice.recv()
    await bob.recv()
    bob_uri = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/bob"
    await alice.send(SDS, ["default", "ROOTCA", bob_uri])
    await bob.send(SDS, ["default"])
    alice_secrets = {Secret.parse(a.value).name: a.value for a in (await alice.recv()).resources}
    bob_secrets = {Secret.parse(a.value).name: a.value for a in (await bob.recv()).resources}
    assert uri_sans(alice_secrets["default"])[0] == [f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/alice"]
    assert uri_sans(bob_secrets["default"])[0] == [bob_uri]
    assert bob_uri not in alice_secrets  # a name that is not a bundle of this trust domain is never served
    assert alice_secrets["default"] != bob_secrets["default"]
    alice.close()
    bob.close()


async def test_same_identity_reuses_its_certificate(meshca: RunningMeshca) -> None:
    serials = []
    for node in ("n1", "n2"):
        client = await open_stream(meshca, "shop", "frontend", node)
        await client.recv()
        await client.send(SDS, ["default"])
        serials.append(uri_sans((await client.recv()).resources[0].value)[1].serial_number)
        client.close()
    assert serials[0] == serials[1]


@pytest.mark.parametrize(
    "token_kind, expected",
    [
        ("missing", "authorization"),
        ("expired", "expired"),
        ("garbage", "malformed"),
        ("foreign_key", "signature"),
    ],
)
async def test_bad_tokens_are_unauthenticated(meshca: RunningMeshca, tmp_path: Path, token_kind: str, expected: str) -> None:
    from meshca.dev.tokens import write_dev_issuer

    now = datetime.now(timezone.utc)
    token: str | None
    if token_kind == "missing":
        token = None
    elif token_kind == "expired":
        token = mint_token(
            meshca.signing_key_pem, namespace="a", service_account="b", now=now - timedelta(hours=2), ttl=timedelta(minutes=10)
        )
    elif token_kind == "garbage":
        token = "not.a.jwt"
    else:
        other = write_dev_issuer(tmp_path / "attacker")
        token = mint_token(other.signing_key.read_bytes(), namespace="a", service_account="b", now=now)
    client = XdsClient(meshca.channel(), token)
    await client.send(CDS, node_id="n")
    code, details = await client.status()
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert expected in details.lower()


async def test_node_claiming_another_node_id_is_denied(meshca: RunningMeshca) -> None:
    client = XdsClient(meshca.channel(), meshca.token("shop", "frontend", node_id="frontend-1"))
    await client.send(CDS, node_id="backend-1")
    code, details = await client.status()
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "backend-1" in details and "frontend-1" in details


async def test_node_metadata_claiming_another_namespace_is_denied(meshca: RunningMeshca) -> None:
    client = XdsClient(meshca.channel(), meshca.token("shop", "frontend"))
    await client.send(CDS, node_id="n", node_metadata={"NAMESPACE": "payments"})
    code, details = await client.status()
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "NAMESPACE" in details


async def test_first_request_without_node_is_refused(meshca: RunningMeshca) -> None:
    client = XdsClient(meshca.channel(), meshca.token("shop", "frontend"))
    await client.send(CDS)
    code, details = await client.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "node.id" in details


async def test_malformed_protobuf_is_invalid_argument(meshca: RunningMeshca) -> None:
    client = XdsClient(meshca.channel(), meshca.token("shop", "frontend"))
    await client.send_raw(b"\x0a\xff\xff\xff\xff\x0f garbage")
    code, details = await client.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details


async def test_ack_is_quiet_nack_is_not_answered_with_the_same_version(meshca: RunningMeshca) -> None:
    client = await open_stream(meshca, "shop", "frontend")
    first = await client.recv()
    await client.send(CDS, (), "", first.nonce, error="rejected by test")
    assert await client.silent_for(0.5)
    proxies = meshca.app.registry.snapshot()
    assert proxies[0].last_nack is not None and proxies[0].last_nack.message == "rejected by test"
    meshca.app.publisher.set_mesh(mesh({"backend": 8080}))  # same content: still nothing
    assert await client.silent_for(0.3)
    meshca.app.publisher.set_mesh(mesh({"backend": 8080, "payments": 9090}))
    fixed = await client.recv()
    assert fixed.version_info != first.version_info
    assert {Cluster.parse(a.value).name for a in fixed.resources} == {"backend", "payments"}
    await client.ack(fixed)
    assert await client.silent_for(0.3)
    client.close()


async def test_stale_nonce_gets_no_response(meshca: RunningMeshca) -> None:
    client = await open_stream(meshca, "shop", "frontend")
    first = await client.recv()
    await client.ack(first)
    meshca.app.publisher.set_mesh(mesh({"backend": 8080, "payments": 9090}))
    pushed = await client.recv()
    assert pushed.nonce != first.nonce
    await client.send(CDS, (), first.version_info, first.nonce)  # stale: answers an older response
    assert await client.silent_for(0.5)
    client.close()


async def test_late_names_and_make_before_break_order(meshca: RunningMeshca) -> None:
    client = await open_stream(meshca, "shop", "frontend")
    cds = await client.recv()
    await client.ack(cds)
    await client.send(EDS, ["backend", "payments"])
    eds = await client.recv()
    assert len(eds.resources) == 1  # payments does not exist yet: remembered
    await client.ack(eds, ["backend", "payments"])
    await client.send(LDS)
    lds = await client.recv()
    await client.ack(lds)
    meshca.app.publisher.set_mesh(mesh({"backend": 8081, "payments": 9090}))
    order = [(await client.recv()).type_url for _ in range(2)]
    assert order == [CDS, EDS]
    client.close()


async def test_invalid_mesh_is_refused_and_last_good_keeps_serving(meshca: RunningMeshca) -> None:
    dangling = [res for res in mesh({"backend": 8080}) if res.type is not ResourceType.ENDPOINT]
    with pytest.raises(InconsistentSnapshot, match="EDS 'backend'"):
        meshca.app.publisher.set_mesh(dangling)
    client = await open_stream(meshca, "shop", "frontend")
    cds = await client.recv()
    assert [Cluster.parse(a.value).name for a in cds.resources] == ["backend"]
    await client.send(EDS, ["backend"])
    assert len((await client.recv()).resources) == 1
    client.close()


@pytest.mark.parametrize("resource_type", list(PER_TYPE_METHODS))
async def test_per_type_services(meshca: RunningMeshca, resource_type: ResourceType) -> None:
    names = {
        ResourceType.CLUSTER: [],
        ResourceType.LISTENER: [],
        ResourceType.ENDPOINT: ["backend"],
        ResourceType.ROUTE: ["routes"],
        ResourceType.SECRET: ["default"],
    }[resource_type]
    client = XdsClient(meshca.channel(), meshca.token("shop", "frontend"), PER_TYPE_METHODS[resource_type])
    await client.send("", names, node_id="n")
    response = await client.recv()
    assert response.type_url == resource_type.type_url and len(response.resources) == 1
    client.close()


async def test_per_type_service_refuses_another_type(meshca: RunningMeshca) -> None:
    client = XdsClient(meshca.channel(), meshca.token("shop", "frontend"), PER_TYPE_METHODS[ResourceType.CLUSTER])
    await client.send(LDS, node_id="n")
    code, details = await client.status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "CDS" in details


@pytest.mark.parametrize("client_type", [XdsClient, DeltaXdsClient])
async def test_client_reports_the_servers_refusal_even_after_writing_on_the_refused_stream(
    meshca: RunningMeshca, client_type: type[XdsClient]
) -> None:
    # grpc/grpc#36066: a write after the server's status made grpc.aio report its own INTERNAL
    for _ in range(20):
        client = client_type(meshca.channel(), "not.a.jwt")
        for _ in range(4):
            await client.send(CDS, node_id="n")
        code, details = await client.status()
        assert (code, "malformed" in details) == (grpc.StatusCode.UNAUTHENTICATED, True)
