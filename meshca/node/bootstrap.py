"""Envoy bootstrap rendering for a node that gets all of its configuration from meshca over ADS."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meshca.mesh.resources import AGENT_CLUSTER, AGENT_METADATA_KEY, AGENT_METADATA_VALUE

XDS_CLUSTER_NAME = "meshca_xds"
TRUST_SECRET_NAME = "meshca_trust"  # the Secret in meshca.node.trust's SDS document
TOKEN_SECRET_NAME = "meshca_token"  # the generic Secret naming the token file (meshca.node.trust)
TOKEN_SDS_FILE = "meshca-token-sds.json"  # beside the trust SDS document, written by `meshca trust sync --token-file`
API_TYPES = ("GRPC", "DELTA_GRPC")
FILE_BASED_METADATA = "envoy.grpc_credentials.file_based_metadata"

_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS_CONTEXT = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_FILE_BASED_METADATA_CONFIG = "envoy.config.grpc_credential.v3.FileBasedMetadataConfig"
_CREDENTIAL_INJECTOR = "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector"
_GENERIC_CREDENTIAL = "envoy.extensions.http.injected_credentials.generic.v3.Generic"
_UPSTREAM_CODEC = "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
_TYPE_URL_PREFIX = "type.googleapis.com/"

# Fixed tuning for the control-plane connection (not user settings: sensible for every node).
_CONNECT_TIMEOUT_S = 5.0
# A replica that hangs (SIGSTOP, a stuck host) is noticed by these pings alone: 10 s (+-15 % jitter) + 5 s,
# so its proxies move to another replica within ~17 s, well inside a short leaf's renewal margin. meshca
# accepts pings every 5 s (meshca.app's grpc.http2.min_ping_interval_without_data_ms).
_H2_KEEPALIVE_INTERVAL_S = 10.0
_H2_KEEPALIVE_TIMEOUT_S = 5.0
_TCP_KEEPALIVE_TIME_S = 60
_TCP_KEEPALIVE_INTERVAL_S = 15
_TCP_KEEPALIVE_PROBES = 4
_H2_MAX_STREAMS = 100
_H2_INITIAL_STREAM_WINDOW = 1 << 20       # 1 MiB: a full CDS/LDS push fits without stalls
_H2_INITIAL_CONNECTION_WINDOW = 4 << 20
# Reconnect backoff of the ADS stream (jittered: each wait is uniform in [0, interval), the interval
# doubling from base to max). Envoy's default (0.5 s .. 30 s) left proxies 9-20 s without a
# control plane after a 30 s outage; with a 5 s cap they are back within 5 s of meshca.
_RETRY_BASE_S = 0.25
_RETRY_MAX_S = 5.0


@dataclass(frozen=True)
class BootstrapSettings:
    """Everything that varies between nodes; exactly one of `token` / `token_path` is set."""

    node_id: str
    cluster: str
    meshca_address: str
    meshca_port: int
    meshca_ca_path: Path
    meshca_server_name: str = "meshca.local"
    token: str | None = None
    token_path: Path | None = None
    admin_port: int = 0
    admin_address: str = "127.0.0.1"
    node_metadata: Mapping[str, str] = field(default_factory=dict)
    api_type: str = "DELTA_GRPC"
    initial_fetch_timeout_seconds: float = 15
    # Further meshca replicas (host, port) after the first: one control-plane cluster with every one of them,
    # so a proxy whose replica dies reconnects to another.
    more_meshca: tuple[tuple[str, int], ...] = ()
    # A file-based SDS document (meshca.node.trust, kept current by `meshca trust sync`) that the xds cluster
    # takes meshca's trust from, reloaded when it is replaced in its directory; None: `meshca_ca_path`, read once.
    meshca_trust_sds_path: Path | None = None
    # Agent mode (docs/agent.md, "Agent mode on meshca"): the local meshca agent's Unix socket, where the node's secrets come from
    # (the static cluster AGENT_CLUSTER, and node metadata AGENT_METADATA_KEY telling meshca to send none).
    agent_socket: Path | None = None

    @property
    def uses_google_grpc(self) -> bool:
        """A token file without --trust-dir: gRPC's own client, which re-reads the token file per stream (but
        reads its root file only at start). With --trust-dir the token is injected on Envoy's own cluster."""
        return self.token_path is not None and self.meshca_trust_sds_path is None

    @property
    def meshca_endpoints(self) -> tuple[tuple[str, int], ...]:
        """Every meshca address, the first (`meshca_address`, `meshca_port`) first."""
        return ((self.meshca_address, self.meshca_port), *self.more_meshca)

    def __post_init__(self) -> None:
        if (self.token is None) == (self.token_path is None):
            raise ValueError("exactly one of 'token' and 'token_path' must be set")
        if self.token is not None and (not self.token or any(c in self.token for c in "\r\n\0 ")):
            raise ValueError("'token' must be a non-empty JWT without whitespace")
        if not self.node_id:
            raise ValueError("'node_id' must not be empty")
        if not self.cluster:
            raise ValueError("'cluster' must not be empty")
        if not self.meshca_address:
            raise ValueError("'meshca_address' must not be empty")
        if not self.meshca_server_name:
            raise ValueError("'meshca_server_name' must not be empty")
        if not 1 <= self.meshca_port <= 65535:
            raise ValueError(f"'meshca_port' {self.meshca_port} is not in 1..65535")
        for address, port in self.more_meshca:
            if not address or not 1 <= port <= 65535:
                raise ValueError(f"'more_meshca' entry {address!r}:{port} needs an address and a port in 1..65535")
        if len(set(self.meshca_endpoints)) != len(self.meshca_endpoints):
            raise ValueError("a meshca address is given twice")
        if self.uses_google_grpc and len(self.meshca_endpoints) > 1 and not all(
            _is_ip(address) for address, _ in self.meshca_endpoints
        ):
            raise ValueError(
                "several meshca addresses with a token file must all be IP addresses (gRPC lists only those); "
                "or give one DNS name that resolves to every replica"
            )
        if self.uses_google_grpc and len({":" in address for address, _ in self.meshca_endpoints}) > 1:
            raise ValueError("several meshca addresses with a token file must be all IPv4 or all IPv6 (one gRPC target)")
        if not 0 <= self.admin_port <= 65535:
            raise ValueError(f"'admin_port' {self.admin_port} is not in 0..65535")
        if self.api_type not in API_TYPES:
            raise ValueError(f"'api_type' {self.api_type!r} must be one of {API_TYPES}")
        if self.initial_fetch_timeout_seconds < 0:
            raise ValueError("'initial_fetch_timeout_seconds' must be >= 0 (0 disables it)")
        for key, value in self.node_metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"'node_metadata' must map str to str, got {key!r}: {value!r}")
        if AGENT_METADATA_KEY in self.node_metadata:
            raise ValueError(f"'node_metadata' key {AGENT_METADATA_KEY!r} is set by agent mode ('agent_socket') only")
        if self.agent_socket is not None and not self.agent_socket.is_absolute():
            raise ValueError(f"'agent_socket' {str(self.agent_socket)!r} must be an absolute path")


