"""End to end with real Envoys and a real OpenBao: Vault-rooted mTLS, and a Vault outage during rotation."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta

import pytest

from meshca.clock import system_clock
from meshca.dev.demo import Demo, DemoSettings
from meshca.dev.envoy_process import wait_until
from meshca.dev.harness import ChainWatcher, TrafficLoop, http_get

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    settings = DemoSettings(
        check=True, workdir=tmp_path_factory.mktemp("vault"), cert_ttl=timedelta(seconds=20), ca="vault"
    )
    running = Demo(settings, sys.stdout, system_clock)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def metric(demo: Demo, name: str) -> float:
    status, text = http_get(f"http://127.0.0.1:{demo.ports.metrics}/metrics")
    assert status == 200 and isinstance(text, str)
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_workload_chains_verify_to_the_root_held_by_vault(demo: Demo) -> None:
    report = demo.vault_root_report()
    assert report["chains_verify_to_vault_root"] is True
    assert "Vault" in report["root_subject"]
    assert all(demo.one_request().ok for _ in range(5))


def test_vault_down_during_rotation_keeps_serving_and_recovers(demo: Demo) -> None:
    assert demo.openbao is not None
    watcher = ChainWatcher(demo.envoys)
    with TrafficLoop(demo.one_request) as traffic:
        demo.openbao.pause()  # Vault stops answering (SIGSTOP): no new intermediate can be signed
        try:
            failures_before = metric(demo, "meshca_vault_failures_total")
            # an operator asks for a new intermediate while Vault is down: refused with a clear reason
            with pytest.raises(RuntimeError, match="rotate"):
                demo.ca_command("rotate", "--intermediate", "--now")

            # leaves keep rotating: the intermediate is local, only preparing the next one needs Vault
            def rotated() -> bool:
                watcher.sample()
                return min(watcher.leaf_rotations().values()) >= 1

            wait_until(rotated, 45, 0.5, "leaves rotated while Vault was down")
            # the token maintenance notices Vault is unreachable, visibly
            wait_until(lambda: metric(demo, "meshca_vault_failures_total") > failures_before, 30, 0.5, "failure seen")
        finally:
            demo.openbao.resume()
        wait_until(lambda: metric(demo, "meshca_vault_consecutive_failures") == 0, 30, 0.5, "Vault session recovered")
        output = demo.ca_command("rotate", "--intermediate", "--now")  # works again once Vault is back
        assert "activated" in output
    assert traffic.failures == [] and traffic.ok > 0
    assert demo.vault_root_report()["chains_verify_to_vault_root"] is True


def test_demo_check_with_vault_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshca.cli.main", "demo", "--check", "--ca", "vault", "--requests", "5"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["requests_failed"] == 0 and summary["vault"]["chains_verify_to_vault_root"] is True
    assert len(summary["vault"]["root_fingerprint_sha256"]) == 64
    assert summary["vault"]["mode"] == "vault-intermediate" and summary["vault"]["leaves_basic_constraints_ca_false"]
    assert summary["vault"]["leaf_issuers"] != [summary["vault"]["root_subject"]]  # meshca's intermediate signs


def test_demo_check_with_vault_leaf_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshca.cli.main", "demo", "--check", "--ca", "vault-leaf", "--requests", "5"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    vault = summary["vault"]
    assert summary["requests_failed"] == 0 and summary["denied_as_expected"] is True
    assert vault["mode"] == "vault-leaf" and vault["chains_verify_to_vault_root"] is True
    assert vault["leaf_issuers"] == [vault["root_subject"]]  # Vault's root signed every sidecar's leaf itself
    assert vault["leaves_basic_constraints_ca_false"] is True  # the SPIFFE X509-SVID spec: cA=false


def test_demo_vault_leaf_refuses_an_intermediate_rotation_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="no intermediate to rotate"):
        DemoSettings(check=True, ca="vault-leaf", duration=timedelta(seconds=30), rotate_intermediate_at=timedelta(seconds=5))
