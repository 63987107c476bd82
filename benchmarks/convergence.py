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

NAME = "convergence"
TARGET = "<= 1 s and <= 2x baseline"
UNIT = "s (p99)"


def measure_meshca(profile: Profile, streams: int, workdir: Path, dump: Path) -> dict[str, Any]:
    layout = Layout(services=profile.convergence_services, endpoints=10)
    server = Child(
        "meshca_server", server_args(workdir=str(workdir / "meshca"), layout=layout.to_json()), workdir / "meshca.log"
    )
    gens: list[Child] = []
    try:
        info = server.ready(timeout=1800)
        gens, summary = start_meshca_streams(info, profile, streams, layout, workdir)
        arm(gens, f"type:{EDS}", dump=dump)
        change = server.call("change_endpoint", timeout=1800, service=f"svc-{layout.services // 2}", generation=1)
        result = collect(gens, timeout=300)
        if result["missing"]:
            raise RuntimeError(
                f"{result['missing']} of {streams} streams never received the change "
                f"({result['closed']} closed; errors {result['errors']})"
            )
        stats = latency_stats(result["hits"], change["t0"])
        push = latency_stats(result["hits"], change["applied_at"])
        return {
            **stats,
            "push_p99_s": push["p99_s"],
            "apply_s": change["apply_seconds"],
            "bytes": result["bytes_median"],
            "resources_in_change": result["hit_resources"],
            "connect_seconds": summary["connect_seconds"],
            "mesh_apply_seconds": info["mesh_apply_seconds"],
        }
    finally:
        stop_all([*gens, server])


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
        )
    ]