def _duration(seconds: float) -> str:
    """A protobuf Duration in its JSON/YAML form, e.g. '15s', '0.25s'."""
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


def _socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _target_uri(address: str, port: int) -> str:
    """gRPC target for google_grpc; IPv6 literals need brackets."""
    if ":" in address and not address.startswith("["):
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def _grpc_target(endpoints: tuple[tuple[str, int], ...]) -> str:
    """One address as host:port (gRPC's DNS resolver: a name may resolve to every replica); several IP
    addresses as gRPC's static list (`ipv4:a:p,b:p` / `ipv6:...`, `ipv6:` when any is IPv6), which its
    pick_first policy walks in order when a connection fails."""
    if len(endpoints) == 1:
        return _target_uri(*endpoints[0])
    scheme = "ipv6" if any(":" in address for address, _ in endpoints) else "ipv4"
    return scheme + ":" + ",".join(_target_uri(address, port) for address, port in endpoints)


def _xds_cluster(s: BootstrapSettings) -> dict[str, Any]:
    """The static cluster to meshca: HTTP/2 over TLS, meshca's cert checked by CA and DNS SAN; one host
    per meshca address (round robin: each new ADS stream after a failure goes to the next one)."""
    cluster: dict[str, Any] = {
        "name": XDS_CLUSTER_NAME,
        "type": "STATIC" if all(_is_ip(address) for address, _ in s.meshca_endpoints) else "STRICT_DNS",
        "connect_timeout": _duration(_CONNECT_TIMEOUT_S),
        "load_assignment": {
            "cluster_name": XDS_CLUSTER_NAME,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _socket_address(address, port)}} for address, port in s.meshca_endpoints
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            _HTTP_PROTOCOL_OPTIONS: {
                "@type": _TYPE_URL_PREFIX + _HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "max_concurrent_streams": _H2_MAX_STREAMS,
                        "initial_stream_window_size": _H2_INITIAL_STREAM_WINDOW,
                        "initial_connection_window_size": _H2_INITIAL_CONNECTION_WINDOW,
                        "connection_keepalive": {
                            "interval": _duration(_H2_KEEPALIVE_INTERVAL_S),
                            "timeout": _duration(_H2_KEEPALIVE_TIMEOUT_S),
                        },
                    }
                },
            }
        },
        "upstream_connection_options": {
            "tcp_keepalive": {
                "keepalive_time": _TCP_KEEPALIVE_TIME_S,
                "keepalive_interval": _TCP_KEEPALIVE_INTERVAL_S,
                "keepalive_probes": _TCP_KEEPALIVE_PROBES,
            }
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _TYPE_URL_PREFIX + _UPSTREAM_TLS_CONTEXT,
                "sni": s.meshca_server_name,
                "common_tls_context": {"alpn_protocols": ["h2"], **_meshca_validation(s)},
            },
        },
    }
    if s.token_path is not None and s.meshca_trust_sds_path is not None:
        options = cluster["typed_extension_protocol_options"][_HTTP_PROTOCOL_OPTIONS]
        options["http_filters"] = _token_injection(s.token_path, s.meshca_trust_sds_path.parent / TOKEN_SDS_FILE)
    return cluster


