"""Benchmark 6: real Envoys, push → ACK per resource type, measured server-side.

meshca runs as its own process (benchmarks.meshca_server with `instrument`: its ProxyRegistry
instance is wrapped so `record_sent` and `record_ack` are timestamped; meshca's code is unchanged).
N real Envoys (bootstrap from meshca.node.bootstrap: ADS over TLS, `set_node_on_first_message_only`),
each the sidecar of its own service and identity. Once all are synced, each round pushes one change
per type and waits until every stream has ACKed it:

- EDS: one endpoint of svc-0 moves;          - CDS: a new service (cluster) appears, the last one goes;
- RDS: a new route is added;                 - LDS: every service's allowed callers change;
- SDS: every identity's certificate is renewed (`LeafRotator.renew`).

Sample: from `record_sent` (the response's write completed) to `record_ack` (the ACK processed by
the stream's loop). Envoy holds a CDS ACK until it has the new cluster's EDS, as it always does.

The rows `envoy_push_to_ack_*` are Envoys on SotW ADS (`api_type: GRPC`); `envoy_delta_push_to_ack_*`
the same rounds, after those Envoys stopped, with N new Envoys on delta ADS (`DELTA_GRPC`, meshca's
bootstrap default).

Baseline, same run, same kind of pushes: once the Envoys are stopped, N Python ADS client streams
(benchmarks.loadgen, one per identity; they ACK at once and apply nothing) go through the same
rounds — the server + loopback floor. The two phases never overlap, so neither loads the other.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import TRUST_DOMAIN, Child, Profile, Row, failed_row, server_args, stop_all
from benchmarks.meshgen import NAMESPACE, Layout
from benchmarks.streams import require_all_ready, start_loadgens
from meshca.dev.envoy_process import EnvoyProcess, free_port
from meshca.dev.tokens import mint_token
from meshca.node.bootstrap import BootstrapSettings, build_bootstrap

NAME = "envoy_push_to_ack"
TARGET = "median <= 5 ms"
UNIT = "ms (median)"
TYPES = ("CDS", "EDS", "LDS", "RDS", "SDS")
VARIANTS = {"sotw": "GRPC", "delta": "DELTA_GRPC"}  # Envoy's ADS api_type
ROW_PREFIX = {"sotw": NAME, "delta": "envoy_delta_push_to_ack"}


class MeshFile:
    def __init__(self, path: Path, envoys: int) -> None:
        self.path = path
        self.services: dict[str, Any] = {}
        for i in range(envoys):
            self.services[f"svc-{i}"] = {
                "namespace": NAMESPACE,
                "service_account": f"svc-{i}",
                "inbound": {"port": free_port(), "app": f"127.0.0.1:{free_port()}", "listen_address": "127.0.0.1"},
                "outbound": {"port": free_port()},
                "allow": [f"namespace:{NAMESPACE}"],
            }
        self.routes = [{"prefix": f"/svc-{i}/", "to": f"svc-{i}"} for i in range(envoys)]
        self.write()

    def write(self) -> Path:
        data = {"trust_domain": TRUST_DOMAIN, "services": self.services, "routes": self.routes}
        self.path.write_text(json.dumps(data, indent=1))  # JSON is YAML
        return self.path


def _wait_synced(server: Child, streams: int, types: tuple[str, ...], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = server.call("registry")
        if last["streams"] >= streams and all(last["synced"].get(t, 0) >= streams for t in types):
            return
        time.sleep(0.05)
    raise TimeoutError(f"not every stream ACKed {types} within {timeout}s: {last.get('synced')} of {streams}")


def _step(server: Child, mesh: MeshFile | None, streams: int, pushed: str, samples: list[dict[str, Any]]) -> None:
    """Push one change, wait until `streams` samples of the pushed type exist and every stream is synced."""
    before = len(samples)
    if mesh is not None:
        server.call("apply_file", path=str(mesh.write()))
    else:
        server.call("renew_all")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        samples.extend(server.call("samples")["samples"])
        if sum(1 for s in samples[before:] if s["type"] == pushed) >= streams:
            break
        time.sleep(0.05)
    _wait_synced(server, streams, TYPES)
    samples.extend(server.call("samples")["samples"])


def _rounds(server: Child, mesh: MeshFile, streams: int, first: int, count: int) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    server.call("samples")  # drop what came before (initial state includes Envoy's warming)
    for r in range(first, first + count):
        svc0 = mesh.services["svc-0"]
        svc0["endpoints"] = [f"127.0.0.1:{svc0['inbound']['port'] + r}"]
        _step(server, mesh, streams, "EDS", samples)
        mesh.services.pop(f"extra-{r - 1}", None)
        mesh.services[f"extra-{r}"] = {
            "namespace": NAMESPACE,
            "service_account": f"extra-{r}",
            "inbound": {"port": free_port(), "app": "127.0.0.1:9", "listen_address": "127.0.0.1"},
        }
        _step(server, mesh, streams, "CDS", samples)
        mesh.routes.append({"prefix": f"/round-{r}/", "to": "svc-0"})
        _step(server, mesh, streams, "RDS", samples)
        for service in mesh.services.values():
            if "inbound" in service and service["service_account"].startswith("svc-"):
                service["allow"] = ["*"] if r % 2 else [f"namespace:{NAMESPACE}"]
        _step(server, mesh, streams, "LDS", samples)
        _step(server, None, streams, "SDS", samples)
    return samples


def _by_type(samples: list[dict[str, Any]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {t: [] for t in TYPES}
    for sample in samples:
        if sample["type"] in out:
            out[sample["type"]].append((sample["acked_at"] - sample["sent_at"]) * 1000)
    return out


_ENVOY_UPDATE_STATS = {
    "CDS": "cluster_manager.cds.update_duration",
    "LDS": "listener_manager.lds.update_duration",
    "SDS": "sds.default.update_duration",
}


def _envoy_update_p50(envoys: list[EnvoyProcess]) -> dict[str, float | None]:
    """Envoy's own view: the median over Envoys of their P50 `update_duration` (ms) per type."""
    per_type: dict[str, list[float]] = {t: [] for t in _ENVOY_UPDATE_STATS}
    for envoy in envoys:
        try:
            text = envoy.admin_get("/stats?filter=update_duration")
        except Exception:  # an Envoy that cannot answer just gives no figure
            continue
        for line in text.splitlines():
            name, _, histogram = line.partition(": ")
            for t, stat in _ENVOY_UPDATE_STATS.items():
                if name == stat and "P50(" in histogram:
                    interval = histogram.split("P50(", 1)[1].split(")", 1)[0]
                    per_type[t].append(float(interval.split(",")[1]))
    return {t: round(statistics.median(v), 2) if v else None for t, v in per_type.items()}


