"""meshca's hand-written resource encoder against envoy-data-plane (the reference): same messages, same bytes."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import betterproto2
import pytest
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType, ClusterEdsClusterConfig
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    AggregatedConfigSource,
    ApiConfigSource,
    ApiConfigSourceApiType,
    ApiVersion,
    ConfigSource,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    Http2ProtocolOptions,
    SocketAddress,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.rbac.v3 import (
    Permission,
    Policy,
    Principal,
    PrincipalAuthenticated,
    PrincipalSet,
    RbacAction,
)
from envoy_data_plane.envoy.config.rbac.v3 import Rbac as RbacRules
from envoy_data_plane.envoy.config.route.v3 import (
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
    WeightedClusterClusterWeight,
)
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac, RbacPerRoute
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerForwardClientCertDetails,
    HttpConnectionManagerSetCurrentClientCertDetails,
    HttpFilter,
    Rds,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    CommonTlsContextCombinedCertificateValidationContext,
    DownstreamTlsContext,
    SdsSecretConfig,
    Secret,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Any as AnyMessage
from snapshot_helpers import encode_resource

from meshca.mesh import resources as r
from meshca.xds.snapshot import EncodedResource, Reference, ResourceType

# --- The reference: the same resources built the way meshca built them before, with envoy-data-plane. ---

_ADS = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)


# Agent mode: the local agent's SotW SDS through the bootstrap's static cluster (the contract of docs/agent.md, "Agent mode on meshca").
_AGENT_SDS = ConfigSource(
    api_config_source=ApiConfigSource(
        api_type=ApiConfigSourceApiType.GRPC,
        transport_api_version=ApiVersion.V3,
        grpc_services=[GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="meshca_agent"))],
    ),
    resource_api_version=ApiVersion.V3,
)


def _sds(name: str, from_agent: bool = False) -> SdsSecretConfig:
    return SdsSecretConfig(name=name, sds_config=_AGENT_SDS if from_agent else _ADS)


def ref_common_tls_context(peer: r.MtlsPeer) -> CommonTlsContext:
    matchers = [
        SubjectAltNameMatcher(san_type=SubjectAltNameMatcherSanType.URI, matcher=StringMatcher(exact=spiffe_id))
        for spiffe_id in peer.allowed_spiffe_ids
    ] + [
        SubjectAltNameMatcher(san_type=SubjectAltNameMatcherSanType.URI, matcher=StringMatcher(prefix=prefix))
        for prefix in peer.allowed_spiffe_prefixes
    ]
    return CommonTlsContext(
        tls_certificate_sds_secret_configs=[_sds(peer.certificate_secret, peer.secrets_from_agent)],
        combined_validation_context=CommonTlsContextCombinedCertificateValidationContext(
            default_validation_context=CertificateValidationContext(match_typed_subject_alt_names=matchers),
            validation_context_sds_secret_config=_sds(peer.trust_secret, peer.secrets_from_agent),
        ),
    )


def ref_tls_certificate_secret(name: str, chain: bytes, key: bytes) -> Secret:
    return Secret(
        name=name,
        tls_certificate=TlsCertificate(
            certificate_chain=DataSource(inline_bytes=chain), private_key=DataSource(inline_bytes=key)
        ),
    )


def ref_validation_context_secret(name: str, trusted_ca: bytes) -> Secret:
    return Secret(
        name=name, validation_context=CertificateValidationContext(trusted_ca=DataSource(inline_bytes=trusted_ca))
    )


def ref_cluster(spec: r.ClusterSpec) -> Cluster:
    transport_socket = None
    if spec.upstream_tls is not None:
        tls = UpstreamTlsContext(common_tls_context=ref_common_tls_context(spec.upstream_tls), sni=spec.sni)
        transport_socket = TransportSocket(name="envoy.transport_sockets.tls", typed_config=AnyMessage.pack(tls))
    protocol_options = {}
    if spec.http2:
        options = HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
        )
        protocol_options = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": AnyMessage.pack(options)}
    return Cluster(
        name=spec.name,
        type=ClusterDiscoveryType.EDS,
        eds_cluster_config=ClusterEdsClusterConfig(eds_config=_ADS),
        connect_timeout=spec.connect_timeout,
        transport_socket=transport_socket,
        typed_extension_protocol_options=protocol_options,
    )


def _address(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def ref_cluster_load_assignment(name: str, endpoints: tuple[tuple[str, int], ...]) -> ClusterLoadAssignment:
    return ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            LocalityLbEndpoints(
                lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_address(h, p))) for h, p in endpoints]
            )
        ],
    )


def _ref_action(spec: r.RouteSpec) -> RouteAction:
    if len(spec.clusters) == 1:
        return RouteAction(cluster=spec.clusters[0][0])
    return RouteAction(
        weighted_clusters=WeightedCluster(
            clusters=[WeightedClusterClusterWeight(name=n, weight=w) for n, w in spec.clusters]
        )
    )


def _ref_authenticated(exact: str | None = None, prefix: str | None = None) -> Principal:
    return Principal(authenticated=PrincipalAuthenticated(principal_name=StringMatcher(exact=exact, prefix=prefix)))


def ref_rbac_per_route(policy: r.CallerPolicy) -> RbacPerRoute:
    allowed = [_ref_authenticated(exact=i) for i in policy.allowed_spiffe_ids]
    allowed += [_ref_authenticated(prefix=p) for p in policy.allowed_spiffe_prefixes]
    policies = {}
    if allowed:
        principals = allowed
        if policy.denied_spiffe_ids:
            denied = Principal(or_ids=PrincipalSet(ids=[_ref_authenticated(exact=i) for i in policy.denied_spiffe_ids]))
            principals = [Principal(and_ids=PrincipalSet(ids=[Principal(or_ids=PrincipalSet(ids=allowed)),
                                                              Principal(not_id=denied)]))]
        policies["callers"] = Policy(permissions=[Permission(any=True)], principals=principals)
    return RbacPerRoute(rbac=Rbac(rules=RbacRules(action=RbacAction.ALLOW, policies=policies)))


def ref_route_configuration(name: str, virtual_hosts: tuple[r.VirtualHostSpec, ...]) -> RouteConfiguration:
    return RouteConfiguration(
        name=name,
        virtual_hosts=[
            VirtualHost(
                name=vh.name,
                domains=list(vh.domains),
                routes=[Route(match=RouteMatch(prefix=rt.prefix), route=_ref_action(rt)) for rt in vh.routes],
                typed_per_filter_config=(
                    {} if vh.callers is None else {"envoy.filters.http.rbac": AnyMessage.pack(ref_rbac_per_route(vh.callers))}
                ),
            )
            for vh in virtual_hosts
        ],
    )


def ref_http_listener(spec: r.HttpListenerSpec) -> Listener:
    manager = HttpConnectionManager(
        stat_prefix=spec.stat_prefix or spec.name,
        rds=Rds(config_source=_ADS, route_config_name=spec.route_config_name),
        http_filters=[
            *(
                [HttpFilter(name="envoy.filters.http.rbac", typed_config=AnyMessage.pack(Rbac(rules=RbacRules())))]
                if spec.authorize_requests
                else []
            ),
            HttpFilter(name="envoy.filters.http.router", typed_config=AnyMessage.pack(Router())),
        ],
        forward_client_cert_details=(
            HttpConnectionManagerForwardClientCertDetails.SANITIZE_SET
            if spec.downstream_tls is not None
            else HttpConnectionManagerForwardClientCertDetails.SANITIZE
        ),
        set_current_client_cert_details=HttpConnectionManagerSetCurrentClientCertDetails(uri=True),
    )
    transport_socket = None
    if spec.downstream_tls is not None:
        tls = DownstreamTlsContext(
            common_tls_context=ref_common_tls_context(spec.downstream_tls), require_client_certificate=True
        )
        transport_socket = TransportSocket(name="envoy.transport_sockets.tls", typed_config=AnyMessage.pack(tls))
    return Listener(
        name=spec.name,
        address=_address(spec.address, spec.port),
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(name="envoy.filters.network.http_connection_manager", typed_config=AnyMessage.pack(manager))
                ],
                transport_socket=transport_socket,
            )
        ],
    )


# --- Wire-level helpers. ---


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def top_level_fields(data: bytes) -> list[tuple[int, bytes]]:
    """(field number, the field's raw bytes including its key) for each top-level field, in wire order."""
    fields = []
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _read_varint(data, pos)
        elif wire_type == 2:
            size, pos = _read_varint(data, pos)
            pos += size
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
        fields.append((key >> 3, data[start:pos]))
    assert pos == len(data)
    return fields


def in_field_number_order(data: bytes) -> bytes:
    """`data` with its top-level fields stably sorted by number (protobuf's canonical order)."""
    return b"".join(raw for _, raw in sorted(top_level_fields(data), key=lambda field: field[0]))


# --- Specs: hand-picked edge cases plus seeded random ones. ---

TD = "spiffe://mesh.test"
UNICODE = ("", "ä", "svc-ü", "服务", "🚀-rocket", "a" * 200, "x|y:z/ü")


def _names(rng: random.Random) -> str:
    return rng.choice([*UNICODE, f"svc-{rng.randrange(10**6)}", f"outbound|svc-{rng.randrange(1000)}"])


def _peer(rng: random.Random) -> r.MtlsPeer:
    ids = tuple(f"{TD}/ns/{_names(rng)}/sa/{_names(rng)}" for _ in range(rng.choice([0, 0, 1, 2, 5])))
    prefixes = tuple(rng.choice([f"{TD}/", f"{TD}/ns/{_names(rng)}/sa/", ""]) for _ in range(rng.choice([0, 1, 3])))
    return r.MtlsPeer(
        allowed_spiffe_ids=ids,
        allowed_spiffe_prefixes=prefixes,
        certificate_secret=rng.choice([r.DEFAULT_CERT_SECRET, "", "cert-ü"]),
        trust_secret=rng.choice([r.ROOT_CA_SECRET, "", "ALL", f"{TD}"]),
    )


TIMEOUTS = (
    timedelta(seconds=2),
    timedelta(0),
    timedelta(microseconds=1),
    timedelta(milliseconds=250),
    timedelta(seconds=1, microseconds=500_000),
    timedelta(seconds=127),
    timedelta(seconds=128),
    timedelta(days=20_000, microseconds=999_999),
)
PORTS = (0, 1, 127, 128, 15006, 65535, 65536, 2**31, 2**32 - 1)


def cluster_specs() -> Iterator[r.ClusterSpec]:
    peers = [
        None,
        r.MtlsPeer(),
        r.MtlsPeer(allowed_spiffe_ids=(f"{TD}/ns/a/sa/b",)),
        r.MtlsPeer(allowed_spiffe_prefixes=(f"{TD}/",)),
        r.MtlsPeer(allowed_spiffe_ids=(f"{TD}/ns/a/sa/b",), secrets_from_agent=True),
        r.MtlsPeer(allowed_spiffe_prefixes=(f"{TD}/",), secrets_from_agent=True),
    ]
    for peer in peers:
        for http2 in (False, True):
            for sni in ("", "backend.shop.svc"):
                yield r.ClusterSpec("outbound|backend", upstream_tls=peer, sni=sni, http2=http2)
    for timeout in TIMEOUTS:
        yield r.ClusterSpec("c", connect_timeout=timeout)
    for name in UNICODE:
        yield r.ClusterSpec(name, upstream_tls=r.MtlsPeer(allowed_spiffe_ids=(f"{TD}/ns/{name}/sa/x",)))
    rng = random.Random(1)
    for _ in range(200):
        yield r.ClusterSpec(
            _names(rng),
            connect_timeout=rng.choice(TIMEOUTS),
            upstream_tls=rng.choice([None, _peer(rng)]),
            sni=rng.choice(["", _names(rng)]),
            http2=rng.random() < 0.5,
        )


def cla_cases() -> Iterator[tuple[str, tuple[tuple[str, int], ...]]]:
    yield "empty", ()
    yield "", ()
    yield "ports", tuple(("10.0.0.1", port) for port in PORTS)
    yield "hosts", (("", 80), ("::1", 8080), ("backend.shop.svc.cluster.local", 443), ("hôst-ü", 1))
    yield "many", tuple((f"10.{i // 256}.{i % 256}.1", 15006) for i in range(800))  # > 16 KiB: 3-byte lengths
    rng = random.Random(2)
    for _ in range(200):
        count = rng.choice([0, 1, 2, 10, 50])
        yield (
            _names(rng),
            tuple(
                (
                    rng.choice(["127.0.0.1", f"10.0.{rng.randrange(256)}.{rng.randrange(256)}", _names(rng)]),
                    rng.choice(PORTS),
                )
                for _ in range(count)
            ),
        )


CALLER_POLICIES = (
    r.CallerPolicy(),  # nothing allowed: RBAC without policies refuses every request
    r.CallerPolicy(allowed_spiffe_ids=(f"{TD}/ns/shop/sa/frontend",)),
    r.CallerPolicy(allowed_spiffe_prefixes=(f"{TD}/",)),
    r.CallerPolicy((f"{TD}/ns/a/sa/b", f"{TD}/ns/c/sa/d"), (f"{TD}/ns/shop/sa/",), (f"{TD}/ns/shop/sa/evil",)),
    r.CallerPolicy(allowed_spiffe_prefixes=(f"{TD}/",), denied_spiffe_ids=(f"{TD}/ns/x/sa/y", f"{TD}/ns/ü/sa/z")),
    r.CallerPolicy(denied_spiffe_ids=(f"{TD}/ns/x/sa/y",)),  # denied without allowed: still refuses everything
    r.CallerPolicy(allowed_spiffe_ids=("",), allowed_spiffe_prefixes=("",)),
)


def _callers(rng: random.Random) -> r.CallerPolicy:
    peer = _peer(rng)
    denied = tuple(f"{TD}/ns/{_names(rng)}/sa/{_names(rng)}" for _ in range(rng.choice([0, 0, 1, 3])))
    return r.CallerPolicy(peer.allowed_spiffe_ids, peer.allowed_spiffe_prefixes, denied)


def route_cases() -> Iterator[tuple[str, tuple[r.VirtualHostSpec, ...]]]:
    yield "none", ()
    yield "", (r.VirtualHostSpec(""),)
    yield "no-domains", (r.VirtualHostSpec("vh", domains=()),)
    yield "empty-strings", (r.VirtualHostSpec("vh", domains=("",), routes=(r.RouteSpec("", (("", 1),)),)),)
    yield "zero-clusters", (r.VirtualHostSpec("vh", routes=(r.RouteSpec("/", ()),)),)
    yield (
        "weights",
        (
            r.VirtualHostSpec(
                "vh",
                routes=(
                    r.RouteSpec("/a", (("a", 0), ("b", 1))),
                    r.RouteSpec("/b", (("a", 127), ("b", 128), ("c", 2**32 - 1))),
                    r.RouteSpec("/c", (("", 50), ("ü", 50))),
                ),
            ),
        ),
    )
    yield (
        "outbound",
        (
            r.VirtualHostSpec(
                "outbound", ("*",), tuple(r.RouteSpec(f"/svc-{i}/", ((f"outbound|svc-{i}", 1),)) for i in range(200))
            ),
        ),
    )
    inbound = (r.RouteSpec("/", (("local|backend", 1),)),)
    for callers in CALLER_POLICIES:
        yield "inbound|backend", (r.VirtualHostSpec("backend", ("*",), inbound, callers),)
    rng = random.Random(3)
    for _ in range(100):
        hosts = []
        for _ in range(rng.choice([0, 1, 1, 3])):
            routes = tuple(
                r.RouteSpec(
                    rng.choice(["/", "", f"/{_names(rng)}/"]),
                    tuple(
                        (_names(rng), rng.choice([0, 1, 50, 100, 1000, 2**32 - 1]))
                        for _ in range(rng.choice([0, 1, 1, 2, 4]))
                    ),
                )
                for _ in range(rng.choice([0, 1, 3, 8]))
            )
            domains = tuple(rng.choice(["*", "", "shop.example", _names(rng)]) for _ in range(rng.choice([0, 1, 3])))
            hosts.append(r.VirtualHostSpec(_names(rng), domains, routes, rng.choice([None, _callers(rng)])))
        yield _names(rng), tuple(hosts)


def listener_specs() -> Iterator[r.HttpListenerSpec]:
    agent = r.MtlsPeer(allowed_spiffe_prefixes=(f"{TD}/ns/shop/sa/",), secrets_from_agent=True)
    for peer in (None, r.MtlsPeer(), r.MtlsPeer(allowed_spiffe_prefixes=(f"{TD}/ns/shop/sa/",)), agent):
        for stat_prefix in ("", "inbound_backend"):
            yield r.HttpListenerSpec("inbound|backend", "0.0.0.0", 15006, "inbound|backend", peer, stat_prefix)
            yield r.HttpListenerSpec("inbound|backend", "0.0.0.0", 15006, "inbound|backend", peer, stat_prefix, True)
    yield r.HttpListenerSpec("", "", 0, "")
    for port in PORTS:
        yield r.HttpListenerSpec("l", "::", port, "routes")
    rng = random.Random(4)
    for _ in range(200):
        yield r.HttpListenerSpec(
            _names(rng),
            rng.choice(["0.0.0.0", "127.0.0.1", "::", ""]),
            rng.choice(PORTS),
            _names(rng),
            downstream_tls=rng.choice([None, _peer(rng)]),
            stat_prefix=rng.choice(["", _names(rng)]),
            authorize_requests=rng.random() < 0.5,
        )


def secret_cases() -> Iterator[tuple[str, bytes, bytes]]:
    yield r.DEFAULT_CERT_SECRET, b"", b""  # the probe secret meshca's publisher builds
    yield "", b"chain", b"key"
    yield "default", b"-----BEGIN CERTIFICATE-----\n" + bytes(range(256)) * 20, b"\x00" * 241
    yield "ü", b"x" * 127, b"y" * 128


def _check(new: EncodedResource, reference: betterproto2.Message, resource_type: ResourceType) -> None:
    """The new bytes decode to the reference message and are its bytes in field-number order."""
    decoded = type(reference).parse(new.payload)
    assert decoded == reference
    old_bytes = bytes(reference)
    assert new.payload == in_field_number_order(old_bytes)
    assert [n for n, _ in top_level_fields(new.payload)] == sorted(n for n, _ in top_level_fields(new.payload))
    assert new.type is resource_type
    if new.payload == old_bytes:  # then everything derived from the bytes is as before, version included
        old = encode_resource(resource_type, new.name, reference, new.references)
        assert (new.version, new.any_field, new.delta_prefix) == (old.version, old.any_field, old.delta_prefix)


def _tls_references(peer: r.MtlsPeer | None) -> set[Reference]:
    if peer is None or peer.secrets_from_agent:  # secrets from the local agent are not in the ADS snapshot
        return set()
    return {Reference(ResourceType.SECRET, peer.certificate_secret), Reference(ResourceType.SECRET, peer.trust_secret)}


def test_clusters() -> None:
    count = identical = 0
    for spec in cluster_specs():
        new = r.cluster(spec)
        reference = ref_cluster(spec)
        _check(new, reference, ResourceType.CLUSTER)
        assert new.name == spec.name
        assert new.references == {Reference(ResourceType.ENDPOINT, spec.name)} | _tls_references(spec.upstream_tls)
        count += 1
        identical += new.payload == bytes(reference)
        # betterproto2 writes fields in the .proto's declaration order, where transport_socket (24) comes
        # after typed_extension_protocol_options (36): only a cluster with both differs, in order only.
        assert (new.payload == bytes(reference)) == (not (spec.http2 and spec.upstream_tls is not None))
    assert count > 200 and identical < count


def test_cluster_load_assignments() -> None:
    for name, endpoints in cla_cases():
        new = r.cluster_load_assignment(name, endpoints)
        reference = ref_cluster_load_assignment(name, endpoints)
        _check(new, reference, ResourceType.ENDPOINT)
        assert new.payload == bytes(reference)
        assert (new.name, new.references) == (name, frozenset())


def test_route_configurations() -> None:
    for name, hosts in route_cases():
        new = r.route_configuration(name, hosts)
        reference = ref_route_configuration(name, hosts)
        _check(new, reference, ResourceType.ROUTE)
        assert new.payload == bytes(reference)
        expected = {Reference(ResourceType.CLUSTER, c) for vh in hosts for rt in vh.routes for c, _ in rt.clusters}
        assert (new.name, new.references) == (name, expected)


def test_http_listeners() -> None:
    for spec in listener_specs():
        new = r.http_listener(spec)
        reference = ref_http_listener(spec)
        _check(new, reference, ResourceType.LISTENER)
        assert new.payload == bytes(reference)
        expected = {Reference(ResourceType.ROUTE, spec.route_config_name)} | _tls_references(spec.downstream_tls)
        assert (new.name, new.references) == (spec.name, expected)


def test_secrets() -> None:
    for name, chain, key in secret_cases():
        new = r.tls_certificate_secret(name, chain, key)
        _check(new, ref_tls_certificate_secret(name, chain, key), ResourceType.SECRET)
        assert new.payload == bytes(ref_tls_certificate_secret(name, chain, key))
        bundle = r.validation_context_secret(name, chain)
        _check(bundle, ref_validation_context_secret(name, chain), ResourceType.SECRET)
        assert bundle.payload == bytes(ref_validation_context_secret(name, chain))
        assert new.references == bundle.references == frozenset()


def test_common_tls_context_decodes_to_the_reference_message() -> None:
    rng = random.Random(5)
    agent_peers = [replace(_peer(rng), secrets_from_agent=True) for _ in range(20)]
    for peer in [r.MtlsPeer(), *(_peer(rng) for _ in range(20)), *agent_peers]:
        cluster = Cluster.parse(r.cluster(r.ClusterSpec("c", upstream_tls=peer)).payload)
        assert cluster.transport_socket.typed_config.unpack().common_tls_context == ref_common_tls_context(peer)


def test_nested_any_type_urls() -> None:
    spec = r.HttpListenerSpec("l", "0.0.0.0", 1, "rc", downstream_tls=r.MtlsPeer())
    chain = Listener.parse(r.http_listener(spec).payload).filter_chains[0]
    assert isinstance(chain.filters[0].typed_config.unpack(), HttpConnectionManager)
    assert isinstance(chain.transport_socket.typed_config.unpack(), DownstreamTlsContext)
    cluster = Cluster.parse(r.cluster(r.ClusterSpec("c", upstream_tls=r.MtlsPeer(), http2=True)).payload)
    assert isinstance(cluster.transport_socket.typed_config.unpack(), UpstreamTlsContext)
    options = cluster.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert isinstance(options.unpack(), HttpProtocolOptions)


def test_request_authorization_decodes_to_the_reference_messages() -> None:
    """The listener's RBAC filter comes before the router and refuses by default (rules present, no
    policies); the route's RBACPerRoute, keyed by the filter's name, allows the callers, minus the denied."""
    spec = r.HttpListenerSpec("l", "0.0.0.0", 1, "rc", downstream_tls=r.MtlsPeer(), authorize_requests=True)
    manager = Listener.parse(r.http_listener(spec).payload).filter_chains[0].filters[0].typed_config.unpack()
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.rbac", "envoy.filters.http.router"]
    base = manager.http_filters[0].typed_config.unpack()
    assert isinstance(base, Rbac) and base.rules == RbacRules(action=RbacAction.ALLOW, policies={})
    policy = CALLER_POLICIES[3]
    host = RouteConfiguration.parse(r.route_configuration("rc", (r.VirtualHostSpec("vh", callers=policy),)).payload)
    per_route = host.virtual_hosts[0].typed_per_filter_config["envoy.filters.http.rbac"].unpack()
    assert isinstance(per_route, RbacPerRoute) and per_route == ref_rbac_per_route(policy)
    principal = per_route.rbac.rules.policies["callers"].principals[0]
    allowed, denied = principal.and_ids.ids
    assert [p.authenticated.principal_name for p in allowed.or_ids.ids] == [
        StringMatcher(exact=f"{TD}/ns/a/sa/b"),
        StringMatcher(exact=f"{TD}/ns/c/sa/d"),
        StringMatcher(prefix=f"{TD}/ns/shop/sa/"),
    ]
    assert denied.not_id.or_ids.ids[0].authenticated.principal_name == StringMatcher(exact=f"{TD}/ns/shop/sa/evil")


INVALID: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]] = [
    (
        "port too large",
        lambda: r.cluster_load_assignment("c", (("h", 2**32),)),
        lambda: bytes(ref_cluster_load_assignment("c", (("h", 2**32),))),
    ),
    (
        "negative port",
        lambda: r.http_listener(r.HttpListenerSpec("l", "h", -1, "rc")),
        lambda: bytes(ref_http_listener(r.HttpListenerSpec("l", "h", -1, "rc"))),
    ),
    (
        "weight too large",
        lambda: r.route_configuration(
            "rc", (r.VirtualHostSpec("v", routes=(r.RouteSpec("/", (("a", 2**32), ("b", 1))),)),)
        ),
        None,
    ),
    (
        "negative weight",
        lambda: r.route_configuration(
            "rc", (r.VirtualHostSpec("v", routes=(r.RouteSpec("/", (("a", -1), ("b", 1))),)),)
        ),
        None,
    ),
    ("lone surrogate", lambda: r.cluster(r.ClusterSpec("\ud800")), lambda: bytes(ref_cluster(r.ClusterSpec("\ud800")))),
    # betterproto2 encodes -1.5 s as {seconds: -1, nanos: 500000000} (-0.5 s); meshca refuses a negative timeout.
    ("negative timeout", lambda: r.cluster(r.ClusterSpec("c", connect_timeout=timedelta(seconds=-1.5))), None),
]