def _token_injection(token_path: Path, token_sds_path: Path) -> list[dict[str, Any]]:
    """Upstream filters of the xds cluster that put `authorization: Bearer <token file>` on every request (each
    new ADS stream). The token comes from a file-based SDS secret naming the token file; watching the token's
    directory makes Envoy read it again when it is replaced there (a rename, or the kubelet's ..data swap)."""
    credential = {
        "name": TOKEN_SECRET_NAME,
        "sds_config": {
            "path_config_source": {"path": str(token_sds_path), "watched_directory": {"path": str(token_path.parent)}},
            "resource_api_version": "V3",
        },
    }
    return [
        {
            "name": "envoy.filters.http.credential_injector",
            "typed_config": {
                "@type": _TYPE_URL_PREFIX + _CREDENTIAL_INJECTOR,
                "overwrite": True,
                "credential": {
                    "name": "envoy.http.injected_credentials.generic",
                    "typed_config": {
                        "@type": _TYPE_URL_PREFIX + _GENERIC_CREDENTIAL,
                        "credential": credential,
                        "header": "authorization",
                        "header_value_prefix": "Bearer ",
                    },
                },
            },
        },
        {"name": "envoy.filters.http.upstream_codec", "typed_config": {"@type": _TYPE_URL_PREFIX + _UPSTREAM_CODEC}},
    ]


def _meshca_validation(s: BootstrapSettings) -> dict[str, Any]:
    """How the xds cluster checks meshca: the root file read once, or the trust bundle from a file-based SDS
    secret that Envoy reloads whenever a file is moved into its directory (`meshca trust sync` renames into it);
    the server name is checked either way."""
    san = {"match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": s.meshca_server_name}}]}
    if s.meshca_trust_sds_path is None:
        return {"validation_context": {"trusted_ca": {"filename": str(s.meshca_ca_path)}, **san}}
    return {
        "combined_validation_context": {
            "default_validation_context": san,
            "validation_context_sds_secret_config": {
                "name": TRUST_SECRET_NAME,
                "sds_config": {
                    "path_config_source": {
                        "path": str(s.meshca_trust_sds_path),
                        "watched_directory": {"path": str(s.meshca_trust_sds_path.parent)},
                    },
                    "resource_api_version": "V3",
                },
            },
        }
    }


