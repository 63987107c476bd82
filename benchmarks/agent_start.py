"""Benchmark: a workload's agent start to its first served certificate and its endpoint in EDS, vs today's central SDS.

meshca runs as its own process (benchmarks.meshca_server, as `meshca serve`: internal CA, dev JWT issuer, TLS)
with a mesh of N services whose `endpoints` are `[]` (registered only). Load generators (benchmarks.agentload,
`agent_processes` of them) hold the workloads.

Agent path: one real meshca.agent NodeAgent per workload, started in the load-generator process (one process
per workload would measure 200 Python start-ups on 2 cores, not the agent). t0: just before the NodeAgent is
made and started. Per workload: `cert` = t0 to an SDS client on its Unix socket receiving `default` (measured
at the client); `endpoint` = t0 to an EDS observer (an ADS stream opened before t0, subscribed to that
service's outbound ClusterLoadAssignment) receiving the workload's address. Value: p99 of max(cert, endpoint).

Baseline, same run, same meshca process (after the agents stopped and their registrations left): today's central
SDS. One node per workload opens its own TLS connection and ADS stream with the same kind of JWT and asks for
`default`; t0 just before the channel is made, until the Secret arrives (meshca makes the key and signs it then).
The endpoint through central SDS is static in the mesh file: 0 s, nothing to wait for.

The workloads start all at once (the herd: the row's value); the full profile also starts them in waves.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Child, Profile, Row, failed_row, percentile, server_args, stop_all
from benchmarks.meshgen import Layout

NAME = "agent_start"
UNIT = "s (p99)"
TARGET = "<= 2x central SDS p99"
TIMEOUT = 600.0
BASELINE = "central SDS: ADS stream open to `default` received (endpoint static: 0 s)"


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_s": round(percentile(values, 50), 4),
        "p99_s": round(percentile(values, 99), 4),
        "max_s": round(max(values), 4),
    }


def _split(total: int, processes: int) -> list[tuple[int, int]]:
    processes = max(1, min(processes, total))
    share, remainder = divmod(total, processes)
    parts, first = [], 0
    for p in range(processes):
        count = share + (1 if p < remainder else 0)
        parts.append((first, count))
        first += count
    return parts


def _go(children: Sequence[Child], wave: int, timeout: float) -> tuple[list[dict[str, Any]], float]:
    """Start every child's workloads at the same moment; their samples and the children's CPU seconds."""
    for child in children:
        child.send("go", wave=wave)
    replies = [child.reply(timeout=timeout) for child in children]
    return [s for r in replies for s in r["samples"]], sum(r["cpu_seconds"] for r in replies)


def _wait_unregistered(server: Child, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = server.call("registrations")
        if state["registered_endpoints"] == 0:
            return state
        if time.monotonic() > deadline:
            raise RuntimeError(f"{state['registered_endpoints']} endpoints still registered {timeout:.0f}s after "
                               "the agents stopped")
        time.sleep(0.2)


def _agent_round(
    server: Child, profile: Profile, workdir: Path, name: str, common: dict[str, Any], wave: int, register: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Start every workload through its own NodeAgent; stop them once all are served (and their registrations
    have left meshca). The samples and what meshca and the load generators did meanwhile."""
    children: list[Child] = []
    socket_dir = Path(tempfile.mkdtemp(prefix="ab", dir="/tmp"))  # a Unix socket path has ~107 bytes at most
    try:
        for p, (first, count) in enumerate(_split(profile.agent_workloads, profile.agent_processes)):
            children.append(Child("agentload", {
                "mode": "agent", **common, "first": first, "count": count, "socket_dir": str(socket_dir),
                "workdir": str(workdir / f"{name}-{p}"), "register": register,
            }, workdir / f"{name}-{p}.log"))
        for child in children:
            child.ready(timeout=TIMEOUT)
        before = server.call("registrations")
        samples, cpu = _go(children, wave, TIMEOUT)
        after = server.call("registrations")
        keygen = children[0].call("keygen", n=50)
        for child in children:
            child.call("stop", timeout=TIMEOUT)
        stop_all(children)
        settled = _wait_unregistered(server)
    finally:
        stop_all(children)
        shutil.rmtree(socket_dir, ignore_errors=True)
    return samples, {
        "puts": after.get("puts", []),
        "rebuilds": after["mesh_updates"] - before["mesh_updates"],
        "rebuilds_on_stop": settled["mesh_updates"] - after["mesh_updates"],
        "meshca_cpu_s": round(after["cpu_seconds"] - before["cpu_seconds"], 2),
        "load_generators_cpu_s": round(cpu, 2),
        "key_and_csr_ms": keygen["key_and_csr_ms"],
    }


