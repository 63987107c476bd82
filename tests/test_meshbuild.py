"""Resource derivation: what Envoy resources each part of the mesh model becomes, decoded from the bytes sent."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.rbac.v3 import Principal
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac, RbacPerRoute
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpConnectionManager
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CommonTlsContext,
    DownstreamTlsContext,
    SubjectAltNameMatcherSanType,
    UpstreamTlsContext,
)
from meshca_harness import make_ca
from snapshot_helpers import check_consistency

from meshca.clock import system_clock
from meshca.identity.spiffe import SpiffeId
from meshca.mesh import resources as r
from meshca.mesh.build import OUTBOUND_ROUTES, MeshResources, ResourceMemo, build_mesh
from meshca.mesh.model import MeshConfig, parse_mesh_config
from meshca.sds.workloads import MeshPublisher, WorkloadSecrets
from meshca.xds.cache import SnapshotCache
from meshca.xds.snapshot import EncodedResource, InconsistentSnapshot, ResourceType, Snapshot

TD = "mesh.test"

# The demo's shape (backend accepts only frontend; intruder is in the mesh but not allowed), plus one service
# per allow-rule form, a service with explicit endpoints, an identity with two services, and a weighted split.
MESH = f"""\
trust_domain: {TD}
services:
  backend:
    namespace: shop
    inbound: {{port: 15006, app: "127.0.0.1:8080", listen_address: 127.0.0.1}}
    allow: [spiffe://{TD}/ns/shop/sa/frontend]
  backend-v2:
    namespace: shop
    inbound: {{port: 15007, app: "127.0.0.1:8081"}}
    endpoints: ["10.0.0.5:15007", "10.0.0.6:15007"]
    allow: ["namespace:shop", spiffe://{TD}/ns/ops/sa/probe]
  catalog:
    namespace: shop
    inbound: {{port: 15008, app: "127.0.0.1:9090"}}
    allow: ["namespace:ops", "*"]
  ledger:
    namespace: bank
    inbound: {{port: 15009, app: "127.0.0.1:7070"}}
  frontend:
    namespace: shop
    outbound: {{port: 15001}}
  frontend-admin:
    namespace: shop
    service_account: frontend
    inbound: {{port: 15010, app: "127.0.0.1:3000"}}
  intruder:
    namespace: attic
    outbound: {{port: 15001}}
routes:
  - prefix: /v2
    split: {{backend: 1, backend-v2: 3}}
  - prefix: /
    to: backend
"""

INBOUND_SERVICES = ("backend", "backend-v2", "catalog", "ledger", "frontend-admin")


def parse(text: str = MESH, **overrides: Any) -> MeshConfig:
    data = yaml.safe_load(text)
    data.update(overrides)
    return parse_mesh_config(Path("mesh.yaml"), data)


def identity(namespace: str, service_account: str) -> SpiffeId:
    return SpiffeId.for_service_account(TD, namespace, service_account)


def by_key(resources: Sequence[EncodedResource]) -> dict[tuple[ResourceType, str], EncodedResource]:
    keyed = {(res.type, res.name): res for res in resources}
    assert len(keyed) == len(resources), "no resource is derived twice"
    return keyed


def tls_context(listener: Listener) -> DownstreamTlsContext:
    socket = listener.filter_chains[0].transport_socket
    assert socket is not None and socket.name == "envoy.transport_sockets.tls"
    context = socket.typed_config.unpack()
    assert isinstance(context, DownstreamTlsContext)
    return context


def san_matchers(context: CommonTlsContext) -> list[tuple[str, str]]:
    """('exact'|'prefix', value) for every URI SAN matcher of the validation context."""
    matchers = context.combined_validation_context.default_validation_context.match_typed_subject_alt_names
    out = []
    for matcher in matchers:
        assert matcher.san_type == SubjectAltNameMatcherSanType.URI
        out.append(("exact", matcher.matcher.exact) if matcher.matcher.exact else ("prefix", matcher.matcher.prefix))
    return out


def connection_manager(listener: Listener) -> HttpConnectionManager:
    manager = listener.filter_chains[0].filters[0].typed_config.unpack()
    assert isinstance(manager, HttpConnectionManager)
    return manager


def endpoints_of(resource: EncodedResource) -> list[tuple[str, int]]:
    assignment = ClusterLoadAssignment.parse(resource.payload)
    return [
        (lb.endpoint.address.socket_address.address, lb.endpoint.address.socket_address.port_value)
        for locality in assignment.endpoints
        for lb in locality.lb_endpoints
    ]


def test_shared_resources_are_one_outbound_cluster_and_cla_per_served_service_plus_the_route_config() -> None:
    mesh = build_mesh(parse())
    shared = by_key(mesh.shared)
    expected = {(ResourceType.CLUSTER, f"outbound|{s}") for s in INBOUND_SERVICES}
    expected |= {(ResourceType.ENDPOINT, f"outbound|{s}") for s in INBOUND_SERVICES}
    expected |= {(ResourceType.ROUTE, OUTBOUND_ROUTES)}
    assert set(shared) == expected  # nothing for frontend/intruder (outbound only), no listeners, no secrets

    cluster = Cluster.parse(shared[ResourceType.CLUSTER, "outbound|backend"].payload)
    assert cluster.name == "outbound|backend" and cluster.type == ClusterDiscoveryType.EDS
    assert cluster.transport_socket is not None
    upstream = cluster.transport_socket.typed_config.unpack()
    assert isinstance(upstream, UpstreamTlsContext)
    # the caller's sidecar pins the callee's identity exactly, presents its own `default`, trusts `ROOTCA`
    assert san_matchers(upstream.common_tls_context) == [("exact", f"spiffe://{TD}/ns/shop/sa/backend")]
    assert [c.name for c in upstream.common_tls_context.tls_certificate_sds_secret_configs] == ["default"]
    assert upstream.common_tls_context.combined_validation_context.validation_context_sds_secret_config.name == "ROOTCA"

    # endpoints: by default the sidecar's inbound port on loopback; else the listed addresses
    assert endpoints_of(shared[ResourceType.ENDPOINT, "outbound|backend"]) == [("127.0.0.1", 15006)]
    assert endpoints_of(shared[ResourceType.ENDPOINT, "outbound|ledger"]) == [("127.0.0.1", 15009)]
    assert endpoints_of(shared[ResourceType.ENDPOINT, "outbound|backend-v2"]) == [
        ("10.0.0.5", 15007),
        ("10.0.0.6", 15007),
    ]


def test_outbound_route_config_encodes_prefixes_and_split_weights() -> None:
    shared = by_key(build_mesh(parse()).shared)
    config = RouteConfiguration.parse(shared[ResourceType.ROUTE, OUTBOUND_ROUTES].payload)
    assert config.name == "outbound"
    [host] = config.virtual_hosts
    assert host.domains == ["*"]
    split, default = host.routes
    assert split.match.prefix == "/v2"
    assert split.route.weighted_clusters is not None
    assert [(c.name, c.weight) for c in split.route.weighted_clusters.clusters] == [
        ("outbound|backend", 1),
        ("outbound|backend-v2", 3),
    ]
    assert default.match.prefix == "/"
    assert default.route.cluster == "outbound|backend" and default.route.weighted_clusters is None


def test_route_config_without_routes_is_still_published() -> None:
    """Outbound listeners always reference `outbound`; with no routes it exists and routes nothing."""
    shared = by_key(build_mesh(parse(routes=[])).shared)
    config = RouteConfiguration.parse(shared[ResourceType.ROUTE, OUTBOUND_ROUTES].payload)
    assert [host.routes for host in config.virtual_hosts] == [[]]


def test_served_identity_gets_an_mtls_inbound_listener_its_route_and_a_local_cluster_to_the_app() -> None:
    mesh = build_mesh(parse())
    own = by_key(mesh.per_identity[identity("shop", "backend")])
    assert set(own) == {
        (ResourceType.LISTENER, "inbound|backend"),
        (ResourceType.ROUTE, "inbound|backend"),
        (ResourceType.CLUSTER, "local|backend"),
        (ResourceType.ENDPOINT, "local|backend"),
    }

    listener = Listener.parse(own[ResourceType.LISTENER, "inbound|backend"].payload)
    assert listener.name == "inbound|backend"
    assert (listener.address.socket_address.address, listener.address.socket_address.port_value) == (
        "127.0.0.1",
        15006,
    )
    context = tls_context(listener)
    assert context.require_client_certificate is True
    assert [c.name for c in context.common_tls_context.tls_certificate_sds_secret_configs] == ["default"]
    validation = context.common_tls_context.combined_validation_context
    assert validation.validation_context_sds_secret_config.name == "ROOTCA"
    assert san_matchers(context.common_tls_context) == [("exact", f"spiffe://{TD}/ns/shop/sa/frontend")]
    manager = connection_manager(listener)
    assert manager.rds.route_config_name == "inbound|backend"

    routes = RouteConfiguration.parse(own[ResourceType.ROUTE, "inbound|backend"].payload)
    assert [(route.match.prefix, route.route.cluster) for host in routes.virtual_hosts for route in host.routes] == [
        ("/", "local|backend")
    ]
    local = Cluster.parse(own[ResourceType.CLUSTER, "local|backend"].payload)
    assert local.type == ClusterDiscoveryType.EDS and local.transport_socket is None  # plain HTTP to the app
    assert endpoints_of(own[ResourceType.ENDPOINT, "local|backend"]) == [("127.0.0.1", 8080)]


def test_inbound_listens_on_all_addresses_by_default() -> None:
    own = by_key(build_mesh(parse()).per_identity[identity("bank", "ledger")])
    listener = Listener.parse(own[ResourceType.LISTENER, "inbound|ledger"].payload)
    assert (listener.address.socket_address.address, listener.address.socket_address.port_value) == ("0.0.0.0", 15009)


@pytest.mark.parametrize(
    "service, namespace, expected",
    [
        pytest.param("backend", "shop", [("exact", f"spiffe://{TD}/ns/shop/sa/frontend")], id="spiffe-id"),
        pytest.param(
            "backend-v2",
            "shop",
            [("exact", f"spiffe://{TD}/ns/ops/sa/probe"), ("prefix", f"spiffe://{TD}/ns/shop/sa/")],
            id="namespace-and-spiffe-id",
        ),
        pytest.param("catalog", "shop", [("prefix", f"spiffe://{TD}/")], id="star-wins-over-namespace"),
        pytest.param("ledger", "bank", [("prefix", f"spiffe://{TD}/")], id="empty-allow-means-trust-domain"),
    ],
)
def test_allow_rules_become_san_matchers_and_mtls_is_always_required(
    service: str, namespace: str, expected: list[tuple[str, str]]
) -> None:
    config = parse()
    served = config.service(service)
    assert served is not None
    own = by_key(build_mesh(config).per_identity[served.spiffe_id])
    context = tls_context(Listener.parse(own[ResourceType.LISTENER, f"inbound|{service}"].payload))
    assert context.require_client_certificate is True
    assert san_matchers(context.common_tls_context) == expected


def _matcher(principal: Principal) -> tuple[str, str]:
    name = principal.authenticated.principal_name
    return ("exact", name.exact) if name.exact else ("prefix", name.prefix)


def request_policy(routes: RouteConfiguration) -> tuple[list[tuple[str, str]], list[str]]:
    """(allowed matchers, denied exact IDs) of the RBACPerRoute on the inbound route's virtual host."""
    per_route = routes.virtual_hosts[0].typed_per_filter_config["envoy.filters.http.rbac"].unpack()
    assert isinstance(per_route, RbacPerRoute)
    policies = per_route.rbac.rules.policies
    assert list(policies) == ["callers"] and policies["callers"].permissions[0].any is True
    principals = policies["callers"].principals
    if principals[0].and_ids is None:
        return [_matcher(p) for p in principals], []
    allowed, denied = principals[0].and_ids.ids
    return [_matcher(p) for p in allowed.or_ids.ids], [_matcher(p)[1] for p in denied.not_id.or_ids.ids]


@pytest.mark.parametrize(
    "service, expected",
    [
        ("backend", [("exact", f"spiffe://{TD}/ns/shop/sa/frontend")]),
        ("backend-v2", [("exact", f"spiffe://{TD}/ns/ops/sa/probe"), ("prefix", f"spiffe://{TD}/ns/shop/sa/")]),
        ("catalog", [("prefix", f"spiffe://{TD}/")]),
        ("ledger", [("prefix", f"spiffe://{TD}/")]),
    ],
)
def test_allow_rules_are_also_checked_per_request_by_rbac_on_the_inbound_route(
    service: str, expected: list[tuple[str, str]]
) -> None:
    config = parse()
    served = config.service(service)
    assert served is not None
    own = by_key(build_mesh(config).per_identity[served.spiffe_id])
    manager = connection_manager(Listener.parse(own[ResourceType.LISTENER, f"inbound|{service}"].payload))
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.rbac", "envoy.filters.http.router"]
    base = manager.http_filters[0].typed_config.unpack()
    assert isinstance(base, Rbac) and base.rules is not None and base.rules.policies == {}  # fail closed
    routes = RouteConfiguration.parse(own[ResourceType.ROUTE, f"inbound|{service}"].payload)
    assert request_policy(routes) == (expected, [])
    # the outbound side has no per-request check: the app's own calls
    intruder = by_key(build_mesh(config).per_identity[identity("attic", "intruder")])
    outbound = Listener.parse(intruder[ResourceType.LISTENER, "outbound|15001"].payload)
    assert [f.name for f in connection_manager(outbound).http_filters] == ["envoy.filters.http.router"]


def test_denied_identities_are_refused_per_request_wherever_a_rule_would_admit_them() -> None:
    probe, frontend = f"spiffe://{TD}/ns/ops/sa/probe", f"spiffe://{TD}/ns/shop/sa/frontend"
    stranger = f"spiffe://{TD}/ns/nowhere/sa/x"
    config = parse()
    plain = build_mesh(config)
    mesh = build_mesh(config, denied_spiffe_ids=frozenset({probe, frontend, stranger}))

    def inbound(m: MeshResources, service: str) -> EncodedResource:
        served = config.service(service)
        assert served is not None
        return by_key(m.per_identity[served.spiffe_id])[ResourceType.ROUTE, f"inbound|{service}"]

    expected = {
        "backend": [frontend],  # its exact ID
        "backend-v2": [probe, frontend],  # an exact ID and a namespace rule
        "catalog": [probe, frontend, stranger],  # '*': the whole trust domain
        "ledger": [probe, frontend, stranger],  # no allow: the whole trust domain
        "frontend-admin": [probe, frontend, stranger],
    }
    for service, denied in expected.items():
        allowed, refused = request_policy(RouteConfiguration.parse(inbound(mesh, service).payload))
        assert allowed == request_policy(RouteConfiguration.parse(inbound(plain, service).payload))[0]
        assert refused == sorted(denied), service
    # the handshake check (the listener) is unchanged: a denied identity's connections are refused per request
    def listener(m: MeshResources) -> bytes:
        return by_key(m.per_identity[identity("shop", "backend")])[ResourceType.LISTENER, "inbound|backend"].payload

    assert listener(mesh) == listener(plain)
    # a denied ID no rule admits changes nothing
    only_stranger = build_mesh(parse(), denied_spiffe_ids=frozenset({f"spiffe://{TD}/ns/shop/sa/nobody"}))
    assert inbound(only_stranger, "backend").payload == inbound(plain, "backend").payload


def test_denying_through_a_memo_reencodes_only_the_affected_routes() -> None:
    memo = ResourceMemo()
    config = parse()
    first = build_mesh(config, memo)
    second = build_mesh(config, memo, denied_spiffe_ids=frozenset({f"spiffe://{TD}/ns/ops/sa/probe"}))

    def everything(m: MeshResources) -> list[EncodedResource]:
        return [*m.shared, *(res for own in m.per_identity.values() for res in own)]

    before = {(res.type, res.name): res for res in everything(first)}
    changed = sorted(res.name for res in everything(second) if before[res.type, res.name] is not res)
    # backend admits only frontend; the others admit ops/probe by ID, by '*' or by an empty allow
    assert changed == ["inbound|backend-v2", "inbound|catalog", "inbound|frontend-admin", "inbound|ledger"]
    assert build_mesh(config, memo).version == first.version


def test_calling_identity_gets_a_loopback_outbound_listener_on_the_outbound_routes() -> None:
    mesh = build_mesh(parse())
    own = by_key(mesh.per_identity[identity("attic", "intruder")])
    assert set(own) == {(ResourceType.LISTENER, "outbound|15001")}
    listener = Listener.parse(own[ResourceType.LISTENER, "outbound|15001"].payload)
    assert (listener.address.socket_address.address, listener.address.socket_address.port_value) == (
        "127.0.0.1",
        15001,
    )
    assert listener.filter_chains[0].transport_socket is None  # the app speaks plain HTTP to its own sidecar
    assert connection_manager(listener).rds.route_config_name == "outbound"


def test_an_identity_with_several_services_gets_all_their_listeners() -> None:
    own = by_key(build_mesh(parse()).per_identity[identity("shop", "frontend")])
    assert {key for key in own if key[0] is ResourceType.LISTENER} == {
        (ResourceType.LISTENER, "outbound|15001"),
        (ResourceType.LISTENER, "inbound|frontend-admin"),
    }
    assert (ResourceType.CLUSTER, "local|frontend-admin") in own


def test_every_identity_has_a_view_and_nothing_is_shared_twice() -> None:
    config = parse()
    mesh = build_mesh(config)
    assert set(mesh.per_identity) == {s.spiffe_id for s in config.services}
    shared_keys = set(by_key(mesh.shared))
    for own in mesh.per_identity.values():
        assert not shared_keys & set(by_key(own))


def placeholder_secrets() -> list[EncodedResource]:
    return [r.tls_certificate_secret("default", b"", b""), r.validation_context_secret("ROOTCA", b"")]


def test_every_identity_view_is_a_consistent_snapshot() -> None:
    mesh = build_mesh(parse())
    for spiffe_id, own in mesh.per_identity.items():
        snapshot = Snapshot.build([*mesh.shared, *own, *placeholder_secrets()])
        listeners = set(snapshot.of_type(ResourceType.LISTENER).resources)
        assert listeners == {res.name for res in own if res.type is ResourceType.LISTENER}, spiffe_id
    Snapshot.build([*mesh.shared, *placeholder_secrets()])  # a proxy outside the mesh gets the shared view


def test_views_without_secrets_are_refused() -> None:
    """The check above is meaningful: the mTLS listener really depends on `default` and `ROOTCA`."""
    mesh = build_mesh(parse())
    with pytest.raises(InconsistentSnapshot, match="LDS 'inbound\\|backend' references SDS 'ROOTCA'"):
        Snapshot.build([*mesh.shared, *mesh.per_identity[identity("shop", "backend")]])


def test_publisher_serves_each_identity_its_own_view(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, TD)
    cache = SnapshotCache()
    log = logging.getLogger("meshca.test.meshbuild")
    publisher = MeshPublisher(cache, WorkloadSecrets(ca, system_clock, log), log)
    mesh = build_mesh(parse())
    publisher.set_mesh(mesh)
    assert publisher.mesh_version() and publisher.mesh_rejected_total() == 0

    def listeners(spiffe_id: SpiffeId) -> set[str]:
        snapshot = cache.get(publisher.ensure_identity(spiffe_id))
        assert snapshot is not None
        assert set(snapshot.of_type(ResourceType.SECRET).resources) >= {"default", "ROOTCA"}
        return set(snapshot.of_type(ResourceType.LISTENER).resources)

    assert listeners(identity("shop", "backend")) == {"inbound|backend"}
    assert listeners(identity("attic", "intruder")) == {"outbound|15001"}
    assert listeners(identity("other", "stranger")) == set()  # not in the mesh: shared view only


def test_agent_mode_identity_gets_the_same_mesh_without_any_secret_and_no_certificate(tmp_path: Path) -> None:
    """Agent mode: the same listeners, clusters, routes and endpoints, their TLS secrets read from the local
    agent's SDS; the snapshot holds no Secret and meshca issues nothing for the identity."""
    ca = make_ca(tmp_path, TD)
    cache = SnapshotCache()
    log = logging.getLogger("meshca.test.meshbuild")
    secrets = WorkloadSecrets(ca, system_clock, log)
    publisher = MeshPublisher(cache, secrets, log)
    builds: list[bool] = []
    memo = ResourceMemo()

    def agent_mesh(config: MeshConfig) -> MeshResources:
        builds.append(True)
        return build_mesh(config, memo, secrets_from_agent=True)

    config = parse()
    publisher.set_mesh(build_mesh(config), lambda: agent_mesh(config))
    assert builds == []  # no agent-mode node yet: the variant is not built
    backend = identity("shop", "backend")
    key = publisher.ensure_agent_identity(backend)
    assert key != publisher.snapshot_key(backend) and publisher.current_agent_key(backend) == key
    agent_view = cache.get(key)
    assert agent_view is not None and builds == [True]
    assert not agent_view.of_type(ResourceType.SECRET).resources
    assert secrets.issued_total() == 0 and secrets.certificates() == []
    normal = cache.get(publisher.ensure_identity(backend))
    assert normal is not None and secrets.issued_total() == 1
    for resource_type in (ResourceType.LISTENER, ResourceType.CLUSTER, ResourceType.ROUTE, ResourceType.ENDPOINT):
        assert set(agent_view.of_type(resource_type).resources) == set(normal.of_type(resource_type).resources)
    listener = Listener.parse(agent_view.of_type(ResourceType.LISTENER).resources["inbound|backend"].payload)
    context = tls_context(listener).common_tls_context
    for sds in (context.tls_certificate_sds_secret_configs[0],
                context.combined_validation_context.validation_context_sds_secret_config):
        assert [g.envoy_grpc.cluster_name for g in sds.sds_config.api_config_source.grpc_services] == ["meshca_agent"]
    outbound = Cluster.parse(agent_view.of_type(ResourceType.CLUSTER).resources["outbound|backend"].payload)
    upstream = outbound.transport_socket.typed_config.unpack().common_tls_context
    assert upstream.tls_certificate_sds_secret_configs[0].sds_config.api_config_source.grpc_services
    # a mesh edit reaches the agent-mode snapshot too (still without a Secret)
    edit = edited("\"10.0.0.6:15007\"", "\"10.0.0.7:15007\"")
    publisher.set_mesh(build_mesh(edit), lambda: agent_mesh(edit))
    updated = cache.get(key)
    assert updated is not None and not updated.of_type(ResourceType.SECRET).resources
    assert endpoints_of(updated.of_type(ResourceType.ENDPOINT).resources["outbound|backend-v2"]) == [
        ("10.0.0.5", 15007), ("10.0.0.7", 15007)
    ]
    publisher.forget(backend)
    assert cache.get(key) is None and publisher.current_agent_key(backend) is None


def test_version_is_stable_for_the_same_config() -> None:
    assert build_mesh(parse()).version == build_mesh(parse()).version
    assert len(build_mesh(parse()).version) == 12


def edited(old: str, new: str) -> MeshConfig:
    assert MESH.count(old) == 1
    return parse(MESH.replace(old, new))


@pytest.mark.parametrize(
    "old, new",
    [
        pytest.param("\"10.0.0.6:15007\"", "\"10.0.0.7:15007\"", id="endpoint"),  # shared EDS
        pytest.param("split: {backend: 1, backend-v2: 3}", "split: {backend: 1, backend-v2: 4}", id="weight"),
        pytest.param("app: \"127.0.0.1:7070\"", "app: \"127.0.0.1:7071\"", id="app-address"),  # per-identity EDS
        pytest.param("allow: [spiffe://mesh.test/ns/shop/sa/frontend]", "allow: [\"namespace:shop\"]", id="allow"),
        pytest.param("namespace: attic", "namespace: cellar", id="identity"),
        pytest.param("    outbound: {port: 15001}\n  frontend-admin", "    outbound: {port: 15002}\n  frontend-admin",
                     id="outbound-port"),
    ],
)
def test_version_changes_when_anything_changes(old: str, new: str) -> None:
    assert build_mesh(edited(old, new)).version != build_mesh(parse()).version


def test_version_ignores_the_order_services_are_listed_in() -> None:
    data = yaml.safe_load(MESH)
    data["services"] = dict(reversed(list(data["services"].items())))
    reordered = parse_mesh_config(Path("mesh.yaml"), data)
    mesh, other = build_mesh(parse()), build_mesh(reordered)
    # the same resources either way ...
    assert {(res.type, res.name, res.version) for res in mesh.shared} == {
        (res.type, res.name, res.version) for res in other.shared
    }
    # ... so the same version: a reformatted file is not a new mesh
    assert mesh.version == other.version


def test_version_of_plain_resource_lists() -> None:
    """`set_mesh` also accepts a flat list; its version covers every resource."""
    one = MeshResources((r.cluster(r.ClusterSpec("a")),))
    two = MeshResources((r.cluster(r.ClusterSpec("b")),))
    assert one.version != two.version and one.version == MeshResources((r.cluster(r.ClusterSpec("a")),)).version


def test_memo_reencodes_only_what_an_edit_changed() -> None:
    from meshca.mesh.build import ResourceMemo

    def config(backend_port: int) -> MeshConfig:
        return parse_mesh_config(
            Path("mesh.yaml"),
            {
                "trust_domain": "mesh.test",
                "services": {
                    "backend": {"namespace": "shop", "inbound": {"port": backend_port, "app": "127.0.0.1:9001"}},
                    "payments": {"namespace": "shop", "inbound": {"port": 15002, "app": "127.0.0.1:9002"}},
                    "frontend": {"namespace": "shop", "outbound": {"port": 15101}},
                },
                "routes": [{"prefix": "/", "to": "backend"}],
            },
        )

    memo = ResourceMemo()
    first = build_mesh(config(15001), memo)
    second = build_mesh(config(15009), memo)  # only backend's endpoint (and inbound listener) moved
    by_key = {(res.type, res.name): res for res in first.shared}
    for res in second.shared:
        old = by_key[(res.type, res.name)]
        if res.name == "outbound|backend" and res.type.name == "ENDPOINT":
            assert res is not old and res.version != old.version
        else:
            assert res is old  # reused, not encoded again
    fresh = build_mesh(config(15009))
    assert [r.version for r in fresh.shared] == [r.version for r in second.shared]


EDITS = [
    ("\"10.0.0.6:15007\"", "\"10.0.0.7:15007\""),
    ("split: {backend: 1, backend-v2: 3}", "split: {backend: 1, backend-v2: 4}"),
    ("app: \"127.0.0.1:7070\"", "app: \"127.0.0.1:7071\""),
    ("allow: [spiffe://mesh.test/ns/shop/sa/frontend]", "allow: [\"namespace:shop\"]"),
    ("namespace: attic", "namespace: cellar"),
]


def published_content(cache: SnapshotCache, publisher: MeshPublisher, spiffe_id: SpiffeId) -> dict[str, object]:
    snapshot = cache.get(publisher.ensure_identity(spiffe_id))
    assert snapshot is not None
    check_consistency(snapshot)
    return {
        t.name: sorted((name, res.version) for name, res in snapshot.of_type(t).resources.items())
        for t in ResourceType
        if t is not ResourceType.SECRET
    }


@pytest.mark.parametrize("old, new", EDITS)
def test_incremental_publish_equals_a_fresh_one_and_versions_follow_content(tmp_path: Path, old: str, new: str) -> None:
    """Each edit is applied on top of the previous mesh (layers reused, only changes checked): every
    identity must end up with exactly what a publisher given the edited mesh from scratch serves."""
    ca = make_ca(tmp_path, TD)
    log = logging.getLogger("meshca.test.meshbuild")
    identities = [identity("shop", "backend"), identity("shop", "frontend"), identity("attic", "intruder")]
    memo = ResourceMemo()
    cache = SnapshotCache()
    incremental = MeshPublisher(cache, WorkloadSecrets(ca, system_clock, log), log)
    incremental.set_mesh(build_mesh(parse(), memo))
    original_version = incremental.mesh_version()
    for spiffe_id in identities:
        incremental.ensure_identity(spiffe_id)
    incremental.set_mesh(build_mesh(edited(old, new), memo))
    fresh_cache = SnapshotCache()
    fresh = MeshPublisher(fresh_cache, WorkloadSecrets(ca, system_clock, log), log)
    fresh.set_mesh(build_mesh(edited(old, new)))
    assert incremental.mesh_version() == fresh.mesh_version() != original_version
    for spiffe_id in identities + [identity("cellar", "intruder")]:
        assert published_content(cache, incremental, spiffe_id) == published_content(fresh_cache, fresh, spiffe_id)
    incremental.set_mesh(build_mesh(parse(), memo))
    assert incremental.mesh_version() == original_version


def test_a_mesh_update_after_a_renewal_keeps_the_renewed_certificate(tmp_path: Path) -> None:
    """set_mesh composes identities lazily from the secrets last published for them: a renewal
    published in between must be what the next mesh update serves, never the older certificate."""
    ca = make_ca(tmp_path, TD)
    log = logging.getLogger("meshca.test.meshbuild")
    cache = SnapshotCache()
    secrets = WorkloadSecrets(ca, system_clock, log)
    publisher = MeshPublisher(cache, secrets, log)
    memo = ResourceMemo()
    publisher.set_mesh(build_mesh(parse(), memo))
    backend = identity("shop", "backend")
    key = publisher.ensure_identity(backend)

    def served_default() -> bytes:
        snapshot = cache.get(key)
        assert snapshot is not None
        return snapshot.of_type(ResourceType.SECRET).resources["default"].payload

    first = served_default()
    secrets.renew(backend)
    publisher.refresh(backend)
    renewed = served_default()
    assert renewed != first
    publisher.set_mesh(build_mesh(edited("\"10.0.0.6:15007\"", "\"10.0.0.7:15007\""), memo))
    assert served_default() == renewed
