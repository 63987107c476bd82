"""End to end: a real meshca, the agent, and a real Envoy taking `default`/`ROOTCA` over SDS from the agent's Unix socket
(static mTLS listener and cluster): the key Envoy holds is the agent's, a meshca outage longer than half a leaf's
lifetime costs no request, and an agent restart brings a new key without dropping traffic."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from meshca_harness import TRUST_DOMAIN, RunningMeshca, running_meshca

from meshca.agent.service import NodeAgent
from meshca.agent.settings import AgentSettings, WorkloadSettings
from meshca.agent.workload import Retry
from meshca.ca import crypto
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock
from meshca.dev.envoy_process import EnvoyProcess, dynamic_active_secrets, free_port, wait_until
from meshca.dev.harness import (
    RequestResult,
    TrafficLoop,
    backend_app,
    envoy_certificate,
    http_get,
    serve_app,
)
from meshca.dev.tokens import write_dev_issuer
from meshca.mesh.resources import DEFAULT_CERT_SECRET, ROOT_CA_SECRET

pytestmark = pytest.mark.e2e

TTL = timedelta(seconds=30)
FRONTEND = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."


def _sds(name: str) -> dict[str, Any]:
    """An SdsSecretConfig reading from the agent (the contract's `meshca_agent` cluster)."""
    source = {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "meshca_agent"}}],
    }
    return {"name": name, "sds_config": {"api_config_source": source, "resource_api_version": "V3"}}


_COMMON_TLS = {
    "tls_certificate_sds_secret_configs": [_sds(DEFAULT_CERT_SECRET)],
    "combined_validation_context": {
        "default_validation_context": {
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": FRONTEND}}]
        },
        "validation_context_sds_secret_config": _sds(ROOT_CA_SECRET),
    },
}


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _cluster(name: str, address: dict[str, Any], **extra: Any) -> dict[str, Any]:
    endpoints = [{"lb_endpoints": [{"endpoint": {"address": address}}]}]
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": endpoints}, **extra}


def _http(prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                     ".HttpConnectionManager",
            "stat_prefix": prefix,
            "forward_client_cert_details": "SANITIZE_SET",
            "set_current_client_cert_details": {"uri": True},
            "route_config": {"virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}
            ]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        },
    }


def agent_bootstrap(agent_socket: Path, app_port: int, mtls_port: int, plain_port: int) -> dict[str, Any]:
    """Requests to `plain_port` go over mTLS (the agent's certificate on both ends) to `mtls_port`, then to the app."""
    http2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }}
    upstream_tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": _TLS + "UpstreamTlsContext", "common_tls_context": _COMMON_TLS}}
    downstream_tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": _TLS + "DownstreamTlsContext", "common_tls_context": _COMMON_TLS,
        "require_client_certificate": True}}
    return {
        "node": {"id": "frontend-1", "cluster": "frontend", "metadata": {"MESHCA_AGENT": "sds"}},
        "admin": {"address": _address(0)},
        "static_resources": {
            "clusters": [
                _cluster("meshca_agent", {"pipe": {"path": str(agent_socket)}}, typed_extension_protocol_options=http2),
                _cluster("app", _address(app_port)),
                _cluster("mtls", _address(mtls_port), transport_socket=upstream_tls),
            ],
            "listeners": [
                {"name": "mtls_in", "address": _address(mtls_port), "filter_chains": [
                    {"transport_socket": downstream_tls, "filters": [_http("mtls_in", "app")]}]},
                {"name": "plain_out", "address": _address(plain_port), "filter_chains": [
                    {"filters": [_http("plain_out", "mtls")]}]},
            ],
        },
    }


@dataclass
class Node:
    """One node: the agent's settings, its Envoy, and where requests through the mesh go in."""

    settings: AgentSettings
    envoy: EnvoyProcess
    url: str

    def request(self) -> RequestResult:
        status, body = http_get(self.url, timeout=3.0)
        peer = body.get("peer") if isinstance(body, dict) else None
        return RequestResult(status == 200 and peer == FRONTEND, status, peer, None)

    def envoy_key_sha256(self) -> str | None:
        """SHA-256 of the public key of the `default` leaf Envoy holds (its config_dump shows no private key)."""
        secret = dynamic_active_secrets(self.envoy.config_dump()).get(DEFAULT_CERT_SECRET, {})
        inline = secret.get("tls_certificate", {}).get("certificate_chain", {}).get("inline_bytes", "")
        if not inline:
            return None
        leaf = crypto.split_pem_certificates(base64.b64decode(inline))[0]
        return hashlib.sha256(crypto.parse_certificate_pem(leaf).public_key.spki_der).hexdigest()


@contextlib.asynccontextmanager
async def meshca_with_short_leaves(directory: Path, port: int = 0, **options: Any) -> AsyncIterator[RunningMeshca]:
    if not (directory / "ca").exists():
        settings = CaSettings(trust_domain=TRUST_DOMAIN, leaf_ttl_default=TTL, leaf_ttl_min=timedelta(seconds=10))
        CertificateAuthority.init(directory / "ca", settings, system_clock)
        write_dev_issuer(directory / "jwt")
    async with running_meshca(directory, port=port, **options) as meshca:
        yield meshca


