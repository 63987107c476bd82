"""Benchmark 5: convergence — one endpoint change among 1,000 services reaching N ADS streams.

meshca runs as its own process with the 1,000-service mesh; N streams from several load-generator
processes, each with its own identity (stream j < 1,000 is the sidecar of svc-j, later ones are
identities with no service of their own), subscribed like Envoy: CDS and LDS wildcard, EDS for all
1,000 outbound clusters (+ its own local one), RDS, SDS `default` + `ROOTCA`; everything ACKed.

Then one endpoint of one service moves: the server process applies the changed MeshConfig the way
the file source does (`MeshcaApp.apply_mesh_config` on the event loop). t0 is taken just before
that call; each stream records when the first EDS response with a new version arrives. Value: p99
over streams of (arrival - t0); the row also gives the part after apply returned (push only).

Baseline, same run: benchmarks.rawserver holding N bidi streams from the same load-generator
layout fans out the very bytes one meshca stream received for the change; t0 just before the queues
are filled. Its clients do not answer. A second raw run, reported in the parameters only
(`baseline_with_acks_p99_s`), has every client answer with the very ACK one meshca stream sent
(the EDS ACK names every subscribed cluster) and the raw server read it: the same traffic both
ways, which shows how much of the gap is the ACKs' cost on this shared 2-core machine rather than
meshca's own work.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import Child, Profile, Row, failed_row, server_args, stop_all
from benchmarks.meshgen import EDS, Layout
from benchmarks.streams import (
    arm,
    collect,
    latency_stats,
    start_meshca_streams,
    start_raw_streams,
    tls_material,
)
from meshca.dev.envoy_process import free_port

NAME = "convergence"
TARGET = "<= 1 s and <= 2x baseline"
WORKERS = 2
WORKERS_NAME = "convergence_workers2"
WORKERS_TARGET = "<= 2x baseline"
UNIT = "s (p99)"


def measure_meshca(profile: Profile, streams: int, workdir: Path, dump: Path | None, workers: int = 1) -> dict[str, Any]:
    """meshca's p99; with `workers` > 1, that many server processes share one port (SO_REUSEPORT, as
    `meshca serve --workers N`), each with the same CA, issuer and mesh, each applying the change itself
    (as every replica does); t0 is the earliest of their applies."""
    layout = Layout(services=profile.convergence_services, endpoints=10)
    port = free_port() if workers > 1 else 0
    first = workdir / "meshca"

    def start(i: int) -> Child:  # a Child runs at once: the others only once the first has made the CA
        name = "meshca" if i == 0 else f"meshca-{i}"
        shared = {"port": port, "share_port": True, **({"state_from": str(first)} if i else {})} if workers > 1 else {}
        return Child("meshca_server", server_args(workdir=str(workdir / name), layout=layout.to_json(), **shared),
                     workdir / f"{name}.log")

    servers = [start(0)]
    gens: list[Child] = []
    try:
        info = servers[0].ready(timeout=1800)
        for i in range(1, workers):
            servers.append(start(i))
            servers[-1].ready(timeout=1800)
        gens, summary = start_meshca_streams(info, profile, streams, layout, workdir)
        split = [server.call("registry")["streams"] for server in servers]
        arm(gens, f"type:{EDS}", dump=dump)
        with ThreadPoolExecutor(len(servers)) as pool:
            changes = list(pool.map(
                lambda server: server.call("change_endpoint", timeout=1800, service=f"svc-{layout.services // 2}",
                                           generation=1),
                servers,
            ))
        result = collect(gens, timeout=300)
        if result["missing"]:
            raise RuntimeError(
                f"{result['missing']} of {streams} streams never received the change "
                f"({result['closed']} closed; errors {result['errors']})"
            )
        t0 = min(change["t0"] for change in changes)
        stats = latency_stats(result["hits"], t0)
        push = latency_stats(result["hits"], max(change["applied_at"] for change in changes))
        return {
            **stats,
            "push_p99_s": push["p99_s"],
            "apply_s": max(change["apply_seconds"] for change in changes),
            "bytes": result["bytes_median"],
            "resources_in_change": result["hit_resources"],
            "connect_seconds": summary["connect_seconds"],
            "mesh_apply_seconds": info["mesh_apply_seconds"],
            "streams_per_worker": split,
        }
    finally:
        stop_all([*gens, *servers])


def measure_baseline(
    profile: Profile, streams: int, workdir: Path, payload: Path, ack: Path | None = None
) -> dict[str, Any]:
    """The raw fan-out of `payload`; with `ack`, its clients answer with those bytes and it reads them."""
    tls = tls_material(workdir / "tls")
    server = Child(
        "rawserver",
        {"cert": str(tls.cert), "key": str(tls.key), "read_acks": ack is not None},
        workdir / "rawserver.log",
    )
    gens: list[Child] = []
    try:
        info = server.ready()
        extra = {"ack": str(ack)} if ack is not None else None
        gens = start_raw_streams(info["port"], tls.root, profile, streams, workdir, extra)
        arm(gens, "any")
        fan = server.call("fanout", payload=str(payload))
        result = collect(gens, timeout=300)
        if result["missing"]:
            raise RuntimeError(f"baseline: {result['missing']} streams did not receive the fan-out")
        return {**latency_stats(result["hits"], fan["t0"]), "bytes": fan["bytes"]}
    finally:
        stop_all([*gens, server])


def run(profile: Profile, workdir: Path) -> list[Row]:
    streams = profile.convergence_streams
    parameters: dict[str, Any] = {
        "streams": streams,
        "services": profile.convergence_services,
        "endpoints_per_service": 10,
        "load_processes": profile.stream_processes,
        "streams_per_connection": profile.streams_per_channel,
        "subscriptions": "CDS *, EDS all outbound clusters (+own), LDS *, RDS, SDS default+ROOTCA",
        "t0": "just before MeshcaApp.apply_mesh_config (includes the rebuild)",
    }
    dump = workdir / "change.bin"
    try:
        meshca = measure_meshca(profile, streams, workdir, dump)
        workers = measure_meshca(profile, streams, workdir / "workers", None, workers=WORKERS)
        baseline = measure_baseline(profile, streams, workdir, dump)
        with_acks = measure_baseline(profile, streams, workdir / "acks", dump, ack=dump.with_suffix(".ack"))
    except Exception as error:
        return [failed_row(NAME, UNIT, TARGET, error, **parameters)]
    parameters.update(
        {
            "p50_s": round(meshca["p50_s"], 4),
            "max_s": round(meshca["max_s"], 4),
            "apply_mesh_config_s": round(meshca["apply_s"], 4),
            "push_only_p99_s": round(meshca["push_p99_s"], 4),
            "change_message_bytes": meshca["bytes"],
            "resources_in_change_message": meshca["resources_in_change"],
            "baseline_p50_s": round(baseline["p50_s"], 4),
            "baseline_max_s": round(baseline["max_s"], 4),
            "baseline_with_acks_p99_s": round(with_acks["p99_s"], 4),
            "ratio_to_baseline_with_acks": round(meshca["p99_s"] / with_acks["p99_s"], 2),
            "ack_message_bytes": dump.with_suffix(".ack").stat().st_size,
            "connect_seconds": round(meshca["connect_seconds"], 1),
            "initial_mesh_apply_s": round(meshca["mesh_apply_seconds"], 2),
        }
    )
    value = meshca["p99_s"]
    workers_parameters = {
        **{k: parameters[k] for k in ("streams", "services", "endpoints_per_service", "load_processes",
                                      "streams_per_connection", "subscriptions")},
        "workers": WORKERS,
        "how": "benchmarks.meshca_server x2 on one port with SO_REUSEPORT (as `meshca serve --workers 2`); each "
               "applies the change; t0 just before the earlier apply",
        "streams_per_worker": workers["streams_per_worker"],
        "p50_s": round(workers["p50_s"], 4),
        "max_s": round(workers["max_s"], 4),
        "push_only_p99_s": round(workers["push_p99_s"], 4),
        "one_process_p99_s": round(value, 4),
        "baseline_p50_s": round(baseline["p50_s"], 4),
    }
    return [
        Row(
            NAME,
            value,
            UNIT,
            "raw grpc.aio fan-out of the same bytes",
            baseline["p99_s"],
            TARGET,
            value <= 1.0 and value <= 2 * baseline["p99_s"],
            parameters,
        ),
        Row(
            WORKERS_NAME,
            workers["p99_s"],
            UNIT,
            "raw grpc.aio fan-out of the same bytes",
            baseline["p99_s"],
            WORKERS_TARGET,
            workers["p99_s"] <= 2 * baseline["p99_s"],
            workers_parameters,
        )
    ]
