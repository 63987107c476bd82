"""The benchmark harness runs and writes rows of the promised shape (tiny counts, no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import Profile
from benchmarks.run import machine_info, run_benchmarks, table, write_results

ROW_KEYS = {"name", "value", "unit", "baseline_name", "baseline_value", "ratio", "target", "met", "parameters"}

TINY = Profile(
    "smoke",
    leaf_seconds=0.3,
    build_services=5,
    build_endpoints=2,
    build_max_reps=1,
    build_budget_seconds=0,
)


def test_cheapest_benchmarks_write_rows_of_the_promised_shape(tmp_path: Path) -> None:
    rows = run_benchmarks(["leaf_issuance_in_process", "snapshot_build"], TINY, tmp_path / "work")
    output = tmp_path / "results" / "latest.json"
    write_results(output, rows, machine_info(TINY))

    document = json.loads(output.read_text())
    assert {"nproc", "python", "versions", "timestamp", "profile"} <= set(document["machine"])
    assert document["machine"]["profile"] == "smoke"
    names = [row["name"] for row in document["rows"]]
    assert names == ["leaf_issuance_in_process", "snapshot_build_full", "snapshot_build_one_service_change"]
    for row in document["rows"]:
        assert set(row) == ROW_KEYS, row
        assert "error" not in row["parameters"], row["parameters"]
        assert isinstance(row["value"], float) and row["value"] > 0
        assert isinstance(row["baseline_value"], float) and row["baseline_value"] > 0
        assert row["ratio"] is not None and row["ratio"] > 0
        assert isinstance(row["baseline_name"], str) and row["baseline_name"]
        assert isinstance(row["met"], bool)
        assert row["unit"] and row["target"]
        assert row["parameters"]["profile"] == "smoke"
    assert document["rows"][1]["parameters"]["services"] == 5
    rendered = table(document["rows"])
    assert "leaf_issuance_in_process" in rendered and "snapshot_build_full" in rendered


def test_a_failing_benchmark_becomes_a_row_without_verdict(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from benchmarks import leaf_issuance

    def broken(profile: Profile, workdir: Path) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(leaf_issuance, "run", broken)
    rows = run_benchmarks(["leaf_issuance_in_process"], TINY, tmp_path)
    assert len(rows) == 1 and set(rows[0]) == ROW_KEYS
    assert rows[0]["value"] is None and rows[0]["met"] is None
    assert "boom" in rows[0]["parameters"]["error"]


def test_failover_row_moves_every_stream_to_the_other_replica(tmp_path: Path) -> None:
    from dataclasses import replace

    rows = run_benchmarks(["failover_reconnect"], replace(TINY, failover_streams=40, stream_processes=1), tmp_path)
    (row,) = rows
    assert set(row) == ROW_KEYS and "error" not in row["parameters"], row["parameters"]
    assert row["name"] == "failover_reconnect" and row["value"] > 0 and row["baseline_value"] > 0
    parameters = row["parameters"]
    assert parameters["streams"] == parameters["streams_on_b"] == parameters["identities_issued_by_b"] == 40


def test_store_apply_row_reaches_every_stream_on_three_replicas(tmp_path: Path) -> None:
    from dataclasses import replace

    profile = replace(TINY, convergence_streams=30, convergence_services=20, stream_processes=1)
    (row,) = run_benchmarks(["store_apply_to_push"], profile, tmp_path)
    assert set(row) == ROW_KEYS and "error" not in row["parameters"], row["parameters"]
    assert row["name"] == "store_apply_to_push" and row["value"] > 0 and row["baseline_value"] > 0
    parameters = row["parameters"]
    assert parameters["streams_per_replica"] == [10, 10, 10]
    # the push and its ACKs change every replica's registry: each rewrites its summary, at most a few times
    assert all(1 <= writes <= 6 for writes in parameters["etcd_writes_per_push_by_replica"]), parameters


def test_agent_start_row_times_agents_and_central_sds_for_every_workload(tmp_path: Path) -> None:
    from dataclasses import replace

    (row,) = run_benchmarks(["agent_start"], replace(TINY, agent_workloads=4, agent_processes=1), tmp_path)
    assert set(row) == ROW_KEYS and "error" not in row["parameters"], row["parameters"]
    assert row["name"] == "agent_start" and row["value"] > 0 and row["baseline_value"] > 0
    assert isinstance(row["met"], bool)
    parameters = row["parameters"]
    assert parameters["workloads"] == 4
    agent, profile = parameters["agent"], parameters["agent_profile"]
    slowest = agent["max_of_cert_and_endpoint"]["p99_s"]  # the row's value, rounded as the others are
    assert 0 < agent["cert"]["p99_s"] <= slowest and 0 < agent["endpoint"]["p99_s"] <= slowest
    assert profile["registration_puts"] == 4  # each agent registered its workload's endpoint once
    assert 1 <= profile["mesh_rebuilds"] <= 4  # one per registration today; fewer once rebuilds are coalesced
    assert parameters["agent_without_endpoints"]["mesh_rebuilds"] == 0
    assert parameters["central"]["endpoint_s"] == 0.0 and parameters["central"]["mesh_rebuilds"] == 0
