"""Benchmark 2: certificates signed through the gRPC CSR service vs OpenBao `pki/sign/<role>`, same N.

meshca runs as its own process (benchmarks.meshca_server: TLS, dev JWT issuer, INFO logs). The load
generator is another process: N concurrent clients, each with its own TLS connection and token,
calling meshca.v1.CertificateService/Sign with CSRs (ECDSA P-256) generated before the clock
starts, so key generation is not measured. Every call is authenticated and the CSR checked.

Baseline, same run, same N: a real `bao server -dev` (OpenBao) set up by meshca.ca.vault.setup
(`setup_pki`, vault-leaf role: URI SANs in the trust domain, basicConstraints CA:FALSE, no_store) and a load-generator
process with N threads, each with its own hvac client, calling `pki/sign/meshca` with the same kind
of CSRs, `uri_sans` set as meshca's vault-leaf backend sets it. meshca and OpenBao are measured in
alternating rounds.

Also reported (parameters `grpc_floor_*`), in the same rounds: the same N clients making the same
calls (TLS, one connection each, the same request, response and authorization header sizes) to a
bare grpc.aio server whose handler returns a fixed answer: what the transport alone allows here,
i.e. how far the target is within reach of any handler on this machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import TRUST_DOMAIN, Child, Profile, Row, cpu_seconds, failed_row, server_args, stop_all
from benchmarks.streams import tls_material
from meshca.ca.vault.setup import setup_pki
from meshca.dev.envoy_process import free_port
from meshca.dev.openbao_process import OpenBaoProcess

NAME = "csr_service_throughput"
TARGET = ">= 5x OpenBao pki/sign"
WORKERS = 2
WORKERS_NAME = "csr_service_throughput_workers2"
WORKERS_TARGET = ">= 3x OpenBao pki/sign"
UNIT = "certs/s"


def _drive(
    profile: Profile, workdir: Path, round_no: int, mode: str, server_pid: int | list[int], args: dict[str, Any]
) -> dict[str, Any]:
    """One load-generator run of `mode` (N clients, warm-up, timed seconds) with the server's CPU seconds
    (summed over its processes when there are several)."""
    pids = server_pid if isinstance(server_pid, list) else [server_pid]
    gen = Child(
        "loadgen",
        {
            "mode": mode,
            **args,
            "concurrency": profile.csr_concurrency,
            "seconds": profile.csr_seconds,
            "warmup": profile.csr_warmup,
        },
        workdir / f"loadgen-{mode}-{round_no}.log",
    )
    try:
        gen.ready()
        cpu_before = [cpu_seconds(pid) for pid in pids]
        result = gen.call("run", timeout=profile.csr_seconds + profile.csr_warmup + 300)
        by_process = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before)]
        result["server_cpu_seconds"] = sum(by_process)
        result["server_cpu_seconds_by_process"] = [round(c, 2) for c in by_process]
        return result
    finally:
        stop_all([gen])


def _meshca_round(profile: Profile, workdir: Path, round_no: int) -> dict[str, Any]:
    server = Child(
        "meshca_server", server_args(workdir=str(workdir / f"meshca-{round_no}")), workdir / f"meshca-{round_no}.log"
    )
    try:
        info = server.ready()
        args = {"port": info["port"], "root": info["root"], "signing_key": info["signing_key"]}
        return _drive(profile, workdir, round_no, "csr", server.pid, args)
    finally:
        stop_all([server])


def _workers_round(profile: Profile, workdir: Path, round_no: int, workers: int = WORKERS) -> dict[str, Any]:
    """meshca as `workers` processes sharing one port (SO_REUSEPORT, as `meshca serve --workers`), the same CA and
    JWT issuer; the same load generator, whose TLS connections the kernel spreads over them."""
    port = free_port()
    first = workdir / f"meshca-w{round_no}-0"

    def start(i: int) -> Child:  # a Child runs at once: the others only once the first has made the CA
        return Child(
            "meshca_server",
            server_args(workdir=str(workdir / f"meshca-w{round_no}-{i}"), port=port, share_port=True,
                        **({"state_from": str(first)} if i else {})),
            workdir / f"meshca-w{round_no}-{i}.log",
        )

    servers = [start(0)]
    try:
        info = servers[0].ready()
        for i in range(1, workers):
            servers.append(start(i))
            servers[-1].ready()
        args = {"port": port, "root": info["root"], "signing_key": info["signing_key"]}
        result = _drive(profile, workdir, round_no, "csr", [s.pid for s in servers], args)
        return result
    finally:
        stop_all(servers)


def _floor_round(profile: Profile, workdir: Path, round_no: int, sizes: dict[str, int]) -> dict[str, Any]:
    """The same calls against a bare grpc.aio server whose handler does nothing (same TLS, N, sizes)."""
    tls = tls_material(workdir / f"floor-tls-{round_no}")
    server = Child(
        "rawserver",
        {"cert": str(tls.cert), "key": str(tls.key), "unary_response_bytes": sizes["response_bytes"]},
        workdir / f"rawserver-{round_no}.log",
    )
    try:
        info = server.ready()
        args = {"port": info["port"], "root": str(tls.root), "message_sizes": sizes}
        return _drive(profile, workdir, round_no, "unary", server.pid, args)
    finally:
        stop_all([server])


def _bao_round(profile: Profile, workdir: Path, round_no: int) -> dict[str, Any]:
    with OpenBaoProcess(workdir=workdir / f"openbao-{round_no}") as bao:
        setup_pki(bao.root_client(), trust_domain=TRUST_DOMAIN, mode="vault-leaf")
        assert bao.pid is not None
        args = {"address": bao.address, "token": bao.root_token, "mount": "pki", "role": "meshca"}
        return _drive(profile, workdir, round_no, "bao", bao.pid, args)


def run(profile: Profile, workdir: Path) -> list[Row]:
    rounds = 2
    parameters: dict[str, Any] = {
        "concurrency": profile.csr_concurrency,
        "seconds_per_round": profile.csr_seconds,
        "rounds": rounds,
        "key": "ECDSA P-256, CSRs pre-generated",
        "meshca_clients": "asyncio tasks in one process, one TLS connection each",
        "openbao_clients": "threads in one process, one hvac client each, root token",
    }
    meshca: list[dict[str, Any]] = []
    bao: list[dict[str, Any]] = []
    floor: list[dict[str, Any]] = []
    workers: list[dict[str, Any]] = []
    try:
        for round_no in range(rounds):
            meshca.append(_meshca_round(profile, workdir, round_no))
            bao.append(_bao_round(profile, workdir, round_no))
            floor.append(_floor_round(profile, workdir, round_no, meshca[0]["message_sizes"]))
            workers.append(_workers_round(profile, workdir, round_no))
    except Exception as error:
        return [failed_row(NAME, UNIT, TARGET, error, **parameters)]

    def total(results: list[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in results)

    rate = total(meshca, "completed") / total(meshca, "seconds")
    bao_rate = total(bao, "completed") / total(bao, "seconds")
    floor_rate = total(floor, "completed") / total(floor, "seconds")
    parameters.update(
        {
            "meshca_rounds": [round(r["rate"]) for r in meshca],
            "openbao_rounds": [round(r["rate"]) for r in bao],
            "meshca_latency_p50_ms": meshca[-1]["latency_p50_ms"],
            "meshca_latency_p99_ms": meshca[-1]["latency_p99_ms"],
            "openbao_latency_p50_ms": bao[-1]["latency_p50_ms"],
            "openbao_latency_p99_ms": bao[-1]["latency_p99_ms"],
            "meshca_server_cpu_per_cert_us": round(
                total(meshca, "server_cpu_seconds") / max(1, total(meshca, "completed_total")) * 1e6
            ),
            "openbao_server_cpu_per_cert_us": round(
                total(bao, "server_cpu_seconds") / max(1, total(bao, "completed_total")) * 1e6
            ),
            "grpc_floor_calls_per_s": round(floor_rate),
            "grpc_floor_rounds": [round(r["rate"]) for r in floor],
            "grpc_floor_to_openbao_ratio": round(floor_rate / bao_rate, 2),
            "grpc_floor_server_cpu_per_call_us": round(
                total(floor, "server_cpu_seconds") / max(1, total(floor, "completed_total")) * 1e6
            ),
            "grpc_floor_message_sizes": meshca[0]["message_sizes"],
            "meshca_errors": meshca[-1]["errors"],
            "openbao_errors": bao[-1]["errors"],
        }
    )
    errors = any(r["errors"] for r in meshca)
    workers_rate = total(workers, "completed") / total(workers, "seconds")
    workers_parameters = {
        **{k: v for k, v in parameters.items() if k.startswith(("concurrency", "seconds", "rounds", "key", "openbao"))},
        "workers": WORKERS,
        "how": "benchmarks.meshca_server x2 on one port with SO_REUSEPORT (as `meshca serve --workers 2`), same CA",
        "rounds_certs_per_s": [round(r["rate"]) for r in workers],
        "one_process_certs_per_s": round(rate),
        "speedup_over_one_process": round(workers_rate / rate, 2),
        "server_cpu_seconds_by_worker": [r["server_cpu_seconds_by_process"] for r in workers],
        "server_cpu_per_cert_us": round(
            total(workers, "server_cpu_seconds") / max(1, total(workers, "completed_total")) * 1e6
        ),
        "grpc_floor_calls_per_s_one_process": round(floor_rate),
        "errors": workers[-1]["errors"],
    }
    return [
        Row(
            NAME,
            rate,
            UNIT,
            "OpenBao pki/sign via hvac, same concurrency",
            bao_rate,
            TARGET,
            (rate >= 5 * bao_rate) and not errors,
            parameters,
        ),
        Row(
            WORKERS_NAME,
            workers_rate,
            UNIT,
            "OpenBao pki/sign via hvac, same concurrency",
            bao_rate,
            WORKERS_TARGET,
            (workers_rate >= 3 * bao_rate) and not any(r["errors"] for r in workers),
            workers_parameters,
        ),
    ]
