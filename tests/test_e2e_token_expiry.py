"""End to end with real Envoys reading rotating token files: a stream ends when its token expires; a proxy
whose token file was refreshed reconnects without a failed request, one whose file went stale gets nothing more."""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import datetime, timedelta, timezone
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from meshca_harness import TRUST_DOMAIN, RunningMeshca, running_meshca

from meshca.dev.envoy_process import EnvoyProcess, wait_until
from meshca.dev.harness import (
    BACKEND,
    FRONTEND,
    INTRUDER,
    Ports,
    RequestResult,
    TrafficLoop,
    Workload,
    backend_app,
    envoy_certificate,
    http_get,
    json_handler,
    mesh_config,
)
from meshca.dev.tokens import mint_token
from meshca.files import write_atomic
from meshca.identity.spiffe import SpiffeId
from meshca.mesh.model import parse_mesh_config
from meshca.node.bootstrap import BootstrapSettings, build_bootstrap

pytestmark = pytest.mark.e2e

TOKEN_TTL = timedelta(seconds=10)
LEEWAY = timedelta(seconds=1)


def spiffe_id(workload: Workload) -> SpiffeId:
    return SpiffeId.for_service_account(TRUST_DOMAIN, workload.namespace, workload.service_account)


def write_token(meshca: RunningMeshca, workload: Workload, path: Path) -> None:
    token = mint_token(
        meshca.signing_key_pem,
        namespace=workload.namespace,
        service_account=workload.service_account,
        node_id=workload.node_id,
        now=datetime.now(timezone.utc),
        ttl=TOKEN_TTL,
    )
    write_atomic(path, token.encode(), 0o600)


def sidecar(meshca: RunningMeshca, workload: Workload, tmp_path: Path, token_path: Path) -> EnvoyProcess:
    settings = BootstrapSettings(
        node_id=workload.node_id,
        cluster=workload.name,
        meshca_address="127.0.0.1",
        meshca_port=meshca.port,
        meshca_ca_path=tmp_path / "meshca-root.pem",
        meshca_server_name="localhost",
        token_path=token_path,
    )
    return EnvoyProcess(build_bootstrap(settings), workdir=tmp_path / f"envoy-{workload.name}")


def mesh(ports: Ports, tmp_path: Path) -> Any:
    config = mesh_config(ports)
    config["trust_domain"] = TRUST_DOMAIN
    config["services"]["backend"]["allow"] = [spiffe_id(FRONTEND).uri]
    return parse_mesh_config(tmp_path / "mesh.yaml", config)


def through_frontend(port: int) -> RequestResult:
    status, body = http_get(f"http://127.0.0.1:{port}/hello")
    peer = body.get("peer") if isinstance(body, dict) else None
    return RequestResult(status == 200 and peer == spiffe_id(FRONTEND).uri, status, peer, "backend")


def serial(envoy: EnvoyProcess) -> str | None:
    view = envoy_certificate(envoy)
    return view.serial if view else None


def stream_of(meshca: RunningMeshca, node_id: str) -> int | None:
    return next((p.stream_id for p in meshca.app.registry.snapshot() if p.node_id == node_id), None)


async def keep_refreshing(meshca: RunningMeshca, workload: Workload, path: Path) -> None:
    """As the kubelet does for a projected token: a fresh one well before the old one expires."""
    while True:
        await asyncio.sleep(TOKEN_TTL.total_seconds() / 3)
        write_token(meshca, workload, path)


async def test_refreshed_token_reconnects_without_failures_and_stale_token_gets_no_new_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshca")
    ports = Ports()
    tokens = {w.name: tmp_path / f"{w.name}.token" for w in (BACKEND, FRONTEND, INTRUDER)}
    # the demo's backend app, on a port of ours
    app_server = ThreadingHTTPServer(("127.0.0.1", ports.backend_app), json_handler(backend_app("backend")))
    threading.Thread(target=app_server.serve_forever, daemon=True).start()
    async with running_meshca(tmp_path, leeway=LEEWAY) as meshca:
        (tmp_path / "meshca-root.pem").write_bytes(meshca.root_pem)
        meshca.app.apply_mesh_config(mesh(ports, tmp_path))
        for workload in (BACKEND, FRONTEND, INTRUDER):
            write_token(meshca, workload, tokens[workload.name])
        refreshers = [
            asyncio.create_task(keep_refreshing(meshca, w, tokens[w.name])) for w in (BACKEND, FRONTEND)
        ]  # the intruder's token file is never refreshed
        envoys = {w.name: sidecar(meshca, w, tmp_path, tokens[w.name]) for w in (BACKEND, FRONTEND, INTRUDER)}
        try:
            for envoy in envoys.values():
                envoy.start()
            for envoy in envoys.values():
                await asyncio.to_thread(envoy.wait_ready, 20, False)
            await asyncio.to_thread(
                wait_until, lambda: through_frontend(ports.frontend_outbound).ok, 20, 0.1, "request through the mesh"
            )
            intruder_serial = await asyncio.to_thread(wait_until, lambda: serial(envoys["intruder"]), 10, 0.1)
            first_frontend_stream = stream_of(meshca, FRONTEND.node_id)
            assert first_frontend_stream is not None

            with TrafficLoop(lambda: through_frontend(ports.frontend_outbound)) as traffic:
                # Both first streams end when their tokens expire; the frontend's Envoy reconnects
                # with the refreshed file, the intruder's with its stale one, which is refused.
                def reconnected() -> bool:
                    again = stream_of(meshca, FRONTEND.node_id)
                    return again is not None and again != first_frontend_stream

                await asyncio.to_thread(wait_until, reconnected, 25, 0.1, "frontend reconnected with a fresh token")
                await asyncio.to_thread(
                    wait_until, lambda: stream_of(meshca, INTRUDER.node_id) is None, 10, 0.1, "intruder stream closed"
                )
                frontend_serial = serial(envoys["frontend"])
                meshca.app.rotator.renew(spiffe_id(FRONTEND))
                meshca.app.rotator.renew(spiffe_id(INTRUDER))
                await asyncio.to_thread(
                    wait_until, lambda: serial(envoys["frontend"]) != frontend_serial, 10, 0.1, "frontend renewed"
                )
                await asyncio.sleep(2)  # time enough for the intruder too, had it a stream
            assert traffic.failures == [] and traffic.ok > 20
            assert serial(envoys["intruder"]) == intruder_serial
            assert stream_of(meshca, INTRUDER.node_id) is None
            # The frontend's later streams end at their tokens' expiry too (10 s tokens): under load it may
            # be between two streams right now, so wait for it to be connected rather than sample once.
            await asyncio.to_thread(
                wait_until,
                lambda: envoys["frontend"].stats()["control_plane.connected_state"] == 1,
                10,
                0.1,
                "frontend connected to meshca",
            )
            assert envoys["intruder"].stats()["control_plane.connected_state"] == 0
        finally:
            for task in refreshers:
                task.cancel()
            for envoy in envoys.values():
                envoy.stop()
            app_server.shutdown()
    lines = [r.getMessage() for r in caplog.records]
    expired = [line for line in lines if "xds stream closed" in line and "UNAUTHENTICATED: token expired at" in line]
    assert len(expired) >= 2  # the frontend's first stream and the intruder's
    assert any("xds stream refused" in line and "expired" in line for line in lines)  # the stale token again
