"""End to end: `meshca serve` with real Envoy sidecars records each issuance with the node that asked; the log
verifies, `meshca certs list --valid` shows what the Envoys hold, and no key or token is in it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshca.clock import system_clock
from meshca.config import AUDIT_FILE
from meshca.dev.demo import Demo, DemoSettings
from meshca.dev.harness import BACKEND, FRONTEND, INTRUDER, envoy_certificate

pytestmark = pytest.mark.e2e

JWT = re.compile(rb"eyJ[\w-]+\.[\w-]+\.[\w-]+")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    running = Demo(DemoSettings(check=True, workdir=tmp_path_factory.mktemp("audit")), sys.stdout, system_clock)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def meshca(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshca.cli.main", *args], capture_output=True, text=True, timeout=60)


def issued(path: Path, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The log's issue lines once every sidecar's is there (the writer flushes every 100 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []
        found = [r for r in lines if r["event"] == "issue"]
        if {r["node_id"] for r in found} >= {FRONTEND.node_id, BACKEND.node_id, INTRUDER.node_id}:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no issue line for every sidecar in {path}: {lines}")
        time.sleep(0.1)


def test_each_sidecar_issuance_is_audited_with_its_node_and_listed_as_valid(demo: Demo) -> None:
    assert demo.one_request().ok
    config = str(demo.material.serve_config)
    path = demo.material.state_dir / AUDIT_FILE  # the default: the CA state dir
    records = issued(path)
    by_node = {r["node_id"]: r for r in records}
    for workload in (FRONTEND, BACKEND):
        record = by_node[workload.node_id]
        assert record["spiffe_id"] == workload.spiffe_id
        held = envoy_certificate(demo.envoys[workload.name])
        assert held is not None
        assert int(held.serial, 16) == int(record["serial"], 16)  # what the real Envoy serves
        assert record["issuer"] and record["replica"]

    verified = meshca("audit", "verify", "--config", config)
    assert verified.returncode == 0, verified.stderr
    assert f"{path}: OK," in verified.stdout and "chain intact" in verified.stdout
    print(verified.stdout.strip())

    listed = meshca("certs", "list", "--config", config, "--valid", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert {(e["spiffe_id"], e["node_id"]) for e in entries} >= {
        (FRONTEND.spiffe_id, FRONTEND.node_id), (BACKEND.spiffe_id, BACKEND.node_id)
    }
    assert all(e["state"] == "valid" for e in entries)
    table = meshca("certs", "list", "--config", config, "--valid")
    assert table.returncode == 0 and FRONTEND.node_id in table.stdout
    print(table.stdout)


def test_no_private_key_or_token_reaches_the_audit_log(demo: Demo) -> None:
    path = demo.material.state_dir / AUDIT_FILE
    issued(path)
    tokens = {match for envoy_dir in demo.workdir.glob("envoy-*") for file in envoy_dir.rglob("*") if file.is_file()
              for match in JWT.findall(file.read_bytes())}
    assert tokens, "the sidecars' bootstraps carry their JWTs: the check below would prove nothing"
    content = path.read_bytes()
    assert b"PRIVATE KEY" not in content and b"-----BEGIN" not in content
    assert not JWT.search(content)
    assert not any(token in content for token in tokens)
