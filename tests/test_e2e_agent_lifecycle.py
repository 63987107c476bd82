"""Agent mode end to end, both sidecars: real Envoys take their configuration from meshca (ADS) and their keys from
`meshca agent` processes over Unix sockets; backend's endpoint exists only because its agent registered it. Under
traffic: meshca stopped for longer than half a leaf's lifetime and restarted, an agent restarted (SIGTERM and kill -9)
— 0 failed requests; an agent killed with -9 for good — its endpoint leaves the caller's EDS after the registration
grace and callers are no longer routed to it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from meshca_harness import TRUST_DOMAIN, RunningMeshca
from test_e2e_agent import meshca_with_short_leaves
from test_e2e_agent_mode import sidecar, spiffe_id

from meshca.ca import crypto
from meshca.dev.envoy_process import EnvoyProcess, dynamic_active_secrets, dynamic_endpoint_configs, wait_until
from meshca.dev.harness import (
    BACKEND,
    FRONTEND,
    Ports,
    RequestResult,
    TrafficLoop,
    Workload,
    backend_app,
    http_get,
    mesh_config,
    serve_app,
)
from meshca.mesh.endpoints import RegistrationTiming
from meshca.mesh.model import MeshConfig, parse_mesh_config
from meshca.mesh.resources import DEFAULT_CERT_SECRET

pytestmark = pytest.mark.e2e

GRACE = RegistrationTiming().grace.total_seconds()


def agent_only_backend(ports: Ports) -> MeshConfig:
    data = mesh_config(ports)
    data["trust_domain"] = TRUST_DOMAIN
    data["services"]["backend"]["allow"] = [spiffe_id(FRONTEND)]
    data["services"]["backend"]["endpoints"] = []  # only what backend's agent registers
    return parse_mesh_config(Path("mesh.yaml"), yaml.safe_load(yaml.safe_dump(data)))


class AgentProcess:
    """`meshca agent --config F` for one workload, as an operator runs it (its own process)."""

    def __init__(self, meshca: RunningMeshca, workload: Workload, directory: Path, socket: Path,
                 endpoint_port: int | None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "root.pem").write_bytes(meshca.root_pem)
        token = directory / "token.jwt"
        token.write_text(meshca.token(workload.namespace, workload.service_account, node_id=workload.node_id))
        entry: dict[str, object] = {"name": workload.name, "token_file": str(token), "socket": str(socket)}
        if endpoint_port is not None:
            entry["endpoints"] = [{"service": workload.name, "address": "127.0.0.1", "port": endpoint_port}]
        self.config = directory / "agent.yaml"
        self.config.write_text(yaml.safe_dump({
            "meshca": [f"127.0.0.1:{meshca.port}"], "server_name": "localhost", "ca": str(directory / "root.pem"),
            "ttl": "30s", "workloads": [entry],
        }))
        self.log = directory / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "meshca.cli.main", "agent", "--config", str(self.config)],
                stdout=output, stderr=subprocess.STDOUT, env=env,
            )

    def signal(self, signum: int) -> None:
        assert self.process is not None and self.process.poll() is None
        self.process.send_signal(signum)
        self.process.wait(15)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def leaf_key_sha256(envoy: EnvoyProcess) -> str | None:
    """SHA-256 of the public key of the `default` leaf Envoy holds."""
    secret = dynamic_active_secrets(envoy.config_dump()).get(DEFAULT_CERT_SECRET, {})
    inline = secret.get("tls_certificate", {}).get("certificate_chain", {}).get("inline_bytes", "")
    if not inline:
        return None
    leaf = crypto.split_pem_certificates(base64.b64decode(inline))[0]
    return hashlib.sha256(crypto.parse_certificate_pem(leaf).public_key.spki_der).hexdigest()


def backend_endpoints(envoy: EnvoyProcess) -> list[int]:
    assignment = dynamic_endpoint_configs(envoy.config_dump(include_eds=True)).get("outbound|backend", {})
    return [lb["endpoint"]["address"]["socket_address"]["port_value"]
            for group in assignment.get("endpoints", []) for lb in group.get("lb_endpoints", [])]


async def until(predicate: object, timeout: float, what: str) -> None:
    await asyncio.to_thread(wait_until, predicate, timeout, 0.1, what)


@contextlib.contextmanager
def closing_all(*agents: AgentProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for agent in agents:
            agent.close()


async def test_agent_mode_survives_meshca_and_agent_restarts_and_drops_a_dead_agents_endpoint(
    tmp_path: Path, socket_dir: Path
) -> None:
    ports = Ports()
    config = agent_only_backend(ports)
    app = serve_app(ports.backend_app, backend_app("backend"))
    url = f"http://127.0.0.1:{ports.frontend_outbound}/hello"

    def request() -> RequestResult:
        status, body = http_get(url, timeout=3.0)
        peer = body.get("peer") if isinstance(body, dict) else None
        return RequestResult(status == 200 and peer == spiffe_id(FRONTEND), status, peer, None)

    directory = tmp_path / "meshca"
    try:
        async with contextlib.AsyncExitStack() as stack:
            meshca = await stack.enter_async_context(meshca_with_short_leaves(directory))
            port = meshca.port
            meshca.app.apply_mesh_config(config)
            frontend_agent = AgentProcess(meshca, FRONTEND, tmp_path / "agent-frontend", socket_dir / "f.sock", None)
            backend_agent = AgentProcess(meshca, BACKEND, tmp_path / "agent-backend", socket_dir / "b.sock",
                                         ports.backend_inbound)
            stack.enter_context(closing_all(frontend_agent, backend_agent))
            frontend_agent.start()
            backend_agent.start()
            backend = sidecar(meshca, BACKEND, tmp_path / "backend", "GRPC", socket_dir / "b.sock",
                              ports.admin["backend"])
            frontend = sidecar(meshca, FRONTEND, tmp_path / "frontend", "DELTA_GRPC", socket_dir / "f.sock",
                               ports.admin["frontend"])
            stack.enter_context(backend)
            stack.enter_context(frontend)
            await asyncio.to_thread(backend.wait_ready, 30)
            await asyncio.to_thread(frontend.wait_ready, 30)
            await until(lambda: request().ok, 30, "frontend -> backend over mTLS, both keys from the agents")
            assert backend_endpoints(frontend) == [ports.backend_inbound]
            assert not meshca.app.secrets.certificates()  # meshca issued no certificate: both are agent-mode
            keys = {"frontend": leaf_key_sha256(frontend), "backend": leaf_key_sha256(backend)}

            with TrafficLoop(request, pause=0.05) as traffic:
                # 1. meshca away for longer than half a leaf's lifetime (30 s leaves): renewals fail meanwhile
                await meshca.app.stop(0)
                stopped = time.monotonic()
                await asyncio.sleep(19)
                async with meshca_with_short_leaves(directory, port=port, mesh=config) as back:
                    print(f"\nmeshca was away {time.monotonic() - stopped:.1f} s")
                    await until(lambda: back.app.endpoints.count() == 1, 10, "backend's agent registered again")
                    await until(lambda: leaf_key_sha256(frontend) != keys["frontend"]
                                and leaf_key_sha256(backend) != keys["backend"], 20, "both sidecars renewed")
                    # without the warmup: ~2 s of 503s here, as the caller's Envoy came back before the agent did
                    assert traffic.failures == [], traffic.failures[:3]

                    # 2. backend's agent restarted: SIGTERM (a systemd restart), then kill -9 and start again
                    for how in (signal.SIGTERM, signal.SIGKILL):
                        before = leaf_key_sha256(backend)
                        await asyncio.to_thread(backend_agent.signal, how)
                        restarted = time.monotonic()
                        backend_agent.start()
                        await until(lambda: leaf_key_sha256(backend) != before, 20, "the restarted agent's new key")
                        await until(lambda: back.app.endpoints.count() == 1 and
                                    back.app.registration_timing.grace.total_seconds() < time.monotonic() - restarted,
                                    20, "registered again, the old stream's grace over")
                        print(f"agent {signal.Signals(how).name} + restart: new key in Envoy, "
                              f"{len(traffic.failures)} failed of {traffic.ok + len(traffic.failures)} so far")
                        assert backend_endpoints(frontend) == [ports.backend_inbound]
                        # without the grace: 10-19 failed requests per restart (the endpoint gone until it registers)
                        assert traffic.failures == [], traffic.failures[:3]

                    # 3. backend's agent killed with -9 for good: its endpoint leaves EDS after the grace
                    ok_before = traffic.ok
                    killed = time.monotonic()
                    await asyncio.to_thread(backend_agent.signal, signal.SIGKILL)
                    await until(lambda: backend_endpoints(frontend) == [], 20, "out of the caller's EDS")
                    gone = time.monotonic() - killed
                    print(f"agent kill -9: its endpoint left the caller Envoy's EDS {gone:.2f} s later")
                    assert GRACE * 0.9 <= gone < GRACE + 3
                    await asyncio.sleep(0.5)
            assert traffic.ok > ok_before
            assert request().status == 503  # no endpoint left: callers are not routed to the dead agent's node
            assert all(f.status == 503 for f in traffic.failures)  # only after the endpoint left
            print(f"{traffic.ok} requests ok before the final kill -9's endpoint removal")
    finally:
        app.shutdown()
        app.server_close()
    for agent_dir in ("agent-frontend", "agent-backend"):
        text = (tmp_path / agent_dir / "agent.log").read_text()
        assert "PRIVATE KEY" not in text and "eyJ" not in text
