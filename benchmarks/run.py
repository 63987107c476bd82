"""Run the benchmarks, print a table, write benchmarks/results/latest.json.

    python -m benchmarks.run                 # quick profile (a few minutes)
    python -m benchmarks.run --full          # 10,000-stream rows, 10 Envoys, rotation storm
    python -m benchmarks.run --only convergence,snapshot_build
    python -m benchmarks.run --cprofile DIR  # also dump cProfile stats of the meshca server processes

Every row carries its same-run baseline, the issue's target and whether it was met (null when the
benchmark failed: the error is in its parameters). The exit status is 0 even when targets are missed:
the JSON is the verdict.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.common import FULL, QUICK, REPO, Profile, Row, failed_row

# name -> module; the order is cheapest first
BENCHMARKS: dict[str, str] = {
    "leaf_issuance_in_process": "benchmarks.leaf_issuance",
    "snapshot_build": "benchmarks.snapshot_build",
    "csr_service_throughput": "benchmarks.csr_throughput",
    "ads_streams_rss": "benchmarks.ads_streams_rss",
    "convergence": "benchmarks.convergence",
    "store_apply_to_push": "benchmarks.store_apply",
    "envoy_push_to_ack": "benchmarks.envoy_push_ack",
    "failover_reconnect": "benchmarks.failover",
    "agent_start": "benchmarks.agent_start",
    "rotation_storm": "benchmarks.rotation_storm",
}

RESULTS = REPO / "benchmarks" / "results"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _binary_version(path: str | None, *args: str) -> str | None:
    if path is None:
        return None
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0][:200] if text else None


def machine_info(profile: Profile) -> dict[str, Any]:
    venv_bin = Path(sys.executable).parent
    envoy = str(venv_bin / "envoy") if (venv_bin / "envoy").exists() else shutil.which("envoy")
    bao = str(venv_bin / "bao") if (venv_bin / "bao").exists() else shutil.which("bao")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=REPO,
                timeout=10,
            ).stdout.strip()
        )
    except (OSError, subprocess.TimeoutExpired):
        commit, dirty = "", None
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": profile.name,
        "nproc": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git_commit": commit,
        "git_uncommitted_changes": dirty,
        "versions": {
            "meshca": _version("meshca"),
            "grpcio": _version("grpcio"),
            "protobuf": _version("protobuf"),
            "cryptography": _version("cryptography"),
            "betterproto2": _version("betterproto2"),
            "envoy_data_plane": _version("envoy_data_plane"),
            "hvac": _version("hvac"),
            "envoy": _binary_version(envoy, "--version"),
            "openbao": _binary_version(bao, "version"),
        },
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["benchmark", "value", "unit", "baseline", "ratio", "target", "met"]
    lines = [
        [
            r["name"], _fmt(r["value"]), r["unit"], _fmt(r["baseline_value"]), _fmt(r["ratio"]), r["target"],
            _fmt(r["met"]),
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    for r in rows:
        if r["parameters"].get("error"):
            out.append(f"! {r['name']}: {r['parameters']['error'].splitlines()[-1][:300]}")
    return "\n".join(out)


def run_benchmarks(
    names: Sequence[str], profile: Profile, workdir: Path, cprofile_dir: Path | None = None
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        bench_dir = workdir / name
        bench_dir.mkdir(parents=True, exist_ok=True)
        print(f"== {name} ({profile.name})", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            if cprofile_dir is not None:
                os.environ["MESHCA_BENCH_CPROFILE"] = str(cprofile_dir / f"{name}.prof")
            produced: list[Row] = module.run(profile, bench_dir)
        except Exception as error:  # one broken benchmark must not hide the others
            traceback.print_exc()
            produced = [failed_row(name, getattr(module, "UNIT", ""), getattr(module, "TARGET", ""), error)]
        finally:
            os.environ.pop("MESHCA_BENCH_CPROFILE", None)
        elapsed = time.monotonic() - started
        for row in produced:
            data = row.to_json()
            data["parameters"]["profile"] = profile.name
            data["parameters"]["benchmark_seconds"] = round(elapsed, 1)
            rows.append(data)
            print(f"   {data['name']}: {_fmt(data['value'])} {data['unit']} "
                  f"(baseline {_fmt(data['baseline_value'])}, met {_fmt(data['met'])})", file=sys.stderr, flush=True)
    return rows


def write_results(path: Path, rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: machine info (nproc, python, versions, timestamp, profile) and the rows."""
    result = {"machine": info, "rows": list(rows)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--full", action="store_true", help="the full profile: 10,000 streams, 10 Envoys, rotation storm"
    )
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json", help="where the JSON goes")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs and state here (default: a temp dir)")
    parser.add_argument(
        "--cprofile", type=Path, default=None, help="dump cProfile stats of meshca server processes here"
    )
    args = parser.parse_args(argv)

    profile = FULL if args.full else QUICK
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    if not args.full and "rotation_storm" in names and not args.only:
        names.remove("rotation_storm")  # full profile only

    if args.cprofile is not None:
        args.cprofile.mkdir(parents=True, exist_ok=True)
        args.cprofile = args.cprofile.resolve()
    owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="meshca-bench-")) if owned else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine_info(profile)
    started = time.monotonic()
    try:
        rows = run_benchmarks(names, profile, workdir, args.cprofile)
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
    info["total_seconds"] = round(time.monotonic() - started, 1)
    write_results(args.output, rows, info)
    print(table(rows))
    met = sum(1 for r in rows if r["met"])
    missed = sum(1 for r in rows if r["met"] is False)
    unknown = sum(1 for r in rows if r["met"] is None)
    print(f"\n{len(rows)} rows, {met} targets met, {missed} missed, {unknown} without verdict; "
          f"{info['total_seconds']} s; written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