def _grpc_service(s: BootstrapSettings) -> dict[str, Any]:
    """envoy_grpc with an inline bearer token (or, with --trust-dir, the token file injected by the cluster's
    upstream filter), or google_grpc re-reading `token_path` per stream."""
    if not s.uses_google_grpc:
        service: dict[str, Any] = {
            "envoy_grpc": {
                "cluster_name": XDS_CLUSTER_NAME,
                # envoy_grpc.retry_policy is what Envoy 1.40 reads for the xDS stream's reconnect backoff
                # (GrpcService.retry_policy is for data-plane clients and ignored here).
                "retry_policy": {
                    "retry_back_off": {
                        "base_interval": _duration(_RETRY_BASE_S),
                        "max_interval": _duration(_RETRY_MAX_S),
                    }
                },
            },
        }
        if s.token is not None:
            service["initial_metadata"] = [{"key": "authorization", "value": f"Bearer {s.token}"}]
        return service
    assert s.token_path is not None
    # Envoy's own cluster cannot carry call credentials; google_grpc can. TLS is checked by
    # gRPC itself here: the server name is enforced with ssl_target_name_override, since the
    # target may be an IP address. Envoy 1.40 ignores envoy_grpc's retry_policy here, so its own
    # stream backoff stays at its default (0.5 s .. 30 s); the channel args below at least keep
    # gRPC's connection backoff (default 1 s .. 120 s) from adding to it.
    return {
        "google_grpc": {
            "target_uri": _grpc_target(s.meshca_endpoints),
            "stat_prefix": XDS_CLUSTER_NAME,
            "channel_credentials": {
                "ssl_credentials": {"root_certs": {"filename": str(s.meshca_ca_path)}}
            },
            "call_credentials": [
                {
                    "from_plugin": {
                        "name": FILE_BASED_METADATA,
                        "typed_config": {
                            "@type": _TYPE_URL_PREFIX + _FILE_BASED_METADATA_CONFIG,
                            "secret_data": {"filename": str(s.token_path)},
                            "header_key": "authorization",
                            "header_prefix": "Bearer ",
                        },
                    }
                }
            ],
            "credentials_factory_name": FILE_BASED_METADATA,
            "channel_args": {
                "args": {
                    "grpc.ssl_target_name_override": {"string_value": s.meshca_server_name},
                    "grpc.default_authority": {"string_value": s.meshca_server_name},
                    "grpc.keepalive_time_ms": {"int_value": int(_H2_KEEPALIVE_INTERVAL_S * 1000)},
                    "grpc.keepalive_timeout_ms": {"int_value": int(_H2_KEEPALIVE_TIMEOUT_S * 1000)},
                    # gRPC stops pinging after 2 pings with no data between them (its default): a quiet
                    # stream to a hung replica would never be noticed
                    "grpc.http2.max_pings_without_data": {"int_value": 0},
                    "grpc.initial_reconnect_backoff_ms": {"int_value": int(_RETRY_BASE_S * 1000)},
                    "grpc.min_reconnect_backoff_ms": {"int_value": int(_RETRY_BASE_S * 1000)},
                    "grpc.max_reconnect_backoff_ms": {"int_value": int(_RETRY_MAX_S * 1000)},
                }
            },
        }
    }


def _agent_cluster(socket: Path) -> dict[str, Any]:
    """The static cluster to the local agent's SDS: gRPC (HTTP/2, plaintext) over its Unix socket."""
    return {
        "name": AGENT_CLUSTER,
        "type": "STATIC",
        "connect_timeout": _duration(1.0),
        "load_assignment": {
            "cluster_name": AGENT_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(socket)}}}}]}],
        },
        "typed_extension_protocol_options": {
            _HTTP_PROTOCOL_OPTIONS: {
                "@type": _TYPE_URL_PREFIX + _HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def _config_source(s: BootstrapSettings) -> dict[str, Any]:
    return {
        "ads": {},
        "resource_api_version": "V3",
        "initial_fetch_timeout": _duration(s.initial_fetch_timeout_seconds),
    }


def build_bootstrap(settings: BootstrapSettings) -> dict[str, Any]:
    """The bootstrap as a plain dict (JSON/YAML-ready, proto3 JSON field names in snake_case)."""
    s = settings
    metadata = dict(s.node_metadata)
    clusters = [_xds_cluster(s)]
    if s.agent_socket is not None:
        metadata[AGENT_METADATA_KEY] = AGENT_METADATA_VALUE
        clusters.append(_agent_cluster(s.agent_socket))
    return {
        "node": {
            "id": s.node_id,
            "cluster": s.cluster,
            "metadata": metadata,
        },
        "admin": {"address": _socket_address(s.admin_address, s.admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": s.api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [_grpc_service(s)],
            },
            "cds_config": _config_source(s),
            "lds_config": _config_source(s),
        },
        "static_resources": {"clusters": clusters},
    }


class _QuotedStr(str):
    """A string value written quoted: Envoy's YAML reader (yaml-cpp) turns plain `y`, `no`, `on`, `1e5` or
    `0x1f` into a bool or number, so a node id like `y` would not stay a string."""


class _BootstrapDumper(yaml.SafeDumper):
    pass


_BootstrapDumper.add_representer(
    _QuotedStr, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style='"')
)


def _quote_values(node: Any) -> Any:
    """Every string value (not mapping keys) quoted; everything else as it is."""
    if isinstance(node, dict):
        return {key: _quote_values(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_quote_values(item) for item in node]
    if isinstance(node, str):
        return _QuotedStr(node)
    return node


def render_yaml(settings: BootstrapSettings) -> str:
    """The bootstrap as YAML text, for `envoy -c <file>.yaml`; string values are quoted."""
    return yaml.dump(
        _quote_values(build_bootstrap(settings)),
        Dumper=_BootstrapDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 30,  # never fold a long value (an inline token) across lines
    )
