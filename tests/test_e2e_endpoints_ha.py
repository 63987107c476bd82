"""Endpoint registration with the HA store: two `meshca serve` replicas on one etcd, `meshca agent` registering through
replica A, a real caller Envoy connected to replica B. The endpoint is in B's EDS and gets traffic; kill -9 of the
agent takes it out within a measured time; kill -9 of replica A while the agent lives: the agent registers again at
B and the endpoint never leaves the caller's EDS (A's keys stay until its lease expires). Times printed (`-s`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml
from test_e2e_endpoints import eds_addresses
from test_e2e_reconnect import meshca_serve
from test_e2e_store_serve import meshca

from meshca.clock import system_clock
from meshca.dev.envoy_process import EnvoyProcess, free_port, wait_until
from meshca.dev.etcd_process import EtcdProcess
from meshca.dev.harness import backend_app, http_get, serve_app
from meshca.dev.material import create_dev_material
from meshca.dev.tokens import mint_token
from meshca.mesh.endpoints import RegistrationTiming
from meshca.node.bootstrap import BootstrapSettings, build_bootstrap

pytestmark = pytest.mark.e2e

GRACE = RegistrationTiming().grace.total_seconds()

LEASE_TTL = 3.0  # seconds (store.etcd.lease_ttl)


def mesh_yaml(inbound: int, outbound: int, app: int) -> str:
    """frontend serves `echo` (no static endpoint: only registered ones) and calls it through its own outbound."""
    return yaml.safe_dump({
        "trust_domain": "mesh.local",
        "services": {
            "echo": {"namespace": "shop", "service_account": "frontend", "endpoints": [],
                     "inbound": {"port": inbound, "app": f"127.0.0.1:{app}", "listen_address": "127.0.0.1"},
                     "allow": ["namespace:shop"]},
            "caller": {"namespace": "shop", "service_account": "frontend", "outbound": {"port": outbound}},
        },
        "routes": [{"prefix": "/", "to": "echo"}],
    })


class Sampler:
    """From a thread, every 20 ms: is the endpoint in the caller's EDS, and does a request through it succeed."""

    def __init__(self, envoy: EnvoyProcess, inbound: int, url: str) -> None:
        self._envoy, self._inbound, self._url = envoy, inbound, url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.samples: list[tuple[float, bool]] = []
        self.requests = 0
        self.failed = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                present = ("127.0.0.1", self._inbound) in eds_addresses(self._envoy)
            except Exception:
                present = False
            self.samples.append((time.monotonic(), present))
            self.requests += 1
            if http_get(self._url)[0] != 200:
                self.failed += 1
            self._stop.wait(0.02)

    def longest_absence(self) -> float:
        longest, since = 0.0, None
        for at, present in self.samples:
            if not present and since is None:
                since = at
            elif present and since is not None:
                longest, since = max(longest, at - since), None
        if since is not None:
            longest = max(longest, self.samples[-1][0] - since)
        return longest

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_an_endpoint_registered_at_one_replica_is_in_eds_at_the_other_and_survives_its_death(
    tmp_path: Path, socket_dir: Path
) -> None:
    inbound, outbound, app_port = free_port(), free_port(), free_port()
    echo = serve_app(app_port, backend_app("echo"))
    url = f"http://127.0.0.1:{outbound}/x"
    agent_log = tmp_path / "agent.log"
    agents: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    try:
        with EtcdProcess() as etcd, ExitStack() as stack:
            ports, admin = [free_port(), free_port()], [free_port(), free_port()]
            (tmp_path / "kek").write_bytes(os.urandom(32))
            store = {"etcd": {"endpoints": [etcd.endpoint], "prefix": "/endpoints-ha", "lease_ttl": f"{LEASE_TTL:g}s",
                              "kek_file": str(tmp_path / "kek")}}
            material = create_dev_material(tmp_path / "dev", "mesh.local", system_clock, listen=f"127.0.0.1:{ports[0]}",
                                           metrics_port=admin[0], extra_settings={"store": store})
            imported = meshca("ca", "import", "--config", str(material.serve_config), "--state-dir",
                              str(material.state_dir))
            assert imported.returncode == 0, imported.stderr
            (tmp_path / "mesh.yaml").write_text(mesh_yaml(inbound, outbound, app_port))
            applied = meshca("mesh", "apply", "-f", str(tmp_path / "mesh.yaml"), "--config", str(material.serve_config))
            assert applied.returncode == 0, applied.stderr
            second = material.serve_config.with_name("replica-b.yaml")
            settings = yaml.safe_load(material.serve_config.read_text())
            second.write_text(yaml.safe_dump({**settings, "listen": f"127.0.0.1:{ports[1]}", "metrics_port": admin[1]}))
            replica_a = stack.enter_context(meshca_serve(material, ports[0], tmp_path / "replica-a.log"))
            material_b = type(material)(**{**material.__dict__, "serve_config": second})
            stack.enter_context(meshca_serve(material_b, ports[1], tmp_path / "replica-b.log"))

            key = material.signing_key.read_bytes()
            caller = stack.enter_context(EnvoyProcess(build_bootstrap(BootstrapSettings(
                node_id="frontend-1", cluster="frontend", meshca_address="127.0.0.1", meshca_port=ports[1],
                meshca_ca_path=material.root_bundle, meshca_server_name="localhost",
                token=mint_token(key, namespace="shop", service_account="frontend", node_id="frontend-1",
                                 now=system_clock()),
                admin_port=free_port(),
            )), workdir=tmp_path / "caller"))
            caller.wait_ready(30)
            assert eds_addresses(caller) == []

            (tmp_path / "frontend.jwt").write_text(
                mint_token(key, namespace="shop", service_account="frontend", now=system_clock()))
            agent_config = tmp_path / "agent.yaml"
            agent_config.write_text(yaml.safe_dump({
                "meshca": [f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"],  # A first
                "server_name": "localhost",
                "ca": str(material.root_bundle),
                "workloads": [{"name": "frontend", "token_file": str(tmp_path / "frontend.jwt"),
                               "socket": str(socket_dir / "frontend.sock"), "socket_mode": "0600",
                               "endpoints": [{"service": "echo", "address": "127.0.0.1", "port": inbound}]}],
            }))

            def start_agent() -> subprocess.Popen[bytes]:
                with agent_log.open("ab") as output:
                    agent = subprocess.Popen([sys.executable, "-m", "meshca.cli.main", "agent", "--config",
                                              str(agent_config)], stdout=output, stderr=subprocess.STDOUT, env=env)
                agents.append(agent)
                return agent

            def in_eds() -> bool:
                return eds_addresses(caller) == [("127.0.0.1", inbound)]

            started = time.monotonic()
            agent = start_agent()
            wait_until(in_eds, 30, 0.02, "registered at A, in the EDS of B's caller")
            print(f"\nagent started: its endpoint (registered at replica A) in the EDS of replica B's caller "
                  f"{time.monotonic() - started:.2f} s later")
            wait_until(lambda: http_get(url)[0] == 200, 10, 0.05, "routed to it")
            assert "registered 1 endpoint(s) of echo" in (tmp_path / "replica-a.log").read_text()

            killed = time.monotonic()
            os.kill(agent.pid, signal.SIGKILL)
            agent.wait(10)
            wait_until(lambda: eds_addresses(caller) == [], 20, 0.02, "out of EDS")
            seconds = time.monotonic() - killed
            print(f"agent kill -9: its endpoint left the EDS of replica B's caller {seconds:.2f} s later")
            assert GRACE * 0.9 <= seconds < GRACE + 3.0  # meshca's registration grace, then out
            assert http_get(url)[0] == 503

            agent = start_agent()
            wait_until(in_eds, 30, 0.02, "registered again at A")
            wait_until(lambda: http_get(url)[0] == 200, 10, 0.05, "routed to it again")
            with Sampler(caller, inbound, url) as sampler:
                time.sleep(0.5)
                killed = time.monotonic()
                os.kill(replica_a.pid, signal.SIGKILL)
                replica_a.wait(10)
                wait_until(lambda: "registered 1 endpoint(s) of echo" in (tmp_path / "replica-b.log").read_text(),
                           20, 0.02, "the agent registered again at B")
                print(f"replica A kill -9: the agent registered again at replica B {time.monotonic() - killed:.2f} s "
                      "later")
                time.sleep(LEASE_TTL + 2.0)  # A's lease expires meanwhile: its keys go, B's stay
            assert agent.poll() is None
            assert in_eds()
            absence = sampler.longest_absence()
            print(f"replica A kill -9: the endpoint's longest absence from the caller's EDS {absence:.2f} s "
                  f"({len(sampler.samples)} samples every 20 ms), {sampler.failed} of {sampler.requests} requests "
                  "failed")
            assert absence == 0.0
            assert sampler.failed == 0
        text = agent_log.read_text()
        assert "PRIVATE KEY" not in text and "eyJ" not in text
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
            agent.wait(10)
        echo.shutdown()
        echo.server_close()