@pytest.mark.parametrize(("build", "reference"), [(b, ref) for _, b, ref in INVALID], ids=[n for n, _, _ in INVALID])
def test_invalid_values_are_refused(build: Callable[[], Any], reference: Callable[[], Any] | None) -> None:
    with pytest.raises(ValueError):
        build()
    if reference is not None:  # envoy-data-plane (pydantic) refuses them too
        with pytest.raises(ValueError):
            reference()


def test_agent_mode_secrets_come_from_the_agent_cluster() -> None:
    """Agent mode: both SdsSecretConfigs name the local agent's cluster over SotW gRPC; no Secret is referenced."""
    peer = r.MtlsPeer(allowed_spiffe_ids=(f"{TD}/ns/a/sa/b",), secrets_from_agent=True)
    for resource in (r.cluster(r.ClusterSpec("c", upstream_tls=peer)), r.http_listener(
        r.HttpListenerSpec("l", "0.0.0.0", 1, "rc", downstream_tls=peer)
    )):
        assert not [ref for ref in resource.references if ref.type is ResourceType.SECRET]
        if resource.type is ResourceType.CLUSTER:
            tls = Cluster.parse(resource.payload).transport_socket.typed_config.unpack()
        else:
            tls = Listener.parse(resource.payload).filter_chains[0].transport_socket.typed_config.unpack()
        context = tls.common_tls_context
        configs = [context.tls_certificate_sds_secret_configs[0],
                   context.combined_validation_context.validation_context_sds_secret_config]
        assert [c.name for c in configs] == [r.DEFAULT_CERT_SECRET, r.ROOT_CA_SECRET]
        for config in configs:
            source = config.sds_config.api_config_source
            assert source.api_type == ApiConfigSourceApiType.GRPC
            assert [g.envoy_grpc.cluster_name for g in source.grpc_services] == [r.AGENT_CLUSTER]
            assert config.sds_config.ads is None
