"""Resource builders: typed specs in, Envoy resources (encoded once, with their references) out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterDiscoveryType,
    ClusterEdsClusterConfig,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    AggregatedConfigSource,
    ApiVersion,
    ConfigSource,
    DataSource,
    Http2ProtocolOptions,
    SocketAddress,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
    WeightedClusterClusterWeight,
)
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
from envoy_data_plane.google.protobuf import Any

from meshca.snapshot import EncodedResource, Reference, ResourceType, encode_resource

DEFAULT_CERT_SECRET = "default"
ROOT_CA_SECRET = "ROOTCA"

_ADS = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)


def _sds(name: str) -> SdsSecretConfig:
    return SdsSecretConfig(name=name, sds_config=_ADS)


@dataclass(frozen=True)
class MtlsPeer:
    """TLS settings shared by both directions: our cert secret, the trust secret, the peer IDs we accept."""

    allowed_spiffe_ids: tuple[str, ...] = ()  # exact IDs; with no IDs and no prefixes: any the bundle vouches for
    allowed_spiffe_prefixes: tuple[str, ...] = ()  # e.g. 'spiffe://td/ns/shop/sa/' for a whole namespace
    certificate_secret: str = DEFAULT_CERT_SECRET
    trust_secret: str = ROOT_CA_SECRET

    def references(self) -> list[Reference]:
        return [
            Reference(ResourceType.SECRET, self.certificate_secret),
            Reference(ResourceType.SECRET, self.trust_secret),
        ]

    def common_tls_context(self) -> CommonTlsContext:
        matchers = [
            SubjectAltNameMatcher(san_type=SubjectAltNameMatcherSanType.URI, matcher=StringMatcher(exact=spiffe_id))
            for spiffe_id in self.allowed_spiffe_ids
        ] + [
            SubjectAltNameMatcher(san_type=SubjectAltNameMatcherSanType.URI, matcher=StringMatcher(prefix=prefix))
            for prefix in self.allowed_spiffe_prefixes
        ]
        return CommonTlsContext(
            tls_certificate_sds_secret_configs=[_sds(self.certificate_secret)],
            combined_validation_context=CommonTlsContextCombinedCertificateValidationContext(
                default_validation_context=CertificateValidationContext(
                    match_typed_subject_alt_names=matchers
                ),
                validation_context_sds_secret_config=_sds(self.trust_secret),
            ),
        )


def tls_certificate_secret(name: str, certificate_chain_pem: bytes, private_key_pem: bytes) -> EncodedResource:
    """An SDS secret with a certificate chain and its private key (never logged: only bytes leave here)."""
    secret = Secret(
        name=name,
        tls_certificate=TlsCertificate(
            certificate_chain=DataSource(inline_bytes=certificate_chain_pem),
            private_key=DataSource(inline_bytes=private_key_pem),
        ),
    )
    return encode_resource(ResourceType.SECRET, name, secret)


def validation_context_secret(name: str, trusted_ca_pem: bytes) -> EncodedResource:
    """An SDS secret holding a trust bundle (e.g. `ROOTCA`)."""
    secret = Secret(
        name=name,
        validation_context=CertificateValidationContext(trusted_ca=DataSource(inline_bytes=trusted_ca_pem)),
    )
    return encode_resource(ResourceType.SECRET, name, secret)


@dataclass(frozen=True)
class ClusterSpec:
    """An EDS cluster, optionally speaking mTLS (and HTTP/2) to its upstream."""

    name: str
    connect_timeout: timedelta = timedelta(seconds=2)
    upstream_tls: MtlsPeer | None = None
    sni: str = ""
    http2: bool = False


def cluster(spec: ClusterSpec) -> EncodedResource:
    references = [Reference(ResourceType.ENDPOINT, spec.name)]
    transport_socket = None
    if spec.upstream_tls is not None:
        references += spec.upstream_tls.references()
        tls = UpstreamTlsContext(common_tls_context=spec.upstream_tls.common_tls_context(), sni=spec.sni)
        transport_socket = TransportSocket(name="envoy.transport_sockets.tls", typed_config=Any.pack(tls))
    protocol_options = {}
    if spec.http2:
        options = HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                http2_protocol_options=Http2ProtocolOptions()
            )
        )
        protocol_options = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": Any.pack(options)}
    message = Cluster(
        name=spec.name,
        type=ClusterDiscoveryType.EDS,
        eds_cluster_config=ClusterEdsClusterConfig(eds_config=_ADS),
        connect_timeout=spec.connect_timeout,
        transport_socket=transport_socket,
        typed_extension_protocol_options=protocol_options,
    )
    return encode_resource(ResourceType.CLUSTER, spec.name, message, references)


def _socket_address(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def cluster_load_assignment(cluster_name: str, endpoints: Sequence[tuple[str, int]]) -> EncodedResource:
    message = ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[
            LocalityLbEndpoints(
                lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_socket_address(h, p))) for h, p in endpoints]
            )
        ],
    )
    return encode_resource(ResourceType.ENDPOINT, cluster_name, message)


@dataclass(frozen=True)
class RouteSpec:
    """Requests whose path starts with `prefix` go to one cluster or are split by weight."""

    prefix: str
    clusters: tuple[tuple[str, int], ...]  # (cluster name, weight); one entry means no split


@dataclass(frozen=True)
class VirtualHostSpec:
    name: str
    domains: tuple[str, ...] = ("*",)
    routes: tuple[RouteSpec, ...] = ()


def _route_action(spec: RouteSpec) -> RouteAction:
    if len(spec.clusters) == 1:
        return RouteAction(cluster=spec.clusters[0][0])
    return RouteAction(
        weighted_clusters=WeightedCluster(
            clusters=[WeightedClusterClusterWeight(name=n, weight=w) for n, w in spec.clusters]
        )
    )


def route_configuration(name: str, virtual_hosts: Sequence[VirtualHostSpec]) -> EncodedResource:
    message = RouteConfiguration(
        name=name,
        virtual_hosts=[
            VirtualHost(
                name=vh.name,
                domains=list(vh.domains),
                routes=[Route(match=RouteMatch(prefix=r.prefix), route=_route_action(r)) for r in vh.routes],
            )
            for vh in virtual_hosts
        ],
    )
    references = [
        Reference(ResourceType.CLUSTER, cluster_name)
        for vh in virtual_hosts
        for r in vh.routes
        for cluster_name, _ in r.clusters
    ]
    return encode_resource(ResourceType.ROUTE, name, message, references)


@dataclass(frozen=True)
class HttpListenerSpec:
    """An HTTP listener whose routes come over RDS; with `downstream_tls` it requires mTLS."""

    name: str
    address: str
    port: int
    route_config_name: str
    downstream_tls: MtlsPeer | None = None
    stat_prefix: str = ""


def http_listener(spec: HttpListenerSpec) -> EncodedResource:
    manager = HttpConnectionManager(
        stat_prefix=spec.stat_prefix or spec.name,
        rds=Rds(config_source=_ADS, route_config_name=spec.route_config_name),
        http_filters=[HttpFilter(name="envoy.filters.http.router", typed_config=Any.pack(Router()))],
        forward_client_cert_details=(
            HttpConnectionManagerForwardClientCertDetails.SANITIZE_SET
            if spec.downstream_tls is not None
            else HttpConnectionManagerForwardClientCertDetails.SANITIZE
        ),
        set_current_client_cert_details=HttpConnectionManagerSetCurrentClientCertDetails(uri=True),
    )
    references = [Reference(ResourceType.ROUTE, spec.route_config_name)]
    transport_socket = None
    if spec.downstream_tls is not None:
        references += spec.downstream_tls.references()
        tls = DownstreamTlsContext(
            common_tls_context=spec.downstream_tls.common_tls_context(),
            require_client_certificate=True,
        )
        transport_socket = TransportSocket(name="envoy.transport_sockets.tls", typed_config=Any.pack(tls))
    message = Listener(
        name=spec.name,
        address=_socket_address(spec.address, spec.port),
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(name="envoy.filters.network.http_connection_manager", typed_config=Any.pack(manager))
                ],
                transport_socket=transport_socket,
            )
        ],
    )
    return encode_resource(ResourceType.LISTENER, spec.name, message, references)
