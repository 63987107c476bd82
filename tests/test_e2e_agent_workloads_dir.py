"""The Kubernetes flow without Kubernetes: `meshca agent` (a process) watching `workloads_dir`, `meshca agent enroll` (a
process, the pod's native sidecar) putting the pod's token and endpoint in its directory, and a real Envoy bootstrapped
with --agent-socket at `<dir>/<name>/sds.sock`: Envoy gets the certificate and traffic flows; the enroll process
SIGTERMed (the pod deleted): the directory and the socket are gone and the endpoint leaves EDS. The agent's admin
endpoint (the DaemonSet's readiness probe): /healthz 200 with no pods, 503 while the pod has no certificate (its token
refused at first), 200 once it has one; /status shows what Envoy holds, never the token or a key."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from meshca_harness import TRUST_DOMAIN, running_meshca
from test_e2e_endpoints import agent_only_mesh, eds_addresses

from meshca.dev.envoy_process import EnvoyProcess, free_port, wait_until
from meshca.dev.harness import backend_app, http_get, serve_app
from meshca.node.bootstrap import BootstrapSettings, build_bootstrap

pytestmark = pytest.mark.e2e

FRONTEND_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"


def meshca_process(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    with log.open("wb") as output:
        return subprocess.Popen([sys.executable, "-m", "meshca.cli.main", *args], stdout=output,
                                stderr=subprocess.STDOUT, env=env)


def certificate_sans(envoy: EnvoyProcess) -> list[str]:
    certs = json.loads(envoy.admin_get("/certs"))
    return [san["uri"] for entry in certs["certificates"] for cert in entry.get("cert_chain", [])
            for san in cert.get("subject_alt_names", []) if "uri" in san]


def certificate_serials(envoy: EnvoyProcess) -> list[str]:
    certs = json.loads(envoy.admin_get("/certs"))
    return [cert["serial_number"].lstrip("0") for entry in certs["certificates"] for cert in entry.get("cert_chain", [])]


def admin_get(port: int, path: str) -> tuple[int, str]:
    """The agent's admin endpoint, as the kubelet's httpGet probe or an operator's curl reads it."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:  # not listening yet
        return 0, str(error)


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
    if process is not None:
        process.wait(10)