def measure_pass(profile: Profile, workdir: Path, wave: int) -> dict[str, Any]:
    """One meshca process: the agent path for every workload, the same agents registering no endpoint (the
    certificate alone, no rebuild), then the central-SDS path for the same identities."""
    n = profile.agent_workloads
    layout = Layout(services=n, endpoints=0)
    workdir.mkdir(parents=True, exist_ok=True)
    server = Child("meshca_server", server_args(workdir=str(workdir / "meshca"), layout=layout.to_json(),
                                                instrument_registrations=True), workdir / "meshca.log")
    central: list[Child] = []
    try:
        info = server.ready(timeout=TIMEOUT)
        common = {"port": info["port"], "root": info["root"], "signing_key": info["signing_key"]}
        samples, agent_run = _agent_round(server, profile, workdir, "agentload", common, wave, True)
        cert_only, cert_only_run = _agent_round(server, profile, workdir, "certonly", common, wave, False)
        for p, (first, count) in enumerate(_split(n, profile.agent_processes)):
            central.append(Child("agentload", {"mode": "central", **common, "first": first, "count": count},
                                 workdir / f"centralload-{p}.log"))
        for child in central:
            child.ready(timeout=TIMEOUT)
        central_before = server.call("registrations")
        central_samples, central_cpu = _go(central, wave, TIMEOUT)
        central_after = server.call("registrations")
    finally:
        stop_all([*central, server])

    if len(samples) != n or len(central_samples) != n:
        raise RuntimeError(f"{len(samples)} agent and {len(central_samples)} central samples of {n}")
    cert = [s["cert_at"] - s["t0"] for s in samples]
    endpoint = [s["endpoint_at"] - s["t0"] for s in samples]
    both = [max(c, e) for c, e in zip(cert, endpoint, strict=True)]
    central_cert = [s["cert_at"] - s["t0"] for s in central_samples]
    puts = agent_run["puts"]
    cert_only_cert = [s["cert_at"] - s["t0"] for s in cert_only]
    start = min(s["t0"] for s in samples)
    rebuild_ms = [(end - begin) * 1000 for begin, end in puts]

    def phase(key_from: str, key_to: str) -> dict[str, float]:
        return _spread([s[key_to] - s[key_from] for s in samples])

    return {
        "agent": {
            "value_s": percentile(both, 99),
            "max_of_cert_and_endpoint": _spread(both),
            "cert": _spread(cert),
            "endpoint": _spread(endpoint),
            "endpoint_later_than_cert": sum(e > c for c, e in zip(cert, endpoint, strict=True)),
        },
        "agent_profile": {
            "what": "per workload, from the agent's t0: socket listening; key+CSR made (until the CSR call); the CSR "
                    "call (the agent's TLS connection made + meshca signs); the first Secret at the SDS client after "
                    "the CSR returned; on meshca: each registration's put (which rebuilds the mesh before it returns)",
            "agent_start_to_listening": phase("t0", "listening"),
            "listening_to_csr_call": phase("listening", "csr_called"),
            "csr_call": phase("csr_called", "csr_returned"),
            "csr_returned_to_sds_client": phase("csr_returned", "cert_at"),
            "key_and_csr_alone_ms": round(agent_run["key_and_csr_ms"], 3),
            "registration_puts": len(puts),
            "registration_put_rebuild_ms": {
                "p50": round(percentile(rebuild_ms, 50), 2), "p99": round(percentile(rebuild_ms, 99), 2),
                "total": round(sum(rebuild_ms), 1),
            } if rebuild_ms else None,
            "first_registration_after_start_s": round(min(b for b, _ in puts) - start, 4) if puts else None,
            "last_registration_done_after_start_s": round(max(e for _, e in puts) - start, 4) if puts else None,
            "eds_responses_per_observer_until_seen": {
                "p50": percentile([s["eds_responses"] for s in samples], 50),
                "max": max(s["eds_responses"] for s in samples),
            },
            "mesh_rebuilds": agent_run["rebuilds"],
            "mesh_rebuilds_on_agent_stop": agent_run["rebuilds_on_stop"],
            "meshca_cpu_s": agent_run["meshca_cpu_s"],
            "load_generators_cpu_s": agent_run["load_generators_cpu_s"],
        },
        "agent_without_endpoints": {
            "what": "the same agents, started the same way, registering no endpoint: the certificate path alone, "
                    "with no mesh rebuild on meshca",
            "cert": _spread(cert_only_cert),
            "csr_call": _spread([s["csr_returned"] - s["csr_called"] for s in cert_only]),
            "mesh_rebuilds": cert_only_run["rebuilds"],
            "meshca_cpu_s": cert_only_run["meshca_cpu_s"],
            "load_generators_cpu_s": cert_only_run["load_generators_cpu_s"],
        },
        "central": {
            "value_s": percentile(central_cert, 99),
            "cert": _spread(central_cert),
            "endpoint_s": 0.0,
            "mesh_rebuilds": central_after["mesh_updates"] - central_before["mesh_updates"],
            "meshca_cpu_s": round(central_after["cpu_seconds"] - central_before["cpu_seconds"], 2),
            "load_generators_cpu_s": round(central_cpu, 2),
        },
    }