def _envoy_phase(
    server: Child, info: dict[str, Any], mesh: MeshFile, api_type: str, first_round: int, profile: Profile, workdir: Path
) -> dict[str, Any]:
    """N Envoys speaking `api_type` (GRPC: SotW, DELTA_GRPC: delta) through the rounds, then stopped."""
    count = profile.envoys
    key = Path(info["signing_key"]).read_bytes()
    now = datetime.now(timezone.utc)
    envoys: list[EnvoyProcess] = []
    try:
        for i in range(count):
            token = mint_token(key, namespace=NAMESPACE, service_account=f"svc-{i}", now=now)
            settings = BootstrapSettings(
                node_id=f"envoy-{i}",
                cluster=f"svc-{i}",
                meshca_address="127.0.0.1",
                meshca_port=info["port"],
                meshca_ca_path=Path(info["root"]),
                meshca_server_name="localhost",
                token=token,
                admin_port=free_port(),
                api_type=api_type,
            )
            envoys.append(EnvoyProcess(build_bootstrap(settings), workdir=workdir / f"envoy-{api_type}-{i}").start())
        for envoy in envoys:
            envoy.wait_ready(60)
        _wait_synced(server, count, TYPES, timeout=60)
        nacks_before = server.call("registry")["nacks"]
        samples = _rounds(server, mesh, count, first_round, profile.envoy_rounds)
        nacks = server.call("registry")["nacks"] - nacks_before
        own = _envoy_update_p50(envoys)
    finally:
        for envoy in envoys:
            envoy.stop()
    deadline = time.monotonic() + 30
    while server.call("registry")["streams"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"samples": _by_type(samples), "nacks": nacks, "envoy_own_update_p50_ms": own}


