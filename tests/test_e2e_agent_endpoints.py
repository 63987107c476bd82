"""`meshca agent --config FILE` as an operator runs it registers its workload's endpoint: a caller Envoy's EDS shows it
and routes to it while the agent lives; after `kill -9` of the agent it leaves EDS within seconds and gets no traffic."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from meshca_harness import frontend_envoy, running_meshca
from test_e2e_endpoints import agent_only_mesh, eds_addresses

from meshca.dev.envoy_process import free_port, wait_until
from meshca.dev.harness import backend_app, http_get, serve_app
from meshca.mesh.endpoints import RegistrationTiming

GRACE = RegistrationTiming().grace.total_seconds()

pytestmark = pytest.mark.e2e


def agent_config(tmp_path: Path, socket_dir: Path, port: int, inbound: int) -> Path:
    """The operator's YAML (docs/agent.md): one workload whose endpoint is the sidecar's inbound listener for `echo`."""
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "meshca": [f"127.0.0.1:{port}"],
        "server_name": "localhost",
        "ca": str(tmp_path / "root.pem"),
        "workloads": [{
            "name": "frontend",
            "token_file": str(tmp_path / "frontend.jwt"),
            "socket": str(socket_dir / "frontend.sock"),
            "socket_mode": "0600",
            "endpoints": [{"service": "echo", "address": "127.0.0.1", "port": inbound}],
        }],
    }))
    return config


async def test_the_agent_process_registers_its_endpoint_and_kill_9_takes_it_out_of_eds(
    tmp_path: Path, socket_dir: Path
) -> None:
    inbound, outbound, app_port = free_port(), free_port(), free_port()
    app = serve_app(app_port, backend_app("echo"))
    url = f"http://127.0.0.1:{outbound}/x"

    def status() -> int:
        return http_get(url)[0]

    agent: subprocess.Popen[bytes] | None = None
    log = tmp_path / "agent.log"
    try:
        async with running_meshca(tmp_path / "meshca") as meshca:
            meshca.app.apply_mesh_config(agent_only_mesh(inbound, outbound, app_port))
            (tmp_path / "root.pem").write_bytes(meshca.root_pem)
            (tmp_path / "frontend.jwt").write_text(meshca.token("shop", "frontend"))
            config = agent_config(tmp_path, socket_dir, meshca.port, inbound)
            with frontend_envoy(meshca, tmp_path) as caller:
                await asyncio.to_thread(caller.wait_ready, 20)
                assert await asyncio.to_thread(eds_addresses, caller) == []
                assert await asyncio.to_thread(status) == 503  # no endpoint yet: nothing to route to

                env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                    [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
                with log.open("wb") as output:
                    agent = subprocess.Popen(
                        [sys.executable, "-m", "meshca.cli.main", "agent", "--config", str(config)],
                        stdout=output, stderr=subprocess.STDOUT, env=env,
                    )
                started = time.monotonic()
                await asyncio.to_thread(
                    wait_until, lambda: eds_addresses(caller) == [("127.0.0.1", inbound)], 20, 0.05, "in EDS"
                )
                print(f"\nagent started: its endpoint in the caller Envoy's EDS {time.monotonic() - started:.2f} s later")
                await asyncio.to_thread(wait_until, lambda: status() == 200, 10, 0.05, "routed to it")
                assert meshca.app.endpoints.count() == 1
                assert agent.poll() is None

                killed = time.monotonic()
                os.kill(agent.pid, signal.SIGKILL)
                await asyncio.to_thread(wait_until, lambda: eds_addresses(caller) == [], 20, 0.05, "out of EDS")
                seconds = time.monotonic() - killed
                print(f"agent kill -9: its endpoint left the caller Envoy's EDS {seconds:.2f} s later")
                assert GRACE * 0.9 <= seconds < GRACE + 2.0  # the default grace, then out
                assert await asyncio.to_thread(status) == 503  # callers are no longer routed to it
                assert meshca.app.endpoints.count() == 0
        text = log.read_text()
        assert "endpoints of echo registered as spiffe://mesh.test/ns/shop/sa/frontend" in text
        assert "PRIVATE KEY" not in text and "eyJ" not in text  # neither keys nor tokens in the agent's log
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
        if agent is not None:
            agent.wait(10)
        app.shutdown()
        app.server_close()
