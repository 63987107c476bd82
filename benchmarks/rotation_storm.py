"""Benchmark 7 (full profile): rotation storm — forced intermediate rotation with N connected identities.

meshca runs as its own process with the RSS benchmark's mesh (every stream the sidecar of its own
identity) and RotationSettings(reissue_window=W, reissue_rate high enough that the window, not the
rate, sets the spread). N streams from several load-generator processes hold their `default`.
The server process then runs `CertificateAuthority.rotate_intermediate(now=True)` and the CA
watcher's check (t0), which re-issues every identity's leaf spread over W. Each stream records when
an SDS response carries a `default` secret whose bytes differ from the one it held.

Met when every stream received a new `default` within W of t0 and no stream was dropped.
Baseline, same run: issuing N leaves back to back in-process with the same CA code
(`CertificateAuthority.issue_workload`), the floor for re-issuing everybody at once.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import TRUST_DOMAIN, Child, Profile, Row, failed_row, server_args, stop_all
from benchmarks.meshgen import Layout
from benchmarks.streams import arm, collect, latency_stats, start_meshca_streams
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock

NAME = "rotation_storm"
UNIT = "s (last stream)"


def _issuance_floor(count: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp:
        ca = CertificateAuthority.init(Path(tmp) / "ca", CaSettings(trust_domain=TRUST_DOMAIN), system_clock)
        layout = Layout(services=10, clients=count, streams_are_clients=True)
        identities = [layout.spiffe_id(j) for j in range(count)]
        started = time.perf_counter()
        for spiffe_id in identities:
            ca.issue_workload(spiffe_id)
        return time.perf_counter() - started


def run(profile: Profile, workdir: Path) -> list[Row]:
    streams = profile.rotation_streams
    window = profile.rotation_window_seconds
    target = f"all streams <= {window:g} s (window), 0 dropped"
    parameters: dict[str, Any] = {
        "streams": streams,
        "reissue_window_s": window,
        "load_processes": profile.stream_processes,
        "streams_per_connection": profile.streams_per_channel,
    }
    layout = Layout(services=10, clients=streams, streams_are_clients=True)
    server = Child(
        "meshca_server",
        server_args(
            workdir=str(workdir / "meshca"),
            layout=layout.to_json(),
            rotation={"window_seconds": window, "rate": 4 * streams / window},
        ),
        workdir / "meshca.log",
    )
    gens: list[Child] = []
    try:
        info = server.ready(timeout=900)
        gens, summary = start_meshca_streams(info, profile, streams, layout, workdir)
        arm(gens, "secret:default")
        rotation = server.call("rotate_intermediate", timeout=300)
        result = collect(gens, timeout=window + 120)
        after = server.call("stats")
    except Exception as error:
        return [failed_row(NAME, UNIT, target, error, **parameters)]
    finally:
        stop_all([*gens, server])
    floor = _issuance_floor(streams)
    received = len(result["hits"])
    stats = latency_stats(result["hits"], rotation["t0"]) if received else {"p50_s": None, "p99_s": None, "max_s": None}
    last = stats["max_s"]
    parameters.update(
        {
            "received_new_default": received,
            "missing": result["missing"],
            "dropped": result["closed"],
            "streams_held_after": after["streams"],
            "last_minus_window_ms": round((last - window) * 1000, 1) if last is not None else None,
            "p50_s": stats["p50_s"],
            "p99_s": stats["p99_s"],
            "old_intermediate": rotation["old"],
            "new_intermediate": rotation["new"],
            "errors": result["errors"],
        }
    )
    complete = result["missing"] == 0 and result["closed"] == 0 and after["streams"] == streams
    met = complete and last is not None and last <= window
    return [
        Row(NAME, last, UNIT, f"in-process issue_workload x {streams}, back to back", floor, target, met, parameters)
    ]
