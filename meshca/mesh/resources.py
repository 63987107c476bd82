"""Resource builders: typed specs in, Envoy resources (encoded once, by a small protobuf encoder) out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from meshca.xds.snapshot import EncodedResource, Reference, ResourceType, encode_payload
from meshca.xds.wire import length_delimited, varint

DEFAULT_CERT_SECRET = "default"
ROOT_CA_SECRET = "ROOTCA"
# Agent mode (docs/agent.md, "Agent mode on meshca"): a node whose first request's metadata has AGENT_METADATA_KEY: AGENT_METADATA_VALUE
# takes its secrets from the local meshca agent, reached through the bootstrap's static cluster AGENT_CLUSTER.
AGENT_METADATA_KEY = "MESHCA_AGENT"
AGENT_METADATA_VALUE = "sds"
AGENT_CLUSTER = "meshca_agent"

# Encoding (docs/performance.md, section 3, "Encoder decision"): each builder writes the protobuf
# bytes of its resource directly, in field-number order (protobuf's canonical order), with the
# field numbers of Envoy's v3 API noted next to each field as `Message.field = number`. Semantics
# follow proto3 as betterproto2 and upb apply them: scalar fields with their default value are
# left out, members of a oneof, set sub-messages and repeated entries are always written (even
# when empty). tests/test_resource_encoding.py checks the bytes against envoy-data-plane for many
# specs; an Envoy accepting them is checked by the e2e tests.

_UINT32_MAX = 0xFFFFFFFF
_msg = length_delimited  # a sub-message (written even when empty) or raw bytes


def _text(number: int, value: str) -> bytes:
    """A string field that is always written (a oneof member or a repeated entry); UTF-8 checked."""
    return length_delimited(number, value.encode())


def _plain_text(number: int, value: str) -> bytes:
    """A proto3 string field without presence: left out when empty."""
    return _text(number, value) if value else b""


def _uint32(value: int, what: str) -> bytes:
    if not 0 <= value <= _UINT32_MAX:
        raise ValueError(f"{what} {value} is outside uint32 (0..{_UINT32_MAX})")
    return varint(value)


def _any(type_url: str, value: bytes) -> bytes:
    """google.protobuf.Any: type_url = 1, value = 2 (left out when the packed message is empty)."""
    return _text(1, type_url) + (_msg(2, value) if value else b"")


_TYPE_PREFIX = "type.googleapis.com/"
_UPSTREAM_TLS_URL = _TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_DOWNSTREAM_TLS_URL = _TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_HCM_URL = _TYPE_PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER_URL = _TYPE_PREFIX + "envoy.extensions.filters.http.router.v3.Router"
_RBAC_URL = _TYPE_PREFIX + "envoy.extensions.filters.http.rbac.v3.RBAC"
_RBAC_PER_ROUTE_URL = _TYPE_PREFIX + "envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
RBAC_FILTER = "envoy.filters.http.rbac"  # also the key of its per-route config: the names must match
CALLERS_POLICY = "callers"
_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS_SOCKET = "envoy.transport_sockets.tls"

# ConfigSource{ads = 3: AggregatedConfigSource{}, resource_api_version = 6: V3 (2)}
_ADS = _msg(3, b"") + b"\x30\x02"
# ConfigSource{api_config_source = 2: ApiConfigSource{api_type = 1: GRPC (2), transport_api_version = 8: V3 (2),
#   grpc_services = 4: [GrpcService{envoy_grpc = 1: {cluster_name = 1}}]}, resource_api_version = 6: V3 (2)}.
# ApiConfigSource is written in its .proto's declaration order (8 before 4), as envoy-data-plane writes it, so
# tests/test_resource_encoding.py can compare the bytes inside the Any it sits in (parsers accept either order).
_AGENT_SDS = _msg(2, b"\x08\x02\x40\x02" + _msg(4, _msg(1, _text(1, AGENT_CLUSTER)))) + b"\x30\x02"
# Cluster.type = 2: EDS (3); Cluster.eds_cluster_config = 3: {eds_config = 1: ADS}
_CLUSTER_EDS = b"\x10\x03" + _msg(3, _msg(1, _ADS))
# Cluster.typed_extension_protocol_options = 36 (map<string, Any>): one entry {key = 1, value = 2}
# holding HttpProtocolOptions{explicit_http_config = 3: {http2_protocol_options = 2: {}}}.
_CLUSTER_HTTP2 = _msg(
    36,
    _text(1, _HTTP_PROTOCOL_OPTIONS) + _msg(2, _any(_TYPE_PREFIX + _HTTP_PROTOCOL_OPTIONS, _msg(3, _msg(2, b"")))),
)
# HttpConnectionManager.http_filters = 5: HttpFilter{name = 1, typed_config = 4: Any(Router{})}
_HCM_ROUTER = _msg(5, _text(1, "envoy.filters.http.router") + _msg(4, _any(_ROUTER_URL, b"")))
# HttpFilter{name = 1, typed_config = 4: Any(RBAC{rules = 1: config.rbac.v3.RBAC{action ALLOW (0, the
# default), no policies}})}: refuses every request unless the route's RBACPerRoute (over RDS) authorizes it.
# Without `rules` the filter would let everything through, hence the empty but present message.
_HCM_RBAC_DENY_ALL = _msg(5, _text(1, RBAC_FILTER) + _msg(4, _any(_RBAC_URL, _msg(1, b""))))
# HttpConnectionManager.forward_client_cert_details = 16 (varint): SANITIZE_SET (3); SANITIZE (0) is the default
_HCM_SANITIZE_SET = b"\x80\x01\x03"
# HttpConnectionManager.set_current_client_cert_details = 17: {uri = 5: true}
_HCM_CLIENT_CERT_DETAILS = b"\x8a\x01\x02\x28\x01"
# DownstreamTlsContext.require_client_certificate = 2: BoolValue{value = 1: true}
_REQUIRE_CLIENT_CERTIFICATE = _msg(2, b"\x08\x01")
_SAN_TYPE_URI = b"\x08\x03"  # SubjectAltNameMatcher.san_type = 1: URI (3)


def _sds(name: str, from_agent: bool = False) -> bytes:
    """SdsSecretConfig{name = 1, sds_config = 2: ADS, or the local agent's SDS}."""
    return _plain_text(1, name) + _msg(2, _AGENT_SDS if from_agent else _ADS)


def _transport_socket(type_url: str, tls_context: bytes) -> bytes:
    """TransportSocket{name = 1: envoy.transport_sockets.tls, typed_config = 3: Any}."""
    return _text(1, _TLS_SOCKET) + _msg(3, _any(type_url, tls_context))


@dataclass(frozen=True)
class MtlsPeer:
    """TLS settings shared by both directions: our cert secret, the trust secret, the peer IDs we accept."""

    allowed_spiffe_ids: tuple[str, ...] = ()  # exact IDs; with no IDs and no prefixes: any the bundle vouches for
    allowed_spiffe_prefixes: tuple[str, ...] = ()  # e.g. 'spiffe://td/ns/shop/sa/' for a whole namespace
    certificate_secret: str = DEFAULT_CERT_SECRET
    trust_secret: str = ROOT_CA_SECRET
    # Both secrets from the local agent (AGENT_CLUSTER), not over ADS: then they are not references into the snapshot.
    secrets_from_agent: bool = False

    def references(self) -> list[Reference]:
        if self.secrets_from_agent:
            return []
        return [
            Reference(ResourceType.SECRET, self.certificate_secret),
            Reference(ResourceType.SECRET, self.trust_secret),
        ]


def _common_tls_context(peer: MtlsPeer) -> bytes:
    """CommonTlsContext{tls_certificate_sds_secret_configs = 6, combined_validation_context = 8}."""
    # SubjectAltNameMatcher{san_type = 1: URI, matcher = 2: StringMatcher{exact = 1 | prefix = 2}}
    matchers = [_msg(15, _SAN_TYPE_URI + _msg(2, _text(1, uri))) for uri in peer.allowed_spiffe_ids]
    matchers += [_msg(15, _SAN_TYPE_URI + _msg(2, _text(2, prefix))) for prefix in peer.allowed_spiffe_prefixes]
    # CombinedCertificateValidationContext{default_validation_context = 1:
    #   CertificateValidationContext{match_typed_subject_alt_names = 15}, validation_context_sds_secret_config = 2}
    combined = _msg(1, b"".join(matchers)) + _msg(2, _sds(peer.trust_secret, peer.secrets_from_agent))
    return _msg(6, _sds(peer.certificate_secret, peer.secrets_from_agent)) + _msg(8, combined)


def _data_source(data: bytes) -> bytes:
    """DataSource{inline_bytes = 2} (a oneof member: written even when empty)."""
    return _msg(2, data)


def tls_certificate_secret(name: str, certificate_chain_pem: bytes, private_key_pem: bytes) -> EncodedResource:
    """An SDS secret with a certificate chain and its private key (never logged: only bytes leave here)."""
    # Secret{name = 1, tls_certificate = 2: TlsCertificate{certificate_chain = 1, private_key = 2}}
    tls_certificate = _msg(1, _data_source(certificate_chain_pem)) + _msg(2, _data_source(private_key_pem))
    return encode_payload(ResourceType.SECRET, name, _plain_text(1, name) + _msg(2, tls_certificate), private_key=True)


def validation_context_secret(name: str, trusted_ca_pem: bytes, crl_pem: bytes = b"") -> EncodedResource:
    """An SDS secret holding a trust bundle (e.g. `ROOTCA`) and, when given, the CRLs of its CAs."""
    # Secret{name = 1, validation_context = 4: CertificateValidationContext{trusted_ca = 1, crl = 7}}
    crl = _msg(7, _data_source(crl_pem)) if crl_pem else b""
    payload = _plain_text(1, name) + _msg(4, _msg(1, _data_source(trusted_ca_pem)) + crl)
    return encode_payload(ResourceType.SECRET, name, payload)


@dataclass(frozen=True)
class ClusterSpec:
    """An EDS cluster, optionally speaking mTLS (and HTTP/2) to its upstream."""

    name: str
    connect_timeout: timedelta = timedelta(seconds=2)
    upstream_tls: MtlsPeer | None = None
    sni: str = ""
    http2: bool = False


_ZERO = timedelta(0)
_MICROSECOND = timedelta(microseconds=1)


def _duration(value: timedelta) -> bytes:
    """google.protobuf.Duration{seconds = 1, nanos = 2}, microsecond precision as timedelta has."""
    if value < _ZERO:
        raise ValueError(f"a negative duration ({value}) is not a valid timeout")
    seconds, micros = divmod(value // _MICROSECOND, 1_000_000)
    return (b"\x08" + varint(seconds) if seconds else b"") + (b"\x10" + varint(micros * 1000) if micros else b"")


def cluster(spec: ClusterSpec) -> EncodedResource:
    references = [Reference(ResourceType.ENDPOINT, spec.name)]
    # Cluster{name = 1, type = 2, eds_cluster_config = 3, connect_timeout = 4, transport_socket = 24,
    #         typed_extension_protocol_options = 36}
    payload = _plain_text(1, spec.name) + _CLUSTER_EDS + _msg(4, _duration(spec.connect_timeout))
    if spec.upstream_tls is not None:
        references += spec.upstream_tls.references()
        # UpstreamTlsContext{common_tls_context = 1, sni = 2}
        tls = _msg(1, _common_tls_context(spec.upstream_tls)) + _plain_text(2, spec.sni)
        payload += _msg(24, _transport_socket(_UPSTREAM_TLS_URL, tls))
    if spec.http2:
        payload += _CLUSTER_HTTP2
    return encode_payload(ResourceType.CLUSTER, spec.name, payload, references)


def _socket_address(host: str, port: int) -> bytes:
    """Address{socket_address = 1: SocketAddress{address = 2, port_value = 3 (oneof: always written)}}."""
    return _msg(1, _plain_text(2, host) + b"\x18" + _uint32(port, "port"))


def cluster_load_assignment(cluster_name: str, endpoints: Sequence[tuple[str, int]]) -> EncodedResource:
    # ClusterLoadAssignment{cluster_name = 1, endpoints = 2: [LocalityLbEndpoints{lb_endpoints = 2:
    #   [LbEndpoint{endpoint = 1: Endpoint{address = 1}}]}]}
    lb_endpoints = b"".join([_msg(2, _msg(1, _msg(1, _socket_address(h, p)))) for h, p in endpoints])
    payload = _plain_text(1, cluster_name) + _msg(2, lb_endpoints)
    return encode_payload(ResourceType.ENDPOINT, cluster_name, payload)


@dataclass(frozen=True)
class RouteSpec:
    """Requests whose path starts with `prefix` go to one cluster or are split by weight."""

    prefix: str
    clusters: tuple[tuple[str, int], ...]  # (cluster name, weight); one entry means no split


@dataclass(frozen=True)
class CallerPolicy:
    """Who may send requests, checked by Envoy's RBAC filter on every request against the peer
    certificate's URI SAN (`authenticated.principal_name`). Nothing allowed: every request is refused."""

    allowed_spiffe_ids: tuple[str, ...] = ()  # exact IDs
    allowed_spiffe_prefixes: tuple[str, ...] = ()  # e.g. 'spiffe://td/ns/shop/sa/' or 'spiffe://td/'
    denied_spiffe_ids: tuple[str, ...] = ()  # refused even where an allowed ID or prefix matches


@dataclass(frozen=True)
class VirtualHostSpec:
    name: str
    domains: tuple[str, ...] = ("*",)
    routes: tuple[RouteSpec, ...] = ()
    callers: CallerPolicy | None = None  # with a listener built with `authorize_requests`


def _authenticated(matcher_field: int, value: str) -> bytes:
    """Principal{authenticated = 4: {principal_name = 2: StringMatcher{exact = 1 | prefix = 2}}}."""
    return _msg(4, _msg(2, _text(matcher_field, value)))


def _principal_set(field_number: int, principals: Sequence[bytes]) -> bytes:
    """Principal{and_ids = 1 | or_ids = 2: Principal.Set{ids = 1}}."""
    return _msg(field_number, b"".join([_msg(1, principal) for principal in principals]))


def _rbac_per_route(policy: CallerPolicy) -> bytes:
    """RBACPerRoute{rbac = 2: RBAC{rules = 1: config.rbac.v3.RBAC{action: ALLOW (0), policies = 2}}}."""
    allowed = [_authenticated(1, spiffe_id) for spiffe_id in policy.allowed_spiffe_ids]
    allowed += [_authenticated(2, prefix) for prefix in policy.allowed_spiffe_prefixes]
    rules = b""
    if allowed:
        if policy.denied_spiffe_ids:
            # and_ids[or_ids(allowed), not_id = 8: or_ids(denied)]
            denied = _principal_set(2, [_authenticated(1, spiffe_id) for spiffe_id in policy.denied_spiffe_ids])
            principals = [_principal_set(1, [_principal_set(2, allowed), _msg(8, denied)])]
        else:
            principals = allowed
        # Policy{permissions = 1: [Permission{any = 3: true}], principals = 2}
        body = _msg(1, b"\x18\x01") + b"".join([_msg(2, principal) for principal in principals])
        rules = _msg(2, _text(1, CALLERS_POLICY) + _msg(2, body))  # map entry {key = 1, value = 2}
    return _msg(2, _msg(1, rules))


def _route(spec: RouteSpec) -> bytes:
    """Route{match = 1: RouteMatch{prefix = 1}, route = 2: RouteAction}."""
    if len(spec.clusters) == 1:
        action = _text(1, spec.clusters[0][0])  # RouteAction.cluster = 1 (oneof)
    else:
        # RouteAction.weighted_clusters = 3: WeightedCluster{clusters = 1: [ClusterWeight{name = 1,
        #   weight = 2: UInt32Value{value = 1}}]}
        weights = [
            _msg(1, _plain_text(1, name) + _msg(2, (b"\x08" + _uint32(weight, "weight")) if weight else b""))
            for name, weight in spec.clusters
        ]
        action = _msg(3, b"".join(weights))
    return _msg(1, _text(1, spec.prefix)) + _msg(2, action)


def _virtual_host(vh: VirtualHostSpec) -> bytes:
    """VirtualHost{name = 1, domains = 2, routes = 3, typed_per_filter_config = 15 (map<string, Any>)}."""
    host = (
        _plain_text(1, vh.name)
        + b"".join([_text(2, domain) for domain in vh.domains])
        + b"".join([_msg(3, _route(route)) for route in vh.routes])
    )
    if vh.callers is not None:
        host += _msg(15, _text(1, RBAC_FILTER) + _msg(2, _any(_RBAC_PER_ROUTE_URL, _rbac_per_route(vh.callers))))
    return host


def route_configuration(name: str, virtual_hosts: Sequence[VirtualHostSpec]) -> EncodedResource:
    # RouteConfiguration{name = 1, virtual_hosts = 2}
    hosts = [_msg(2, _virtual_host(vh)) for vh in virtual_hosts]
    references = [
        Reference(ResourceType.CLUSTER, cluster_name)
        for vh in virtual_hosts
        for r in vh.routes
        for cluster_name, _ in r.clusters
    ]
    return encode_payload(ResourceType.ROUTE, name, _plain_text(1, name) + b"".join(hosts), references)


@dataclass(frozen=True)
class HttpListenerSpec:
    """An HTTP listener whose routes come over RDS; with `downstream_tls` it requires mTLS."""

    name: str
    address: str
    port: int
    route_config_name: str
    downstream_tls: MtlsPeer | None = None
    stat_prefix: str = ""
    authorize_requests: bool = False  # an RBAC filter refusing what the route's CallerPolicy does not allow


def http_listener(spec: HttpListenerSpec) -> EncodedResource:
    # HttpConnectionManager{stat_prefix = 2, rds = 3: Rds{config_source = 1, route_config_name = 2},
    #   http_filters = 5, forward_client_cert_details = 16, set_current_client_cert_details = 17}
    manager = (
        _plain_text(2, spec.stat_prefix or spec.name)
        + _msg(3, _msg(1, _ADS) + _plain_text(2, spec.route_config_name))
        + (_HCM_RBAC_DENY_ALL if spec.authorize_requests else b"")
        + _HCM_ROUTER
        + (_HCM_SANITIZE_SET if spec.downstream_tls is not None else b"")
        + _HCM_CLIENT_CERT_DETAILS
    )
    # FilterChain{filters = 3: [Filter{name = 1, typed_config = 4: Any}], transport_socket = 6}
    chain = _msg(3, _text(1, "envoy.filters.network.http_connection_manager") + _msg(4, _any(_HCM_URL, manager)))
    references = [Reference(ResourceType.ROUTE, spec.route_config_name)]
    if spec.downstream_tls is not None:
        references += spec.downstream_tls.references()
        # DownstreamTlsContext{common_tls_context = 1, require_client_certificate = 2}
        tls = _msg(1, _common_tls_context(spec.downstream_tls)) + _REQUIRE_CLIENT_CERTIFICATE
        chain += _msg(6, _transport_socket(_DOWNSTREAM_TLS_URL, tls))
    # Listener{name = 1, address = 2, filter_chains = 3}
    payload = _plain_text(1, spec.name) + _msg(2, _socket_address(spec.address, spec.port)) + _msg(3, chain)
    return encode_payload(ResourceType.LISTENER, spec.name, payload, references)