def run(profile: Profile, workdir: Path) -> list[Row]:
    n = profile.agent_workloads
    parameters: dict[str, Any] = {
        "workloads": n,
        "services": n,
        "mesh": "every service with endpoints [] (registered only)",
        "load_processes": profile.agent_processes,
        "agents": "one meshca.agent NodeAgent per workload, in the load-generator processes (not one process each: "
                  "that would time Python start-ups on 2 shared cores); each its own TLS connection to meshca "
                  "(shared by its CSRs, registration stream and trust stream) and SDS socket",
        "value": "p99 over workloads of max(cert, endpoint): cert = agent start to `default` at an SDS client on its "
                 "Unix socket; endpoint = agent start to its address at an EDS observer subscribed to its service",
        "baseline": "p99 over the same identities of central SDS: own TLS connection + ADS stream opened to "
                    "`default` received; the endpoint is static in the mesh file (0 s)",
        "start": "all workloads at once (the herd)",
    }
    passes: dict[int, dict[str, Any]] = {}
    try:
        for wave in profile.agent_waves:
            passes[wave] = measure_pass(profile, workdir / (f"wave{wave}" if wave else "herd"), wave)
    except Exception as error:
        return [failed_row(NAME, UNIT, TARGET, error, **parameters)]
    herd = passes.get(0) or next(iter(passes.values()))
    rebuilds = herd["agent_profile"]["mesh_rebuilds"]
    parameters.update({
        "agent": herd["agent"],
        "agent_profile": herd["agent_profile"],
        "agent_without_endpoints": herd["agent_without_endpoints"],
        "central": herd["central"],
        "mesh_rebuilds_observed": rebuilds,
        "mesh_rebuilds_expected_with_coalescing": "one per coalescing interval while registrations arrive "
                                                  f"(a few), not one per registration ({n})",
    })
    for wave, result in passes.items():
        if wave:
            parameters[f"waves_of_{wave}"] = {
                "value_s": round(result["agent"]["value_s"], 4),
                "baseline_s": round(result["central"]["value_s"], 4),
                "agent": result["agent"],
                "agent_without_endpoints_cert": result["agent_without_endpoints"]["cert"],
                "central": result["central"]["cert"],
                "mesh_rebuilds": result["agent_profile"]["mesh_rebuilds"],
            }
    value, baseline = herd["agent"]["value_s"], herd["central"]["value_s"]
    return [Row(NAME, value, UNIT, BASELINE, baseline, TARGET, value <= 2 * baseline, parameters)]
