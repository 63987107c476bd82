"""End to end: a real Envoy opens ADS to meshca over TLS with a JWT and gets config and its own certificate."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import timedelta
from pathlib import Path

import pytest
from meshca_harness import TRUST_DOMAIN, frontend_envoy, running_meshca

from meshca.dev.envoy_process import (
    EnvoyProcess,
    dynamic_active_clusters,
    dynamic_active_secrets,
    dynamic_endpoint_configs,
    dynamic_listeners,
    dynamic_route_configs,
    dynamic_warming_clusters,
    free_port,
    wait_until,
)
from meshca.mesh import resources as r

pytestmark = pytest.mark.e2e

FRONTEND_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"
BACKEND_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/backend"


def mesh(listener_port: int) -> list:
    upstream = r.MtlsPeer(allowed_spiffe_ids=(BACKEND_ID,))
    downstream = r.MtlsPeer(allowed_spiffe_ids=(FRONTEND_ID,))
    return [
        r.cluster(r.ClusterSpec("backend", upstream_tls=upstream)),
        r.cluster_load_assignment("backend", [("127.0.0.1", free_port())]),
        r.route_configuration("backend-routes", [r.VirtualHostSpec("backend", routes=(r.RouteSpec("/", (("backend", 1),)),))]),
        r.http_listener(r.HttpListenerSpec("inbound", "127.0.0.1", listener_port, "backend-routes", downstream)),
    ]


def converged(envoy: EnvoyProcess) -> dict | None:
    dump = envoy.config_dump()
    secrets = dynamic_active_secrets(dump)
    if (
        "backend" in dynamic_active_clusters(dump)
        and "inbound" in dynamic_listeners(dump)
        and "backend-routes" in dynamic_route_configs(dump)
        and {"default", "ROOTCA"} <= set(secrets)
    ):
        return dump
    return None


async def test_envoy_gets_cluster_listener_route_and_its_own_certificate(tmp_path: Path) -> None:
    async with running_meshca(tmp_path) as meshca:
        listener_port = free_port()
        meshca.app.publisher.set_mesh(mesh(listener_port))
        with frontend_envoy(meshca, tmp_path) as envoy:
            await asyncio.to_thread(envoy.wait_ready, 20)
            dump = await asyncio.to_thread(wait_until, lambda: converged(envoy), 20, 0.2, "envoy converged")
            # the listener is active only when its secrets arrived: its port is bound
            listener = dynamic_listeners(dump)["inbound"]
            assert listener["address"]["socket_address"]["port_value"] == listener_port
            with socket.create_connection(("127.0.0.1", listener_port), timeout=2):
                pass
            secret = dynamic_active_secrets(dump)["default"]
            assert secret["tls_certificate"]["private_key"]["inline_bytes"] == "W3JlZGFjdGVkXQ=="  # "[redacted]"
            # the default certificate Envoy holds carries the token's identity as its only URI SAN
            certs = json.loads(await asyncio.to_thread(envoy.admin_get, "/certs"))
            sans = [
                san["uri"]
                for entry in certs["certificates"]
                for cert in entry.get("cert_chain", [])
                for san in cert.get("subject_alt_names", [])
                if "uri" in san
            ]
            assert FRONTEND_ID in sans
            assert BACKEND_ID not in sans
            # Envoy ACKed every type: no update was rejected
            stats = await asyncio.to_thread(envoy.stats)
            assert stats.get("cluster_manager.cds.update_rejected", 0) == 0
            assert stats.get("listener_manager.lds.update_rejected", 0) == 0
            proxies = meshca.app.registry.snapshot()
            assert [p.node_id for p in proxies] == ["frontend-1"] and proxies[0].identity == FRONTEND_ID
            assert proxies[0].last_nack is None


async def test_changed_cluster_warms_at_once_and_endpoint_change_is_applied(tmp_path: Path) -> None:
    """Envoy re-requests EDS with an already-ACKed nonce when a cluster changes; meshca must answer it
    (else the cluster warms until initial_fetch_timeout, 15 s)."""
    async with running_meshca(tmp_path) as meshca:
        listener_port = free_port()
        first_mesh = mesh(listener_port)
        meshca.app.publisher.set_mesh(first_mesh)
        with frontend_envoy(meshca, tmp_path) as envoy:
            await asyncio.to_thread(wait_until, lambda: converged(envoy), 20, 0.2, "envoy converged")
            # 1. only the cluster changes; its ClusterLoadAssignment stays the same
            changed = mesh(listener_port)
            changed[0] = r.cluster(
                r.ClusterSpec("backend", connect_timeout=timedelta(seconds=7), upstream_tls=r.MtlsPeer((BACKEND_ID,)))
            )
            changed[1] = first_mesh[1]
            meshca.app.publisher.set_mesh(changed)

            def cluster_applied() -> bool:
                dump = envoy.config_dump()
                active = dynamic_active_clusters(dump).get("backend", {})
                return active.get("connect_timeout") == "7s" and not dynamic_warming_clusters(dump)

            # well under the 15 s initial_fetch_timeout a stalled cluster would need
            await asyncio.to_thread(wait_until, cluster_applied, 8, 0.1, "changed cluster active")

            # 2. only the endpoints change
            endpoint_port = free_port()
            changed[1] = r.cluster_load_assignment("backend", [("127.0.0.1", endpoint_port)])
            meshca.app.publisher.set_mesh(changed)

            def endpoints_applied() -> bool:
                dump = envoy.config_dump(include_eds=True)
                return str(endpoint_port) in json.dumps(dynamic_endpoint_configs(dump).get("backend", {}))

            await asyncio.to_thread(wait_until, endpoints_applied, 8, 0.1, "new endpoint applied")
            stats = await asyncio.to_thread(envoy.stats)
            assert stats.get("cluster_manager.cds.update_rejected", 0) == 0