def measure(profile: Profile, workdir: Path) -> dict[str, Any]:
    """Phase 1: N Envoys alone, SotW then delta. Phase 2: the Envoys stopped, N Python clients alone."""
    count = profile.envoys
    rounds = profile.envoy_rounds
    mesh = MeshFile(workdir / "mesh.yaml", count)
    server = Child(
        "meshca_server",
        server_args(workdir=str(workdir / "meshca"), mesh_file=str(mesh.path), instrument=True),
        workdir / "meshca.log",
    )
    gens: list[Child] = []
    try:
        info = server.ready()
        phases = {
            variant: _envoy_phase(server, info, mesh, api_type, 1 + n * rounds, profile, workdir)
            for n, (variant, api_type) in enumerate(VARIANTS.items())
        }
        gens, summary = start_loadgens(
            "xds",
            total=count,
            processes=1,
            port=info["port"],
            root=Path(info["root"]),
            workdir=workdir,
            streams_per_channel=1,
            layout=Layout(services=count),
            signing_key=info["signing_key"],
        )
        require_all_ready(summary, "python clients")
        _wait_synced(server, count, TYPES, timeout=60)
        python_samples = _rounds(server, mesh, count, 1 + len(VARIANTS) * rounds, rounds)
    finally:
        stop_all([*gens, server])
    return {"envoy": phases, "python": _by_type(python_samples)}


def run(profile: Profile, workdir: Path) -> list[Row]:
    parameters: dict[str, Any] = {
        "envoys": profile.envoys,
        "rounds": profile.envoy_rounds,
        "measured": "server-side, ProxyRegistry.record_sent -> record_ack (instance wrapped by the harness)",
        "bootstrap": "meshca.node.bootstrap, ADS over TLS, set_node_on_first_message_only",
    }
    names = [(variant, t, f"{prefix}_{t.lower()}") for variant, prefix in ROW_PREFIX.items() for t in TYPES]
    try:
        result = measure(profile, workdir)
    except Exception as error:
        return [failed_row(name, UNIT, TARGET, error, **parameters) for _, _, name in names]
    rows = []
    for variant, t, name in names:
        phase = result["envoy"][variant]
        envoy = phase["samples"][t]
        python = result["python"][t]
        row_parameters = {**parameters, "api_type": VARIANTS[variant]}
        if not envoy:
            problem = f"no {t} push was ACKed by an Envoy ({variant})"
            rows.append(failed_row(name, UNIT, TARGET, problem, **row_parameters))
            continue
        median = statistics.median(envoy)
        rows.append(
            Row(
                name,
                median,
                UNIT,
                "Python ADS clients (SotW, ACK at once), same rounds",
                statistics.median(python) if python else None,
                TARGET,
                median <= 5.0 and phase["nacks"] == 0,
                {
                    **row_parameters,
                    "samples": len(envoy),
                    "p90_ms": round(sorted(envoy)[int(0.9 * (len(envoy) - 1))], 2),
                    "max_ms": round(max(envoy), 2),
                    "nacks": phase["nacks"],
                    "envoy_own_update_duration_p50_ms": phase["envoy_own_update_p50_ms"].get(t),
                },
            )
        )
    return rows
