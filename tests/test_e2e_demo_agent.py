"""`meshca demo --agent --check` as a user runs it: every sidecar in agent mode (one `meshca agent`), mTLS traffic, the
backend's endpoint known only from the agent's registration, and meshca's own count of private keys it sent: 0."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_e2e_demo import processes_under

from meshca.clock import system_clock
from meshca.dev.demo import DemoSettings
from meshca.dev.demo_agent import AgentDemo
from meshca.dev.harness import Workload

pytestmark = pytest.mark.e2e


def test_the_agent_demo_sends_no_private_key_and_routes_to_registered_endpoints(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "meshca.cli.main", "demo", "--agent", "--check", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nmeshca demo --agent --check: {seconds:.1f} s; " + json.dumps(
        {k: summary[k] for k in ("requests_ok", "private_keys_sent_by_server", "endpoints_registered",
                                 "envoy_keys_from_agent", "caller_removed_refused_seconds")}))
    assert summary["private_keys_sent_by_server"] == 0
    assert summary["endpoints_registered"] == summary["endpoints_expected"] == 1
    assert summary["envoy_keys_from_agent"] is True
    # what the normal demo checks holds in agent mode too
    assert summary["requests_ok"] == 20 and summary["requests_failed"] == 0
    assert summary["denied_as_expected"] and summary["caller_removed_refused"] and summary["caller_readmitted"]
    assert summary["revoked_refused"] is True
    assert summary["peer_seen_by_backend"] == ["spiffe://mesh.local/ns/shop/sa/frontend"]
    assert "registered by the agent, is in the EDS of frontend and intruder's sidecars" in result.stdout
    mesh = (workdir / "mesh.yaml").read_text()
    assert "endpoints: []" in mesh  # EDS came only from the registration
    for log in ("agent.log", "meshca.log"):
        text = (workdir / log).read_text()
        assert "PRIVATE KEY" not in text and "eyJ" not in text  # neither keys nor tokens in the logs
    assert processes_under(workdir) == {}  # meshca, the agent and the Envoys are gone


class ServerKeys(AgentDemo):
    """The agent demo with its sidecars bootstrapped in normal mode: meshca makes and sends their keys."""

    def agent_socket(self, workload: Workload) -> Path | None:
        return None


def test_the_agent_demo_check_fails_when_meshca_sends_the_keys(tmp_path: Path) -> None:
    demo = ServerKeys(DemoSettings(check=True, requests=2, agent=True, workdir=tmp_path), io.StringIO(), system_clock)
    try:
        demo.start()
        status, summary = demo.run_check()
    finally:
        demo.stop()
    assert summary["private_keys_sent_by_server"] == 3  # one `default` per sidecar, counted by meshca
    assert summary["envoy_keys_from_agent"] is False
    assert status == 1


def test_agent_and_ha_do_not_combine() -> None:
    result = subprocess.run([sys.executable, "-m", "meshca.cli.main", "demo", "--agent", "--ha", "--check"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and result.stderr.strip() == (
        "meshca: error: --agent and --ha do not combine in this demo: run them one at a time"
    )
