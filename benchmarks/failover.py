"""failover_reconnect: N delta ADS streams on one of two replicas; kill -9 it; p99 time until every stream
is served by the other.

Two meshca_server processes share one CA state and JWT issuer and apply the same mesh, as replicas on one
etcd or state directory would. benchmarks.failover_streams holds N streams (one identity each, subscribed
like Envoy: CDS and LDS wildcard, EDS and RDS by name, SDS `default` + `ROOTCA`, delta ADS) on replica A.
A is killed with SIGKILL at t0; each stream, when it ends, waits as Envoy's first retry does (uniform in
[0, 0.25 s)) and reopens on replica B with `initial_resource_versions`. A stream is served again when its
`default` certificate arrives from B (B issues its own; nothing else differs, so nothing else is sent).
Value: p99 over streams of (served again - t0).

Baseline, same run: the same streams' first connection to a fresh replica (A at the start, with its
mesh applied but no identity issued yet): p99 of (served - the moment the streams are opened).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Child, Profile, Row, failed_row, percentile, server_args, stop_all
from benchmarks.meshgen import Layout

NAME = "failover_reconnect"
TARGET = "<= 5 s"
UNIT = "s (p99)"
SERVICES = 100


def _start_streams(info: dict[str, Any], port_b: int, profile: Profile, streams: int, layout: Layout, workdir: Path) -> list[Child]:
    processes = max(1, min(profile.stream_processes, streams))
    share, extra = divmod(streams, processes)
    gens, first = [], 0
    for p in range(processes):
        count = share + (1 if p < extra else 0)
        args = {
            "ports": [info["port"], port_b],
            "root": info["root"],
            "signing_key": info["signing_key"],
            "layout": layout.to_json(),
            "first": first,
            "count": count,
            "streams_per_channel": profile.streams_per_channel,
        }
        gens.append(Child("failover_streams", args, workdir / f"streams-{p}.log"))
        first += count
    for gen in gens:
        gen.ready(timeout=300)
    return gens


def measure(profile: Profile, streams: int, workdir: Path) -> dict[str, Any]:
    layout = Layout(services=SERVICES, endpoints=10)
    replica_a = Child("meshca_server", server_args(workdir=str(workdir / "a"), layout=layout.to_json()), workdir / "a.log")
    replica_b: Child | None = None
    gens: list[Child] = []
    try:
        info = replica_a.ready(timeout=600)
        replica_b = Child(
            "meshca_server",
            server_args(workdir=str(workdir / "b"), layout=layout.to_json(), state_from=str(workdir / "a")),
            workdir / "b.log",
        )
        info_b = replica_b.ready(timeout=600)
        gens = _start_streams(info, info_b["port"], profile, streams, layout, workdir)
        for gen in gens:
            gen.send("connect", timeout=600)
        first = [gen.reply(timeout=700) for gen in gens]
        missing = sum(r["missing"] for r in first)
        if missing:
            raise RuntimeError(f"{missing} of {streams} streams were never served by replica A: {first[0]['errors']}")
        baseline = [t - r["t0"] for r in first for t in r["served"]]
        registry = replica_a.call("registry")
        if registry["streams"] != streams:
            raise RuntimeError(f"replica A holds {registry['streams']} streams, not {streams}")
        t0 = _kill(replica_a)
        for gen in gens:
            gen.send("collect", timeout=300)
        again = [gen.reply(timeout=400) for gen in gens]
        missing = sum(r["missing"] for r in again)
        if missing:
            raise RuntimeError(f"{missing} of {streams} streams were not served again by replica B: {again[0]['errors']}")
        failover = [t - t0 for r in again for t in r["served"]]
        on_b = replica_b.call("registry")
        return {
            "p99_s": percentile(failover, 99),
            "p50_s": percentile(failover, 50),
            "max_s": max(failover),
            "baseline_p99_s": percentile(baseline, 99),
            "baseline_p50_s": percentile(baseline, 50),
            "streams_on_b": on_b["streams"],
            "identities_issued_by_b": replica_b.call("stats")["issued_total"],
        }
    finally:
        stop_all([*gens, replica_b, replica_a])


def _kill(child: Child) -> float:
    t0 = time.monotonic()
    child.proc.send_signal(signal.SIGKILL)
    child.proc.wait()
    return t0


def run(profile: Profile, workdir: Path) -> list[Row]:
    streams = profile.failover_streams
    parameters: dict[str, Any] = {
        "streams": streams,
        "services": SERVICES,
        "load_processes": profile.stream_processes,
        "streams_per_connection": profile.streams_per_channel,
        "protocol": "delta ADS; reconnect after uniform [0, 0.25 s) with initial_resource_versions",
        "served": "the stream's `default` certificate arrived from the replica",
        "t0": "SIGKILL of the replica holding every stream",
    }
    try:
        result = measure(profile, streams, workdir)
    except Exception as error:
        return [failed_row(NAME, UNIT, TARGET, error, **parameters)]
    parameters.update({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items() if k != "p99_s"})
    value = result["p99_s"]
    return [
        Row(
            NAME,
            value,
            UNIT,
            "the same streams' first connection to a fresh replica",
            result["baseline_p99_s"],
            TARGET,
            value <= 5.0,
            parameters,
        )
    ]