@contextlib.asynccontextmanager
async def node(tmp_path: Path, socket_dir: Path, meshca: RunningMeshca) -> AsyncIterator[Node]:
    (tmp_path / "root.pem").write_bytes(meshca.root_pem)
    token_file = tmp_path / "frontend.jwt"
    token_file.write_text(meshca.token("shop", "frontend", node_id="frontend-1"))
    settings = AgentSettings(
        meshca=(("127.0.0.1", meshca.port),), server_name="localhost", ca=tmp_path / "root.pem",
        workloads=(WorkloadSettings("frontend", token_file, socket_dir / "frontend.sock"),), ttl=TTL,
        timeout=timedelta(seconds=2),
    )
    app_port, mtls_port, plain_port = free_port(), free_port(), free_port()
    app = serve_app(app_port, backend_app("backend"))
    envoy = EnvoyProcess(agent_bootstrap(settings.workloads[0].socket, app_port, mtls_port, plain_port),
                         workdir=tmp_path / "envoy")
    try:
        yield Node(settings, envoy, f"http://127.0.0.1:{plain_port}/hello")
    finally:
        await asyncio.to_thread(envoy.stop)
        app.shutdown()


def start_agent(settings: AgentSettings) -> NodeAgent:
    # a 1 s..4 s backoff keeps the catch-up after the outage within the test's patience
    return NodeAgent(settings, system_clock, logging.getLogger("meshca.agent.test"), retry=Retry(cap=timedelta(seconds=4)))


async def until(predicate: Any, timeout: float, what: str) -> Any:
    """wait_until off the event loop, which serves the agent's SDS and meshca meanwhile."""
    return await asyncio.to_thread(wait_until, predicate, timeout, 0.1, what)


async def test_envoy_holds_the_agents_key_and_a_meshca_outage_costs_no_request(
    tmp_path: Path, socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    outage_started = None
    async with contextlib.AsyncExitStack() as stack:
        meshca = await stack.enter_async_context(meshca_with_short_leaves(tmp_path / "meshca"))
        port = meshca.port
        mesh_node = await stack.enter_async_context(node(tmp_path, socket_dir, meshca))
        agent = start_agent(mesh_node.settings)
        await agent.start()
        stack.push_async_callback(agent.stop)
        await asyncio.to_thread(mesh_node.envoy.start)
        await agent.wait_served(10)
        (identity,) = agent.identities
        await until(lambda: mesh_node.request().ok, 15, "a request over mTLS with the agent's certificate")
        first = identity.served
        assert first is not None
        certificate = await asyncio.to_thread(envoy_certificate, mesh_node.envoy)
        assert certificate is not None and certificate.spiffe_id == FRONTEND
        assert int(certificate.serial, 16) == int(first.serial_number, 16)
        assert await asyncio.to_thread(mesh_node.envoy_key_sha256) == first.key_sha256

        with TrafficLoop(mesh_node.request, pause=0.05) as traffic:
            await meshca.app.stop(0)
            outage_started = asyncio.get_running_loop().time()
            # past the latest jittered renewal (60% of the lifetime) and so past half of it: renewals fail meanwhile
            renew_latest = (first.not_after - first.received_at) * 0.6 + timedelta(seconds=1)
            await asyncio.sleep(max(0.0, (first.received_at + renew_latest - system_clock()).total_seconds()))
            assert identity.failures >= 1 and identity.served == first
            outage = asyncio.get_running_loop().time() - outage_started
            assert outage > TTL.total_seconds() / 2
            async with meshca_with_short_leaves(tmp_path / "meshca", port=port):
                await until(lambda: identity.served != first, 10, "a renewal once meshca is back")
                renewed = identity.served
                assert renewed is not None and renewed.key_sha256 != first.key_sha256
                await until(lambda: mesh_node.envoy_key_sha256() == renewed.key_sha256, 10,
                            "Envoy serving the renewed certificate")
        assert traffic.ok > 0 and traffic.failures == []
    assert "PRIVATE KEY" not in caplog.text


async def test_agent_restart_brings_a_new_key_without_dropping_a_request(tmp_path: Path, socket_dir: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        meshca = await stack.enter_async_context(meshca_with_short_leaves(tmp_path / "meshca"))
        mesh_node = await stack.enter_async_context(node(tmp_path, socket_dir, meshca))
        first_agent = start_agent(mesh_node.settings)
        await first_agent.start()
        await asyncio.to_thread(mesh_node.envoy.start)
        await until(lambda: mesh_node.request().ok, 15, "a request over mTLS with the agent's certificate")
        old = first_agent.identities[0].served
        assert old is not None
        with TrafficLoop(mesh_node.request, pause=0.05) as traffic:
            await asyncio.sleep(0.5)
            await first_agent.stop()
            second_agent = start_agent(mesh_node.settings)
            await second_agent.start()
            stack.push_async_callback(second_agent.stop)
            await second_agent.wait_served(10)
            new = second_agent.identities[0].served
            assert new is not None and new.key_sha256 != old.key_sha256
            await until(lambda: mesh_node.envoy_key_sha256() == new.key_sha256, 15, "Envoy taking the new key")
            await asyncio.sleep(0.5)
        assert traffic.ok > 0 and traffic.failures == []
