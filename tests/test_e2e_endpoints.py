"""Endpoints that register themselves, with a real Envoy: in its EDS while the registering process lives, gone
within seconds of its kill -9 (socket closed) or of its host going silent (SIGSTOP: meshca's HTTP/2 keepalive)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from meshca_harness import RunningMeshca, frontend_envoy, running_meshca
from test_e2e_authz import self_calling_mesh

from meshca.dev.envoy_process import EnvoyProcess, dynamic_endpoint_configs, free_port, wait_until
from meshca.dev.harness import backend_app, http_get, serve_app
from meshca.mesh.endpoints import RegistrationTiming
from meshca.mesh.model import MeshConfig

GRACE = RegistrationTiming().grace.total_seconds()

pytestmark = pytest.mark.e2e

REGISTRAR = """
import asyncio, logging, sys
from pathlib import Path
import grpc
from meshca.agent.registration import CHANNEL_OPTIONS, Endpoint, keep_registered

async def main() -> None:
    port, root, token, service, address, endpoint_port = sys.argv[1:]
    credentials = grpc.ssl_channel_credentials(Path(root).read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=CHANNEL_OPTIONS) as channel:
        await keep_registered([channel], Path(token), [Endpoint(service, address, int(endpoint_port))],
                              logging.getLogger("registrar"), on_registered=lambda r: print("registered", flush=True))

asyncio.run(main())
"""


def agent_only_mesh(inbound: int, outbound: int, app: int) -> MeshConfig:
    """frontend serves `echo`, which has no static endpoint, and calls it through its own outbound listener."""
    return self_calling_mesh(inbound, outbound, app, endpoints=[])


def registrar(meshca: RunningMeshca, tmp_path: Path, inbound: int) -> subprocess.Popen[str]:
    """The agent's registration client in its own process (meshca.agent.registration.keep_registered)."""
    (tmp_path / "root.pem").write_bytes(meshca.root_pem)
    token = tmp_path / "frontend.jwt"
    token.write_text(meshca.token("shop", "frontend"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", REGISTRAR, str(meshca.port), str(tmp_path / "root.pem"), str(token), "echo",
         "127.0.0.1", str(inbound)],
        stdout=subprocess.PIPE, text=True, env=env,
    )


def eds_addresses(envoy: EnvoyProcess) -> list[tuple[str, int]]:
    assignment = dynamic_endpoint_configs(envoy.config_dump(include_eds=True)).get("outbound|echo", {})
    return [
        (lb["endpoint"]["address"]["socket_address"]["address"], lb["endpoint"]["address"]["socket_address"]["port_value"])
        for group in assignment.get("endpoints", []) for lb in group.get("lb_endpoints", [])
    ]


async def test_a_registered_endpoint_is_served_while_its_registrar_lives_and_leaves_eds_when_it_dies(
    tmp_path: Path,
) -> None:
    inbound, outbound, app_port = free_port(), free_port(), free_port()
    app = serve_app(app_port, backend_app("echo"))
    url = f"http://127.0.0.1:{outbound}/x"

    def status() -> int:
        return http_get(url)[0]

    processes: list[subprocess.Popen[str]] = []
    try:
        async with running_meshca(tmp_path) as meshca:
            meshca.app.apply_mesh_config(agent_only_mesh(inbound, outbound, app_port))
            with frontend_envoy(meshca, tmp_path) as envoy:
                await asyncio.to_thread(envoy.wait_ready, 20)
                assert await asyncio.to_thread(eds_addresses, envoy) == []
                assert await asyncio.to_thread(status) == 503  # no endpoint: nothing to route to

                for how in ("kill -9", "SIGSTOP (host silent)"):
                    process = registrar(meshca, tmp_path, inbound)
                    processes.append(process)
                    assert process.stdout is not None
                    assert await asyncio.to_thread(process.stdout.readline) == "registered\n"
                    await asyncio.to_thread(
                        wait_until, lambda: eds_addresses(envoy) == [("127.0.0.1", inbound)], 10, 0.05, "in EDS"
                    )
                    await asyncio.to_thread(wait_until, lambda: status() == 200, 10, 0.05, "routed to it")
                    assert meshca.app.endpoints.count() == 1

                    killed = time.monotonic()
                    os.kill(process.pid, signal.SIGKILL if how == "kill -9" else signal.SIGSTOP)
                    await asyncio.to_thread(wait_until, lambda: eds_addresses(envoy) == [], 20, 0.05, "out of EDS")
                    seconds = time.monotonic() - killed
                    print(f"\nregistrar {how}: its endpoint left the caller Envoy's EDS {seconds:.2f} s later")
                    # the default grace (a restarting agent registers again meanwhile), plus noticing the death
                    assert GRACE * 0.9 <= seconds < GRACE + (2.0 if how == "kill -9" else 10.0)
                    assert await asyncio.to_thread(status) == 503  # callers are no longer routed to it
                    assert meshca.app.endpoints.count() == 0
    finally:
        for process in processes:
            process.kill()
            process.wait(10)
        app.shutdown()
        app.server_close()
