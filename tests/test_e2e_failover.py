"""Two meshca replicas (same state_dir and mesh file), real Envoys bootstrapped with both addresses and
traffic through them: kill -9 the replica every Envoy is connected to; every Envoy moves to the survivor
and ACKs there, and not one request fails. The reconnect times are printed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshca.clock import system_clock
from meshca.dev.envoy_process import EnvoyProcess, dynamic_listeners, free_port, wait_until
from meshca.dev.harness import (
    BACKEND,
    FRONTEND,
    INTRUDER,
    TRUST_DOMAIN,
    Ports,
    RequestResult,
    TrafficLoop,
    Workload,
    backend_app,
    envoy_chain,
    frontend_app,
    http_get,
    mesh_config,
    serve_app,
)
from meshca.dev.material import DevMaterial, create_dev_material
from meshca.dev.tokens import mint_token
from meshca.files import write_atomic
from meshca.node.bootstrap import BootstrapSettings, render_yaml

pytestmark = pytest.mark.e2e

# frontend: inline token, delta ADS; backend: inline token, state of the world; intruder: token file
# (google_grpc, gRPC's own address list)
API_TYPES = {FRONTEND.name: "DELTA_GRPC", BACKEND.name: "GRPC", INTRUDER.name: "DELTA_GRPC"}
TRAFFIC_AFTER_S = 3.0


@contextmanager
def meshca_serve(config: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "meshca.cli.main", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        def listening() -> bool:
            assert process.poll() is None, log.read_text()[-2000:]
            status, _ = http_get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return status == 200

        wait_until(listening, 60, 0.05, "meshca serving")
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()


def replica_status(metrics_port: int) -> list[dict[str, Any]]:
    status, body = http_get(f"http://127.0.0.1:{metrics_port}/status", timeout=2)
    return body if status == 200 and isinstance(body, list) else []


def acked_by(metrics_port: int) -> set[str]:
    """Node ids with a stream on this replica that ACKed everything it was sent, certificates included."""
    done = set()
    for proxy in replica_status(metrics_port):
        types = proxy["types"]
        if types["SDS"]["sent"] is None:
            continue
        if all(t["sent"] is None or t["acked"] == t["sent"] for t in types.values()):
            done.add(proxy["node_id"])
    return done


def connected(envoy: EnvoyProcess) -> bool:
    return envoy.admin_get("/stats?filter=^control_plane.connected_state$", timeout=2).strip().endswith(": 1")


def one_request(ports: Ports) -> RequestResult:
    status, body = http_get(f"http://127.0.0.1:{ports.frontend_app}/")
    backend = body.get("backend") if isinstance(body, dict) else None
    peer = backend.get("peer") if isinstance(backend, dict) else None
    return RequestResult(status == 200 and peer == FRONTEND.spiffe_id, status, peer, None)


def second_config(material: DevMaterial, port: int, metrics: int) -> Path:
    """The same settings (state_dir, TLS, issuers, mesh) on other ports, beside the first."""
    config = yaml.safe_load(material.serve_config.read_text())
    config.update(listen=f"127.0.0.1:{port}", metrics_port=metrics)
    path = material.directory / "meshca-b.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def bootstrap(material: DevMaterial, workload: Workload, ports: Ports, first: int, second: int, workdir: Path) -> str:
    token = mint_token(
        material.signing_key.read_bytes(),
        namespace=workload.namespace,
        service_account=workload.service_account,
        node_id=workload.node_id,
        now=system_clock(),
    )
    auth: dict[str, Any] = {"token": token}
    if workload is INTRUDER:
        token_file = workdir / f"{workload.name}.token"
        write_atomic(token_file, token.encode(), 0o600)
        auth = {"token_path": token_file}
    settings = BootstrapSettings(
        node_id=workload.node_id,
        cluster=workload.name,
        meshca_address="127.0.0.1",
        meshca_port=first,
        more_meshca=(("127.0.0.1", second),),
        meshca_ca_path=material.root_bundle,
        meshca_server_name="localhost",
        admin_port=ports.admin[workload.name],
        api_type=API_TYPES[workload.name],
        **auth,
    )
    return render_yaml(settings)


@pytest.mark.parametrize("fault", ["kill -9", "SIGSTOP"])
def test_envoys_fail_over_to_the_surviving_replica_without_a_failed_request(tmp_path: Path, fault: str) -> None:
    """kill -9: the streams break at once. SIGSTOP (a hung replica or host): only the HTTP/2 keepalive
    pings of the bootstrap (10 s, 5 s timeout) tell Envoy, so moving takes up to ~17 s."""
    ports = Ports()
    port_b, metrics_b = free_port(), free_port()
    mesh_path = tmp_path / "mesh.yaml"
    write_atomic(mesh_path, yaml.safe_dump(mesh_config(ports), sort_keys=False).encode(), 0o644)
    material = create_dev_material(
        tmp_path / "dev",
        TRUST_DOMAIN,
        system_clock,
        listen=f"127.0.0.1:{ports.meshca}",
        extra_settings={"mesh": str(mesh_path), "metrics_port": ports.metrics},
    )
    config_b = second_config(material, port_b, metrics_b)
    envoys: dict[str, EnvoyProcess] = {}
    with ExitStack() as stack:
        for server in (serve_app(ports.backend_app, backend_app("backend")),
                       serve_app(ports.frontend_app, frontend_app(ports.frontend_outbound))):
            stack.callback(server.shutdown)
        # only replica A at first, so every Envoy is connected to it (the one we kill)
        replica_a = stack.enter_context(meshca_serve(material.serve_config, ports.metrics, tmp_path / "a.log"))
        for workload in (BACKEND, FRONTEND, INTRUDER):
            text = bootstrap(material, workload, ports, ports.meshca, port_b, tmp_path)
            envoys[workload.name] = stack.enter_context(EnvoyProcess(text, workdir=tmp_path / workload.name))
        names = {w.node_id for w in (BACKEND, FRONTEND, INTRUDER)}
        wait_until(lambda: acked_by(ports.metrics) == names, 60, 0.1, "every Envoy ACKed on replica A")
        wait_until(lambda: f"outbound|{ports.frontend_outbound}" in dynamic_listeners(envoys[FRONTEND.name].config_dump()),
                   30, 0.1, "frontend configured")
        wait_until(lambda: one_request(ports).ok, 30, 0.2, "traffic flows")
        stack.enter_context(meshca_serve(config_b, metrics_b, tmp_path / "b.log"))
        assert acked_by(metrics_b) == set()
        serials = {name: envoy_chain(envoy)[0].serial_number for name, envoy in envoys.items()}

        with TrafficLoop(lambda: one_request(ports)) as traffic:
            time.sleep(1.0)
            before = traffic.ok
            if fault == "kill -9":
                replica_a.kill()  # a crash: no goodbye to the streams
                replica_a.wait()
            else:
                replica_a.send_signal(signal.SIGSTOP)  # hung: its sockets stay open, nothing answers
            killed = time.monotonic()
            acked: dict[str, float] = {}
            # A token-file bootstrap's stream (google_grpc) to a hung replica is not given up within 30 s here,
            # although its channel pings like Envoy's own client (docs/ha.md, failure matrix): left out.
            moving = set(envoys) if fault == "kill -9" else set(envoys) - {INTRUDER.name}
            while not moving <= set(acked) and time.monotonic() - killed < 30:
                now_acked = acked_by(metrics_b)
                for name in envoys:
                    if name not in acked and f"{name}-1" in now_acked:
                        acked[name] = round(time.monotonic() - killed, 2)
                time.sleep(0.05)
            time.sleep(TRAFFIC_AFTER_S)  # and traffic keeps flowing on what the survivor sent
        print(f"\nfailover: s from {fault} of the replica until each Envoy ACKed everything on the survivor: {acked}")
        assert moving <= set(acked), f"not every Envoy moved within 30 s: {acked}"
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.ok > before
        assert {f"{name}-1" for name in moving} <= acked_by(metrics_b)
        for name, envoy in envoys.items():
            if name not in moving:
                continue
            assert connected(envoy)
            assert envoy_chain(envoy)[0].serial_number != serials[name]  # the survivor's certificate, applied
            assert envoy.stats().get("control_plane.connected_state") == 1
        assert one_request(ports).ok