async def test_an_enrolled_pod_directory_is_served_and_its_removal_takes_it_out(
    tmp_path: Path, socket_dir: Path
) -> None:
    inbound, outbound, app_port, admin_port = free_port(), free_port(), free_port(), free_port()
    app = serve_app(app_port, backend_app("echo"))
    url = f"http://127.0.0.1:{outbound}/x"

    def status() -> int:
        return http_get(url)[0]

    workloads = socket_dir / "workloads"  # the node's /run/meshca/workloads
    workloads.mkdir()
    pod_dir = workloads / "6f1c2b7e-pod-uid"  # what the kubelet's subPathExpr $(POD_UID) names
    agent = enroll = None
    try:
        async with running_meshca(tmp_path / "meshca") as meshca:
            meshca.app.apply_mesh_config(agent_only_mesh(inbound, outbound, app_port))
            (tmp_path / "root.pem").write_bytes(meshca.root_pem)
            config = tmp_path / "agent.yaml"
            config.write_text(yaml.safe_dump({
                "meshca": [f"127.0.0.1:{meshca.port}"], "server_name": "localhost", "ca": str(tmp_path / "root.pem"),
                "workloads_dir": {"path": str(workloads), "socket_mode": "0600", "interval": "200ms"},
                "admin": f"127.0.0.1:{admin_port}",
            }))
            agent = meshca_process("agent", "--config", str(config), log=tmp_path / "agent.log")

            def healthz() -> tuple[int, str]:
                return admin_get(admin_port, "/healthz")

            def status_of_pod() -> dict[str, object]:
                code, body = admin_get(admin_port, "/status")
                assert code == 200
                (workload,) = json.loads(body)["workloads"]
                assert workload["name"] == pod_dir.name
                return workload  # type: ignore[no-any-return]

            await asyncio.to_thread(wait_until, lambda: healthz() == (200, "ok\n"), 20, 0.05, "ready with no pods")
            projected = tmp_path / "projected" / "meshca-token"  # the pod's projected service-account token
            projected.parent.mkdir()
            token = meshca.token("shop", "frontend", node_id="frontend-1")
            projected.write_text("not-a-token-meshca-accepts")  # refused at first: the pod waits for a certificate

            started = time.monotonic()
            enroll = meshca_process("agent", "enroll", "--dir", str(pod_dir), "--token-file", str(projected),
                                    "--endpoint", f"echo=127.0.0.1:{inbound}", "--interval", "200ms",
                                    log=tmp_path / "enroll.log")
            sds_socket = pod_dir / "sds.sock"
            await asyncio.to_thread(wait_until, sds_socket.is_socket, 20, 0.05, "the agent serving the pod")
            print(f"\nenroll started: the agent serves {sds_socket.name} {time.monotonic() - started:.2f} s later")
            await asyncio.to_thread(wait_until, lambda: "last CSR failed" in healthz()[1], 20, 0.05, "a refused CSR")
            code, body = healthz()
            assert code == 503 and body.startswith(f"{pod_dir.name}: no certificate yet (last CSR failed: ")
            assert body.count("\n") == 1 and "not-a-token" not in body
            pending = status_of_pod()
            assert pending["serial"] is None and pending["failures"] >= 1
            projected.write_text(token)  # the kubelet's token: enroll copies it, the agent's next CSR is signed
            await asyncio.to_thread(wait_until, lambda: healthz() == (200, "ok\n"), 20, 0.05, "ready with the pod")

            (tmp_path / "meshca-root.pem").write_bytes(meshca.root_pem)
            bootstrap = build_bootstrap(BootstrapSettings(
                node_id="frontend-1", cluster="frontend", meshca_address="127.0.0.1", meshca_port=meshca.port,
                meshca_ca_path=tmp_path / "meshca-root.pem", meshca_server_name="localhost", token=token,
                admin_port=free_port(), api_type="GRPC", agent_socket=sds_socket,
            ))
            with EnvoyProcess(bootstrap, workdir=tmp_path / "envoy") as envoy:
                await asyncio.to_thread(envoy.wait_ready, 30)
                await asyncio.to_thread(wait_until, lambda: status() == 200, 30, 0.1, "echo through the agent's cert")
                assert await asyncio.to_thread(eds_addresses, envoy) == [("127.0.0.1", inbound)]
                assert FRONTEND_ID in await asyncio.to_thread(certificate_sans, envoy)
                assert not meshca.app.secrets.certificates()  # meshca made no key: the agent did, on a CSR
                assert meshca.app.endpoints.count() == 1
                served = await asyncio.to_thread(status_of_pod)
                assert served["spiffe_id"] == FRONTEND_ID and served["socket"] == str(sds_socket)
                assert served["serial"] in await asyncio.to_thread(certificate_serials, envoy)  # what Envoy holds
                assert served["sds_streams"] >= 1 and served["issued"] == 1  # Envoy streams `default` and ROOTCA
                assert served["endpoints"] == {"endpoints": [{"service": "echo", "address": "127.0.0.1", "port": inbound}],
                                               "registered": True, "accepted_services": ["echo"]}
                full = admin_get(admin_port, "/status")[1]
                assert json.loads(full)["trust"]["roots"] >= 1
                assert token not in full and "eyJ" not in full and "PRIVATE KEY" not in full

                removed = time.monotonic()
                enroll.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(enroll.wait, 10) == 0
                assert not pod_dir.exists() and not sds_socket.exists()
                await asyncio.to_thread(wait_until, lambda: eds_addresses(envoy) == [], 20, 0.05, "out of EDS")
                seconds = time.monotonic() - removed
                print(f"enroll SIGTERM: directory and socket gone, the endpoint out of EDS {seconds:.2f} s later")
                assert await asyncio.to_thread(status) == 503
                assert meshca.app.endpoints.count() == 0
                assert agent.poll() is None
                assert healthz() == (200, "ok\n")  # no pods again: ready
            agent.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(agent.wait, 10) == 0
        text = (tmp_path / "agent.log").read_text()
        assert "workload 6f1c2b7e-pod-uid: found in" in text
        assert "is gone: stopped (socket removed, endpoints deregistered, key dropped)" in text
        logs = text + (tmp_path / "enroll.log").read_text()
        assert "PRIVATE KEY" not in logs and token not in logs and "eyJ" not in logs
    finally:
        stop(enroll)
        stop(agent)
        app.shutdown()
        app.server_close()
