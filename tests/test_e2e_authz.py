"""Per-request authorization with real Envoys: a caller removed (or denied) is refused on its open connection."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from meshca_harness import TRUST_DOMAIN, frontend_envoy, running_meshca

from meshca.clock import system_clock
from meshca.dev.demo import ABSENT_CALLER, UPSTREAM_CONNECTIONS, Demo, DemoSettings
from meshca.dev.envoy_process import EnvoyProcess, config_of_type, free_port, wait_until
from meshca.dev.harness import BACKEND, FRONTEND, backend_app, http_get, serve_app
from meshca.mesh import resources as r
from meshca.mesh.build import build_mesh, inbound_listener_name
from meshca.mesh.model import MeshConfig, parse_mesh_config
from meshca.xds.snapshot import ResourceType

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["DELTA_GRPC", "GRPC"])
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """The demo's mesh with its sidecars on delta ADS (the default) and on state of the world."""
    settings = DemoSettings(check=True, workdir=tmp_path_factory.mktemp("authz"), api_type=request.param)
    running = Demo(settings, sys.stdout, system_clock)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def counter(envoy: EnvoyProcess, name: str) -> int:
    value = envoy.stats().get(name, 0)
    assert isinstance(value, int)
    return value


def route_principals(route: dict[str, Any]) -> list[dict[str, Any]]:
    """The principals of the inbound route's RBAC policy, as Envoy holds them (its /config_dump)."""
    host = route["route_config"]["virtual_hosts"][0]
    per_route = host["typed_per_filter_config"]["envoy.filters.http.rbac"]
    return list(per_route["rbac"]["rules"]["policies"]["callers"]["principals"])


def test_removed_caller_is_refused_on_its_open_connection_within_a_second_of_the_ack(demo: Demo) -> None:
    frontend, backend = demo.envoys[FRONTEND.name], demo.envoys[BACKEND.name]
    denied_stat = "http.inbound_backend.rbac.denied"
    assert http_get(f"http://127.0.0.1:{demo.ports.frontend_outbound}/warm")[0] == 200
    denied_before = counter(backend, denied_stat)
    connections_before = counter(frontend, UPSTREAM_CONNECTIONS)
    seen: dict[str, Any] = {}

    def inspect() -> None:
        routes = config_of_type(backend.config_dump(), "RoutesConfigDump")["dynamic_route_configs"]
        seen["route"] = next(e for e in routes if e["route_config"]["name"] == "inbound|backend")
        seen["denied"] = counter(backend, denied_stat)
        seen["connections"] = counter(frontend, UPSTREAM_CONNECTIONS)
        seen["handshakes_refused"] = demo.backend_refused_handshakes()

    handshakes_before = demo.backend_refused_handshakes()
    removal = demo.caller_removal(when_refused=inspect)
    assert removal.refused_at is not None, "frontend was never refused"
    assert removal.status == 403  # backend's RBAC, not a failed handshake (503)
    # the same upstream connection as before the edit: nothing new was opened, no handshake was refused
    assert removal.same_connection and seen["connections"] == connections_before
    assert seen["handshakes_refused"] == handshakes_before
    assert seen["denied"] > denied_before
    # the route configuration Envoy applied (and ACKed) no longer admits frontend
    principals = route_principals(seen["route"])
    assert [p["authenticated"]["principal_name"] for p in principals] == [{"exact": ABSENT_CALLER}]
    applied_at = datetime.fromisoformat(seen["route"]["last_updated"]).timestamp()
    after_ack = removal.refused_at - applied_at
    assert removal.seconds is not None
    print(
        f"\n{demo.settings.api_type}: caller removed -> first refusal on the open connection: {removal.seconds:.3f} s "
        f"after the mesh edit, {after_ack:.3f} s after backend's Envoy applied the route configuration"
    )
    assert after_ack < 1.0
    assert removal.readmitted
    assert counter(frontend, UPSTREAM_CONNECTIONS) == connections_before  # readmitted on the same connection too


# --- One Envoy calling itself through the mesh: the denied-identities hook and the fail-closed default. ---

FRONTEND_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"


def self_calling_mesh(inbound: int, outbound: int, app: int, endpoints: list[str] | None = None) -> MeshConfig:
    """frontend serves `echo` (allowing its whole namespace) and calls it through its own outbound listener;
    `endpoints=[]`: echo has no static endpoint (only registered ones)."""
    echo: dict[str, Any] = {
        "namespace": "shop",
        "service_account": "frontend",
        "inbound": {"port": inbound, "app": f"127.0.0.1:{app}", "listen_address": "127.0.0.1"},
        "allow": ["namespace:shop"],
    }
    if endpoints is not None:
        echo["endpoints"] = endpoints
    data = {
        "trust_domain": TRUST_DOMAIN,
        "services": {
            "echo": echo,
            "caller": {"namespace": "shop", "service_account": "frontend", "outbound": {"port": outbound}},
        },
        "routes": [{"prefix": "/", "to": "echo"}],
    }
    return parse_mesh_config(Path("mesh.yaml"), yaml.safe_load(yaml.safe_dump(data)))


async def test_denied_identity_is_refused_on_its_open_connection_and_a_route_without_policy_refuses_all(
    tmp_path: Path,
) -> None:
    inbound, outbound, app_port = free_port(), free_port(), free_port()
    app = serve_app(app_port, backend_app("echo"))
    config = self_calling_mesh(inbound, outbound, app_port)
    url = f"http://127.0.0.1:{outbound}/x"

    def status() -> int:
        return http_get(url)[0]

    try:
        async with running_meshca(tmp_path) as meshca:
            meshca.app.publisher.set_mesh(build_mesh(config))
            with frontend_envoy(meshca, tmp_path) as envoy:
                await asyncio.to_thread(envoy.wait_ready, 20)
                await asyncio.to_thread(wait_until, lambda: status() == 200, 20, 0.1, "echo answering")
                connections = counter(envoy, "cluster.outbound|echo.upstream_cx_total")
                denied = counter(envoy, "http.inbound_echo.rbac.denied")

                # denied although its namespace is allowed; on the connection already open
                meshca.app.publisher.set_mesh(build_mesh(config, denied_spiffe_ids=frozenset({FRONTEND_ID})))
                await asyncio.to_thread(wait_until, lambda: status() == 403, 10, 0.02, "denied identity refused")
                assert counter(envoy, "http.inbound_echo.rbac.denied") > denied
                assert counter(envoy, "cluster.outbound|echo.upstream_cx_total") == connections

                meshca.app.publisher.set_mesh(build_mesh(config))
                await asyncio.to_thread(wait_until, lambda: status() == 200, 10, 0.02, "admitted again")

                # fail closed: the inbound route without a policy (an RDS update that lost it) refuses everything
                mesh = build_mesh(config)
                route = inbound_listener_name("echo")
                bare = r.route_configuration(route, (r.VirtualHostSpec("echo", routes=(r.RouteSpec("/", (("local|echo", 1),)),)),))
                resources = [
                    res
                    for res in (*mesh.shared, *mesh.per_identity[config.services[0].spiffe_id])
                    if (res.type, res.name) != (ResourceType.ROUTE, route)
                ]
                meshca.app.publisher.set_mesh([*resources, bare])
                await asyncio.to_thread(wait_until, lambda: status() == 403, 10, 0.02, "no policy: refused")
                assert counter(envoy, "cluster.outbound|echo.upstream_cx_total") == connections
    finally:
        app.shutdown()
        app.server_close()
