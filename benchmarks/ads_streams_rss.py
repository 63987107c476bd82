"""Benchmark 4: RSS growth per ADS stream held by one meshca process.

meshca runs as its own process (benchmarks.meshca_server) with a mesh of 10 serving services and
one outbound-only client service per stream, so every stream is the sidecar of its own identity:
its own token, certificate, `default` secret, listener and snapshot. Load generators in several
processes open the streams (100 per TLS connection), each subscribed to CDS, EDS, LDS, RDS and SDS
(`default`, `ROOTCA`) and ACKing everything. RSS is read from /proc once it has settled, before the
first stream and after the last one got its initial state.

Baseline, same run: a bare grpc.aio server (benchmarks.rawserver, same TLS and options) holding the
same number of idle bidi streams from the same load-generator layout, measured the same way.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import Child, Profile, Row, failed_row, server_args, settle_rss, stop_all
from benchmarks.meshgen import Layout
from benchmarks.streams import start_meshca_streams, start_raw_streams, tls_material

NAME = "ads_streams_rss"
TARGET = "<= 64 KB/stream"


def measure_baseline(profile: Profile, streams: int, workdir: Path) -> dict[str, float]:
    tls = tls_material(workdir / "tls")
    server = Child("rawserver", {"cert": str(tls.cert), "key": str(tls.key)}, workdir / "rawserver.log")
    gens: list[Child] = []
    try:
        info = server.ready()
        before = settle_rss(server.pid)
        gens = start_raw_streams(info["port"], tls.root, profile, streams, workdir)
        after = settle_rss(server.pid)
        held = server.call("stats")["streams"]
        return {"per_stream_kb": (after - before) / streams, "before_kb": before, "after_kb": after, "held": held}
    finally:
        stop_all([*gens, server])


def measure_meshca(profile: Profile, streams: int, workdir: Path) -> dict[str, float]:
    layout = Layout(services=10, clients=streams, streams_are_clients=True)
    server = Child(
        "meshca_server", server_args(workdir=str(workdir / "meshca"), layout=layout.to_json()), workdir / "meshca.log"
    )
    gens: list[Child] = []
    try:
        info = server.ready(timeout=900)
        before = settle_rss(server.pid)
        gens, summary = start_meshca_streams(info, profile, streams, layout, workdir)
        after = settle_rss(server.pid)
        stats = server.call("stats")
        if stats["streams"] != streams:
            raise RuntimeError(f"meshca holds {stats['streams']} streams, expected {streams}")
        return {
            "per_stream_kb": (after - before) / streams,
            "before_kb": before,
            "after_kb": after,
            "connect_seconds": summary["connect_seconds"],
            "channels": summary["channels"],
            "identities": stats["identities"],
            "mesh_apply_seconds": info["mesh_apply_seconds"],
        }
    finally:
        stop_all([*gens, server])


def run(profile: Profile, workdir: Path) -> list[Row]:
    streams = profile.rss_streams
    parameters = {
        "streams": streams,
        "load_processes": profile.stream_processes,
        "streams_per_connection": profile.streams_per_channel,
        "mesh": "10 serving services (10 endpoints) + 1 outbound-only client service per stream",
        "subscriptions": "CDS *, EDS 10 names, LDS *, RDS outbound, SDS default+ROOTCA",
    }
    try:
        meshca = measure_meshca(profile, streams, workdir)
    except Exception as error:
        return [failed_row(NAME, "KB/stream", TARGET, error, **parameters)]
    baseline = measure_baseline(profile, streams, workdir)
    parameters.update(
        {
            "meshca_rss_before_mb": round(meshca["before_kb"] / 1024, 1),
            "meshca_rss_after_mb": round(meshca["after_kb"] / 1024, 1),
            "baseline_rss_before_mb": round(baseline["before_kb"] / 1024, 1),
            "baseline_rss_after_mb": round(baseline["after_kb"] / 1024, 1),
            "connect_seconds": round(meshca["connect_seconds"], 1),
            "identities": meshca["identities"],
            "mesh_apply_seconds": round(meshca["mesh_apply_seconds"], 2),
        }
    )
    value = meshca["per_stream_kb"]
    return [
        Row(
            NAME,
            value,
            "KB/stream",
            "bare grpc.aio server, idle bidi streams",
            baseline["per_stream_kb"],
            TARGET,
            value <= 64,
            parameters,
        )
    ]
