"""Benchmark 3: snapshot build from config, 1,000 services (cluster, 10-endpoint CLA, route, listener).

Timed: `build_mesh(MeshConfig)` + `MeshPublisher.set_mesh(...)` with one connected identity per
service (their certificates already issued), i.e. everything between "a new config was parsed" and
"every identity's snapshot is published". Full build: the first build of a fresh process (nothing
cached anywhere); one-service change: the same mesh with one endpoint of one service moved (one CLA
differs), applied after the full build, several times with a different service each time.

Each repetition runs in a fresh child process so no cache survives between full builds.

Baseline, same process: the same resources (every shared and per-identity resource of the mesh,
decoded back into envoy-data-plane messages) encoded with envoy-data-plane's `bytes()` alone, no
snapshot engine; for the change, encoding just the changed ClusterLoadAssignment.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Child, Profile, Row, child_args, emit, failed_row, percentile

NAME_FULL = "snapshot_build_full"
NAME_CHANGE = "snapshot_build_one_service_change"
TARGET_FULL = "<= 1 s"
TARGET_CHANGE = "<= 20 ms"


def measure(services: int, endpoints: int, change_budget: float, max_changes: int) -> dict[str, Any]:
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster
    from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
    from envoy_data_plane.envoy.config.listener.v3 import Listener
    from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration

    from benchmarks.common import TRUST_DOMAIN
    from benchmarks.meshgen import Layout, mesh_config, with_endpoint_change
    from meshca.ca.api import CaSettings
    from meshca.ca.internal import CertificateAuthority
    from meshca.clock import system_clock
    from meshca.mesh.build import ResourceMemo, build_mesh
    from meshca.sds.workloads import MeshPublisher, WorkloadSecrets
    from meshca.xds.cache import SnapshotCache
    from meshca.xds.snapshot import ResourceType

    log = logging.getLogger("bench")
    log.setLevel(logging.WARNING)
    layout = Layout(services=services, endpoints=endpoints)
    config = mesh_config(layout)
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        ca = CertificateAuthority.init(Path(tmp) / "ca", CaSettings(trust_domain=TRUST_DOMAIN), system_clock)
        secrets = WorkloadSecrets(ca, system_clock, log)
        publisher = MeshPublisher(SnapshotCache(), secrets, log)
        for service in config.services:
            publisher.ensure_identity(service.spiffe_id)

        memo = ResourceMemo()  # as MeshcaApp.apply_mesh_config does: unchanged specs are not re-encoded
        started = time.perf_counter()
        mesh = build_mesh(config, memo)
        built = time.perf_counter()
        publisher.set_mesh(mesh)
        full = time.perf_counter() - started
        full_build_only = built - started

        changes: list[float] = []
        changes_build_only: list[float] = []
        budget_end = time.perf_counter() + change_budget
        generation = 0
        while len(changes) < max_changes and (not changes or time.perf_counter() < budget_end):
            generation += 1
            target = f"svc-{(generation * 397) % services}"
            config = with_endpoint_change(config, target, generation)
            started = time.perf_counter()
            changed_mesh = build_mesh(config, memo)
            built = time.perf_counter()
            publisher.set_mesh(changed_mesh)
            changes.append(time.perf_counter() - started)
            changes_build_only.append(built - started)
        last_changed = next(
            r for r in changed_mesh.shared if r.type is ResourceType.ENDPOINT and r.name.endswith(f"|{target}")
        )

        # Baseline: the same resources, envoy-data-plane messages, bytes() only.
        classes = {
            ResourceType.CLUSTER: Cluster,
            ResourceType.ENDPOINT: ClusterLoadAssignment,
            ResourceType.LISTENER: Listener,
            ResourceType.ROUTE: RouteConfiguration,
        }
        resources = [*mesh.shared, *(r for own in mesh.per_identity.values() for r in own)]
        messages = [classes[r.type].parse(r.payload) for r in resources if r.type in classes]
        started = time.perf_counter()
        for message in messages:
            bytes(message)
        baseline_full = time.perf_counter() - started
        cla = ClusterLoadAssignment.parse(last_changed.payload)
        reps = []
        for _ in range(20):
            started = time.perf_counter()
            bytes(cla)
            reps.append(time.perf_counter() - started)
        baseline_change = sorted(reps)[len(reps) // 2]
    return {
        "full_s": full,
        "full_build_mesh_s": full_build_only,
        "changes_s": changes,
        "changes_build_mesh_s": changes_build_only,
        "baseline_full_s": baseline_full,
        "baseline_change_s": baseline_change,
        "resources": len(messages),
        "identities": len(config.services),
    }


def run(profile: Profile, workdir: Path) -> list[Row]:
    services, endpoints = profile.build_services, profile.build_endpoints
    parameters: dict[str, Any] = {
        "services": services,
        "endpoints_per_service": endpoints,
        "connected_identities": services,
        "timed": "build_mesh + MeshPublisher.set_mesh",
    }
    results = []
    budget_end = time.monotonic() + profile.build_budget_seconds
    try:
        while len(results) < profile.build_max_reps and (not results or time.monotonic() < budget_end):
            child = Child(
                "snapshot_build",
                {"services": services, "endpoints": endpoints, "change_budget": 10.0, "max_changes": 5},
                workdir / f"build-{len(results)}.log",
            )
            try:
                results.append(child.ready(timeout=1800))
            finally:
                child.stop()
    except Exception as error:
        return [
            failed_row(NAME_FULL, "s", TARGET_FULL, error, **parameters),
            failed_row(NAME_CHANGE, "ms", TARGET_CHANGE, error, **parameters),
        ]
    full = sorted(r["full_s"] for r in results)[len(results) // 2]
    baseline_full = sorted(r["baseline_full_s"] for r in results)[len(results) // 2]
    changes = [c for r in results for c in r["changes_s"]]
    change_median = percentile(changes, 50)
    baseline_change = sorted(r["baseline_change_s"] for r in results)[len(results) // 2]
    full_parameters = {
        **parameters,
        "repetitions": len(results),
        "all_s": [round(r["full_s"], 3) for r in results],
        "build_mesh_part_s": round(sorted(r["full_build_mesh_s"] for r in results)[len(results) // 2], 3),
        "resources_encoded": results[0]["resources"],
        "statistic": "median over fresh processes",
    }
    change_parameters = {
        **parameters,
        "changes": len(changes),
        "all_ms": [round(c * 1000, 1) for c in changes],
        "build_mesh_part_ms": round(percentile([c for r in results for c in r["changes_build_mesh_s"]], 50) * 1000, 1),
        "p90_ms": round(percentile(changes, 90) * 1000, 1),
        "change": "one endpoint of one service moved (one CLA differs)",
        "statistic": "median",
    }
    return [
        Row(
            NAME_FULL, full, "s", "envoy-data-plane bytes() of the same resources", baseline_full, TARGET_FULL,
            full <= 1.0, full_parameters,
        ),
        Row(
            NAME_CHANGE, change_median * 1000, "ms", "envoy-data-plane bytes() of the changed CLA",
            baseline_change * 1000, TARGET_CHANGE, change_median <= 0.020, change_parameters,
        ),
    ]


if __name__ == "__main__":
    args = child_args()
    from meshca.gcpolicy import tune_gc_for_serving

    tune_gc_for_serving()  # the process that builds and publishes is `meshca serve`, which does this
    emit(measure(args["services"], args["endpoints"], args["change_budget"], args["max_changes"]))
