"""End to end: a real Envoy on delta ADS (DELTA_GRPC) converges, applies removals and a rotated secret."""

from __future__ import annotations

import asyncio
import base64
import socket
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from meshca_harness import TRUST_DOMAIN, frontend_envoy, running_meshca

from meshca.dev.envoy_process import (
    EnvoyProcess,
    dynamic_active_clusters,
    dynamic_active_secrets,
    dynamic_listeners,
    dynamic_route_configs,
    dynamic_warming_clusters,
    free_port,
    wait_until,
)
from meshca.identity.spiffe import SpiffeId
from meshca.mesh import resources as r
from meshca.xds.snapshot import EncodedResource

pytestmark = pytest.mark.e2e

FRONTEND = SpiffeId.for_service_account(TRUST_DOMAIN, "shop", "frontend")
BACKEND_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/backend"


def mesh(ports: dict[str, int], services: tuple[str, ...], connect_timeout: int = 2) -> list[EncodedResource]:
    """A cluster and a route per service; listener 'inbound' always, 'extra' with 'payments'."""
    upstream = r.MtlsPeer(allowed_spiffe_ids=(BACKEND_ID,))
    downstream = r.MtlsPeer(allowed_spiffe_ids=(FRONTEND.uri,))
    resources = []
    for name in services:
        spec = r.ClusterSpec(name, connect_timeout=timedelta(seconds=connect_timeout), upstream_tls=upstream)
        resources.append(r.cluster(spec))
        resources.append(r.cluster_load_assignment(name, [("127.0.0.1", ports[name])]))
    routes = tuple(r.RouteSpec(f"/{name}", ((name, 1),)) for name in services)
    resources.append(r.route_configuration("routes", [r.VirtualHostSpec("all", routes=routes)]))
    resources.append(r.http_listener(r.HttpListenerSpec("inbound", "127.0.0.1", ports["inbound"], "routes", downstream)))
    if "payments" in services:
        resources.append(
            r.http_listener(r.HttpListenerSpec("extra", "127.0.0.1", ports["extra"], "routes", downstream))
        )
    return resources


def default_serial(dump: dict) -> int | None:
    secret = dynamic_active_secrets(dump).get("default")
    if secret is None:
        return None
    pem = base64.b64decode(secret["tls_certificate"]["certificate_chain"]["inline_bytes"])
    return x509.load_pem_x509_certificates(pem)[0].serial_number


def route_targets(dump: dict) -> set[str]:
    config = dynamic_route_configs(dump).get("routes", {})
    return {
        route["route"]["cluster"]
        for host in config.get("virtual_hosts", [])
        for route in host.get("routes", [])
        if "cluster" in route.get("route", {})
    }


def converged(envoy: EnvoyProcess, services: tuple[str, ...], listeners: set[str]) -> dict | None:
    dump = envoy.config_dump()
    if (
        set(dynamic_active_clusters(dump)) == set(services)
        and not dynamic_warming_clusters(dump)
        and set(dynamic_listeners(dump)) == listeners
        and route_targets(dump) == set(services)
        and {"default", "ROOTCA"} <= set(dynamic_active_secrets(dump))
    ):
        return dump
    return None


async def test_delta_envoy_converges_applies_removals_and_a_rotated_secret(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("backend", "payments", "inbound", "extra")}
    async with running_meshca(tmp_path) as meshca:
        meshca.app.publisher.set_mesh(mesh(ports, ("backend", "payments")))
        with frontend_envoy(meshca, tmp_path, api_type="DELTA_GRPC") as envoy:
            await asyncio.to_thread(envoy.wait_ready, 20)
            dump = await asyncio.to_thread(
                wait_until,
                lambda: converged(envoy, ("backend", "payments"), {"inbound", "extra"}),
                20,
                0.2,
                "delta envoy converged",
            )
            with socket.create_connection(("127.0.0.1", ports["inbound"]), timeout=2):
                pass  # active listener: its secrets arrived, its port is bound
            stats = await asyncio.to_thread(envoy.stats)
            assert stats.get("control_plane.connected_state") == 1
            (proxy,) = meshca.app.registry.snapshot()
            assert proxy.identity == FRONTEND.uri and proxy.last_nack is None

            # only the clusters change: Envoy warms them until it gets their (unchanged) endpoints again,
            # which it does not ask for on a delta stream; meshca sends them at once
            meshca.app.publisher.set_mesh(mesh(ports, ("backend", "payments"), connect_timeout=7))

            def clusters_changed() -> bool:
                dump = envoy.config_dump()
                active = dynamic_active_clusters(dump)
                return not dynamic_warming_clusters(dump) and all(
                    active.get(name, {}).get("connect_timeout") == "7s" for name in ("backend", "payments")
                )

            # well under the 15 s initial_fetch_timeout a warming cluster would otherwise need
            await asyncio.to_thread(wait_until, clusters_changed, 8, 0.1, "changed clusters active")

            # a mesh update removes the payments cluster, its route and the extra listener
            meshca.app.publisher.set_mesh(mesh(ports, ("backend",)))
            dump = await asyncio.to_thread(
                wait_until, lambda: converged(envoy, ("backend",), {"inbound"}), 10, 0.1, "removals applied"
            )
            assert "payments" not in dynamic_active_clusters(dump)

            # rotating the node's certificate reaches Envoy over delta SDS
            serial = default_serial(dump)
            meshca.app.rotator.renew(FRONTEND)
            rotated = await asyncio.to_thread(
                wait_until,
                lambda: (s := default_serial(envoy.config_dump())) not in (None, serial) and s,
                10,
                0.1,
                "rotated default secret",
            )
            leaf = meshca.app.secrets.certificates()
            assert rotated in {c.serial_number for c in leaf}
            stats = await asyncio.to_thread(envoy.stats)
            assert stats.get("cluster_manager.cds.update_rejected", 0) == 0
            assert stats.get("listener_manager.lds.update_rejected", 0) == 0
            assert meshca.app.registry.snapshot()[0].last_nack is None
