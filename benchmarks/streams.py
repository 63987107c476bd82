"""Helpers for the stream benchmarks: TLS material for the baseline server, load generators in parallel."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from benchmarks.common import TRUST_DOMAIN, Child, ChildError, Profile, percentile
from benchmarks.meshgen import Layout
from meshca.app import issue_server_credentials
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    root: Path


def tls_material(directory: Path) -> TlsFiles:
    """A CA and a loopback server certificate like meshca's own (P-256), for the baseline server."""
    ca = CertificateAuthority.init(directory / "ca", CaSettings(trust_domain=TRUST_DOMAIN), system_clock)
    credentials = issue_server_credentials(ca, ["localhost", "127.0.0.1"], timedelta(days=1))
    files = TlsFiles(directory / "server.pem", directory / "server.key", directory / "root.pem")
    files.cert.write_bytes(credentials.certificate_chain_pem)
    files.key.write_bytes(credentials.private_key_pem)
    files.root.write_bytes(ca.trust_bundle_pem())
    return files


def start_loadgens(
    mode: str,
    *,
    total: int,
    processes: int,
    port: int,
    root: Path,
    workdir: Path,
    streams_per_channel: int,
    layout: Layout | None = None,
    signing_key: str | None = None,
    ready_timeout: float = 900.0,
    extra: dict[str, Any] | None = None,
) -> tuple[list[Child], dict[str, Any]]:
    """Start `processes` load generators holding `total` streams between them; wait until all are ready.

    `extra`: more arguments for every load generator (e.g. raw mode's "ack")."""
    processes = max(1, min(processes, total))
    share, remainder = divmod(total, processes)
    children: list[Child] = []
    first = 0
    try:
        for p in range(processes):
            count = share + (1 if p < remainder else 0)
            args: dict[str, Any] = {
                "mode": mode,
                "port": port,
                "root": str(root),
                "first": first,
                "count": count,
                "streams_per_channel": streams_per_channel,
                "ready_timeout": ready_timeout,
                **(extra or {}),
            }
            if layout is not None:
                args["layout"] = layout.to_json()
                args["signing_key"] = signing_key
            children.append(Child("loadgen", args, workdir / f"loadgen-{mode}-{p}.log"))
            first += count
        started = time.monotonic()
        reports = [child.ready(timeout=ready_timeout + 120) for child in children]
    except BaseException:
        for child in children:
            child.stop()
        raise
    summary = {
        "streams": sum(r["streams"] for r in reports),
        "ready": sum(r["ready"] for r in reports),
        "closed": sum(r["closed"] for r in reports),
        "channels": sum(r["channels"] for r in reports),
        "connect_seconds": time.monotonic() - started,
        "errors": _merge([r["errors"] for r in reports]),
    }
    return children, summary


def _merge(maps: list[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for m in maps:
        for key, value in m.items():
            merged[key] = merged.get(key, 0) + value
    return merged


def require_all_ready(summary: dict[str, Any], what: str) -> None:
    if summary["ready"] != summary["streams"]:
        raise ChildError(
            f"{what}: only {summary['ready']} of {summary['streams']} streams got their initial state "
            f"({summary['closed']} closed; errors: {summary['errors']})"
        )


def start_meshca_streams(
    info: dict[str, Any], profile: Profile, streams: int, layout: Layout, workdir: Path
) -> tuple[list[Child], dict[str, Any]]:
    """`streams` ADS streams (one identity each, per `layout`) against a ready meshca_server; all synced."""
    gens, summary = start_loadgens(
        "xds",
        total=streams,
        processes=profile.stream_processes,
        port=info["port"],
        root=Path(info["root"]),
        workdir=workdir,
        streams_per_channel=profile.streams_per_channel,
        layout=layout,
        signing_key=info["signing_key"],
    )
    require_all_ready(summary, "meshca")
    return gens, summary


def start_raw_streams(
    port: int,
    root: Path,
    profile: Profile,
    streams: int,
    workdir: Path,
    extra: dict[str, Any] | None = None,
) -> list[Child]:
    """`streams` bidi streams against a ready benchmarks.rawserver, same layout as meshca's; all ready."""
    gens, summary = start_loadgens(
        "raw",
        total=streams,
        processes=profile.stream_processes,
        port=port,
        root=root,
        workdir=workdir,
        streams_per_channel=profile.streams_per_channel,
        extra=extra,
    )
    require_all_ready(summary, "baseline")
    return gens


def arm(children: list[Child], kind: str, dump: Path | None = None) -> None:
    for index, child in enumerate(children):
        args: dict[str, Any] = {"kind": kind}
        if dump is not None and index == 0:
            args["dump"] = str(dump)
        child.call("arm", **args)


def collect(children: list[Child], timeout: float) -> dict[str, Any]:
    for child in children:
        child.send("collect", timeout=timeout)
    replies = [child.reply(timeout=timeout + 60) for child in children]
    return {
        "hits": [h for r in replies for h in r["hits"]],
        "missing": sum(r["missing"] for r in replies),
        "closed": sum(r["closed"] for r in replies),
        "bytes_median": replies[0]["bytes_median"],
        "hit_resources": replies[0].get("hit_resources"),
        "errors": _merge([r["errors"] for r in replies]),
    }


def latency_stats(hits: list[float], t0: float) -> dict[str, float]:
    latencies = [h - t0 for h in hits]
    return {
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "max_s": max(latencies),
    }
