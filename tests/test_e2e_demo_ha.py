"""`meshca demo --ha --check` as a user runs it: three etcd members, three replicas, real Envoys under traffic;
a replica and the etcd leader are killed with SIGKILL and a mesh apply follows. Not one request may fail."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_the_ha_demo_loses_a_replica_and_the_etcd_leader_without_a_failed_request() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshca.cli.main", "demo", "--ha", "--check", "--duration", "36s"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print({k: summary[k] for k in ("requests_ok", "failover_seconds_max", "mesh_apply_after_etcd_leader_death_seconds",
                                   "leaf_rotations")})
    assert summary["requests_failed"] == 0 and summary["requests_ok"] > 100
    assert summary["replicas_killed"] == 1 and summary["etcd_members_killed"] == 1
    assert summary["failover_seconds_max"] is not None and summary["failover_seconds_max"] < 10
    assert summary["mesh_apply_after_etcd_leader_death_seconds"] is not None  # reached every sidecar
    assert summary["denied_as_expected"]
    # 20 s leaves over 36 s: every sidecar renewed at least once, across the replica's death
    assert all(count >= 1 for count in summary["leaf_rotations_by_workload"].values())
    assert "every sidecar of replica" in result.stdout and "reconnected to another replica" in result.stdout


def test_ha_needs_check() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshca.cli.main", "demo", "--ha"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and result.stderr.strip() == (
        "meshca: error: --ha needs --check (it kills a replica and the etcd leader, then reports)"
    )
