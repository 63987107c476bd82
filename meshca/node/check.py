"""`meshca bootstrap --check`: connect as the bootstrap's Envoy would and say in one line what fails."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.service.discovery.v3 import DeltaDiscoveryRequest, DiscoveryRequest
from envoy_data_plane.google.protobuf import Struct, Value

from meshca.node.bootstrap import BootstrapSettings, build_bootstrap
from meshca.xds.server import ADS_METHOD, DELTA_ADS_METHOD
from meshca.xds.snapshot import ResourceType

_PROBE_RESOURCE = "ROOTCA"  # every admitted node may fetch the trust bundle


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    line: str  # one line for the user; never contains the token


def _token(settings: BootstrapSettings) -> tuple[str | None, str | None]:
    """(token, None) or (None, why the token file is unusable), as Envoy would read it."""
    if settings.token is not None:
        return settings.token, None
    assert settings.token_path is not None
    path = settings.token_path
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, f"token file {path}: cannot read it ({error.strerror})"
    if data.endswith(b"\n") or data.endswith(b"\r"):
        return None, (
            f"token file {path} ends with a newline: Envoy sends it verbatim and every xDS stream fails "
            "with code 13; write it with printf '%s'"
        )
    text = data.decode("ascii", errors="replace")
    if not text or any(c.isspace() or not c.isprintable() for c in text):
        return None, f"token file {path}: not a bare JWT (empty, or holds whitespace or control characters)"
    return text, None


def _tls_problem(settings: BootstrapSettings, timeout: float) -> str | None:
    """Connect and handshake as Envoy does (meshca's root, SNI and name check); None when it works."""
    where = f"{settings.meshca_address}:{settings.meshca_port}"
    try:
        context = ssl.create_default_context(cafile=str(settings.meshca_ca_path))
    except (OSError, ssl.SSLError) as error:
        return f"--ca {settings.meshca_ca_path}: not a usable PEM certificate bundle ({error})"
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((settings.meshca_address, settings.meshca_port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=settings.meshca_server_name):
                return None
    except ssl.SSLCertVerificationError as error:
        reason = error.verify_message or str(error)
        if "hostname" in reason.lower() or "ip address mismatch" in reason.lower():
            return (
                f"TLS: meshca's certificate at {where} is not valid for server name "
                f"{settings.meshca_server_name!r} ({reason}); use one of meshca's server_names as --server-name"
            )
        return (
            f"TLS: meshca's certificate at {where} does not verify against --ca {settings.meshca_ca_path} "
            f"({reason}); pass meshca's root bundle"
        )
    except ssl.SSLError as error:
        return f"TLS handshake with {where} failed ({error.reason or error}); is this meshca's gRPC port?"
    except OSError as error:
        return f"cannot reach meshca at {where}: {error.strerror or error}"


def _request(settings: BootstrapSettings) -> tuple[str, bytes]:
    node_metadata = build_bootstrap(settings)["node"]["metadata"]  # with agent mode's key, as Envoy sends it
    metadata = Struct(fields={k: Value(string_value=v) for k, v in node_metadata.items()})
    node = Node(id=settings.node_id, cluster=settings.cluster, metadata=metadata)
    type_url = ResourceType.SECRET.value
    names = [_PROBE_RESOURCE]
    if settings.agent_socket is not None:
        # meshca sends an agent-mode node no Secret: ask for every cluster (wildcard), which it always answers
        type_url, names = ResourceType.CLUSTER.value, []
    if settings.api_type == "DELTA_GRPC":
        delta = DeltaDiscoveryRequest(node=node, type_url=type_url, resource_names_subscribe=names)
        return DELTA_ADS_METHOD, bytes(delta)
    return ADS_METHOD, bytes(DiscoveryRequest(node=node, type_url=type_url, resource_names=names))


def _ads_problem(settings: BootstrapSettings, token: str, timeout: float) -> str | None:
    """One ADS request carrying the node, over gRPC with the bootstrap's CA, server name and token."""
    method, payload = _request(settings)
    credentials = grpc.ssl_channel_credentials(root_certificates=settings.meshca_ca_path.read_bytes())
    host = settings.meshca_address
    target = f"[{host}]:{settings.meshca_port}" if ":" in host else f"{host}:{settings.meshca_port}"
    options = [
        ("grpc.ssl_target_name_override", settings.meshca_server_name),
        ("grpc.default_authority", settings.meshca_server_name),
    ]
    done = threading.Event()

    def requests() -> Iterator[bytes]:
        yield payload
        done.wait(timeout)  # keep the stream open until the answer arrived

    with grpc.secure_channel(target, credentials, options=options) as channel:
        call = channel.stream_stream(method)(requests(), metadata=[("authorization", f"Bearer {token}")], timeout=timeout)
        try:
            next(iter(call))
        except StopIteration:
            return "meshca closed the stream without an answer"
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""  # type: ignore[attr-defined]
            if code == grpc.StatusCode.UNAUTHENTICATED:
                return f"token refused by meshca (UNAUTHENTICATED): {details}"
            if code == grpc.StatusCode.PERMISSION_DENIED:
                return f"node binding refused by meshca (PERMISSION_DENIED): {details}"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"meshca did not answer within {timeout:g} s"
            return f"ADS stream failed: {code.name}: {details}"
        finally:
            done.set()
            call.cancel()
    return None


def check_bootstrap(settings: BootstrapSettings, timeout: float = 10.0) -> CheckResult:
    """Token, then TLS (CA and server name), then one ADS request with the node: the first failure wins."""
    token, problem = _token(settings)
    problem = problem or _tls_problem(settings, timeout)
    if problem is None:
        assert token is not None
        problem = _ads_problem(settings, token, timeout)
    if problem is not None:
        return CheckResult(False, f"check failed: {problem}")
    return CheckResult(
        True,
        f"check ok: meshca at {settings.meshca_address}:{settings.meshca_port} verified as "
        f"{settings.meshca_server_name!r} and admitted node {settings.node_id!r} ({settings.api_type})",
    )
