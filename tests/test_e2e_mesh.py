"""End to end with real Envoy sidecars: mTLS between services, refusal, live route edits, impersonation."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from meshca.clock import system_clock
from meshca.dev.demo import Demo, DemoSettings
from meshca.dev.envoy_process import EnvoyProcess, free_port, wait_until
from meshca.dev.harness import FRONTEND, INTRUDER, backend_app, http_get, mesh_config
from meshca.dev.tokens import mint_token
from meshca.node.bootstrap import BootstrapSettings, build_bootstrap

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["DELTA_GRPC", "GRPC"])
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """The demo's mesh with its sidecars on delta ADS (the default) and on state of the world."""
    workdir = tmp_path_factory.mktemp("mesh")
    running = Demo(DemoSettings(check=True, workdir=workdir, api_type=request.param), sys.stdout, system_clock)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def metric(demo: Demo, name: str) -> float:
    status, text = http_get(f"http://127.0.0.1:{demo.ports.metrics}/metrics")
    assert status == 200 and isinstance(text, str)
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_mtls_request_reaches_backend_which_sees_the_frontend_identity(demo: Demo) -> None:
    results = [demo.one_request() for _ in range(5)]
    assert all(r.ok for r in results), results
    assert {r.peer for r in results} == {FRONTEND.spiffe_id}
    assert {r.served_by for r in results} == {"backend"}
    # what each Envoy holds is its own identity's certificate
    report = demo.workloads_report()
    assert report["frontend"]["spiffe_id"] == FRONTEND.spiffe_id
    assert report["intruder"]["spiffe_id"] == INTRUDER.spiffe_id


def test_disallowed_caller_is_refused(demo: Demo) -> None:
    before = demo.backend_refused_handshakes()
    status = demo.intruder_request()
    assert status == 503
    assert demo.backend_refused_handshakes() > before  # refused by the backend's sidecar at the handshake


def test_route_edit_moves_traffic_without_restart_and_invalid_edit_keeps_serving(demo: Demo) -> None:
    v2_app = free_port()
    demo.serve_app(v2_app, backend_app("backend-v2"))
    config = mesh_config(demo.ports)
    config["services"]["backend-v2"] = {
        "namespace": "shop",
        "service_account": "backend",
        "inbound": {"port": free_port(), "app": f"127.0.0.1:{v2_app}", "listen_address": "127.0.0.1"},
        "allow": [FRONTEND.spiffe_id],
    }
    config["routes"] = [{"prefix": "/", "to": "backend-v2"}]
    meshca_pid = demo.meshca.pid if demo.meshca else None
    envoy_pids = {name: envoy.pid for name, envoy in demo.envoys.items()}
    demo.write_mesh(config)
    moved = wait_until(lambda: (r := demo.one_request()).served_by == "backend-v2" and r, 20, 0.2, "route moved")
    assert moved.ok and moved.peer == FRONTEND.spiffe_id

    rejected_before = metric(demo, "meshca_mesh_rejected_total")
    broken = copy.deepcopy(config)
    broken["routes"] = [{"prefix": "/", "to": "no-such-service"}]
    demo.write_mesh(broken)
    wait_until(lambda: metric(demo, "meshca_mesh_rejected_total") > rejected_before, 20, 0.2, "edit rejected")
    results = [demo.one_request() for _ in range(5)]
    assert all(r.ok and r.served_by == "backend-v2" for r in results), results
    log = (demo.workdir / "meshca.log").read_text()
    assert "routes[0].to" in log and "no-such-service" in log
    # nothing was restarted
    assert demo.meshca is not None and demo.meshca.pid == meshca_pid and demo.meshca.poll() is None
    assert {name: envoy.pid for name, envoy in demo.envoys.items()} == envoy_pids


def test_node_with_a_token_for_another_identity_gets_no_config(demo: Demo, tmp_path: Path) -> None:
    # the node says it is frontend-1 (node.id and metadata) but holds the intruder's token
    token = mint_token(
        demo.material.signing_key.read_bytes(),
        namespace=INTRUDER.namespace,
        service_account=INTRUDER.service_account,
        node_id=INTRUDER.node_id,
        now=datetime.now(timezone.utc),
    )
    settings = BootstrapSettings(
        node_id=FRONTEND.node_id,
        cluster="frontend",
        meshca_address="127.0.0.1",
        meshca_port=demo.ports.meshca,
        meshca_ca_path=demo.material.root_bundle,
        meshca_server_name="localhost",
        token=token,
        admin_port=free_port(),
        node_metadata={"NAMESPACE": FRONTEND.namespace, "SERVICE_ACCOUNT": FRONTEND.service_account},
    )
    with EnvoyProcess(build_bootstrap(settings), workdir=tmp_path / "impostor") as impostor:
        impostor.wait_ready(20, live=False)
        log = demo.workdir / "meshca.log"
        wait_until(lambda: "node.id" in log.read_text() and "refused" in log.read_text(), 20, 0.2, "refusal logged")
        dump = impostor.config_dump()
        dynamic = [
            section
            for section in dump.get("configs", [])
            for key in ("dynamic_active_clusters", "dynamic_listeners", "dynamic_active_secrets")
            if section.get(key)
        ]
        assert dynamic == []
        status, proxies = http_get(f"http://127.0.0.1:{demo.ports.metrics}/status")
        assert status == 200 and isinstance(proxies, list)
        assert sorted(p["node_id"] for p in proxies).count(FRONTEND.node_id) == 1  # only the real frontend


def test_meshca_status_command_lists_every_proxy(demo: Demo) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshca.cli.main", "status", "--admin", f"http://127.0.0.1:{demo.ports.metrics}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    for workload in ("frontend-1", "backend-1", "intruder-1"):
        assert workload in result.stdout
    assert "SYNCED" in result.stdout


def test_demo_check_command_exits_zero_with_json_summary(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshca.cli.main", "demo", "--check", "--requests", "5"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["requests_ok"] == 5 and summary["requests_failed"] == 0
    assert summary["denied_as_expected"] is True
    # an edit during the run removed frontend from backend's callers: refused on its open connection, then put back
    assert summary["caller_removed_refused"] is True and summary["caller_readmitted"] is True
    assert "removed frontend from backend's allow" in result.stdout
    # the last step revokes frontend's identity: its serial on every peer's CRL, its next request refused
    assert summary["revoked_refused"] is True
    assert "revoked spiffe://" in result.stdout
