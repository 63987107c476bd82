"""End to end with real Envoys, meshca and `meshca agent` as a process, both sidecars in agent mode (every certificate
signed by meshca's CSR service): `meshca revoke --spiffe-id` puts the caller's agent-signed serial on the callee's CRL
and its handshake is refused; `meshca revoke --serial` of a sidecar's current certificate makes the agent renew it at
once, under traffic, with 0 failed requests. Times printed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from meshca_harness import TRUST_DOMAIN, RunningMeshca, running_meshca
from test_e2e_agent_lifecycle import leaf_key_sha256
from test_e2e_agent_mode import sidecar, spiffe_id
from test_e2e_agent_trust import direct_request
from xds_client import XdsClient

from meshca.app import crl_publishing
from meshca.ca import crypto
from meshca.ca.revocation import StateDirRevocations
from meshca.dev.demo import meshca_cli
from meshca.dev.envoy_process import EnvoyProcess, wait_until
from meshca.dev.harness import (
    BACKEND,
    FRONTEND,
    Ports,
    RequestResult,
    TrafficLoop,
    backend_app,
    crl_serials,
    envoy_chain,
    http_get,
    mesh_config,
    serve_app,
)
from meshca.mesh.model import parse_mesh_config
from meshca.xds.server import PER_TYPE_METHODS
from meshca.xds.snapshot import ResourceType

pytestmark = pytest.mark.e2e


@dataclass
class Mesh:
    meshca: RunningMeshca
    ports: Ports
    state_dir: Path
    caller: EnvoyProcess
    callee: EnvoyProcess
    sockets: dict[str, Path]
    agent_log: Path
    url: str

    def one_request(self) -> RequestResult:
        status, body = http_get(self.url)
        peer = body.get("peer") if isinstance(body, dict) else None
        return RequestResult(status == 200 and peer == spiffe_id(FRONTEND), status, peer, None)


async def until(check: Any, what: str, timeout: float = 30, every: float = 0.02) -> float:
    started = time.monotonic()
    await asyncio.to_thread(wait_until, check, timeout, every, what)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def agent_mode_mesh(tmp_path: Path, socket_dir: Path) -> AsyncIterator[Mesh]:
    """meshca (state dir, CRLs), one `meshca agent` process for both workloads, two agent-mode Envoys."""
    ports = Ports()
    data = mesh_config(ports)
    data["trust_domain"] = TRUST_DOMAIN
    data["services"]["backend"]["allow"] = [spiffe_id(FRONTEND)]
    config = parse_mesh_config(Path("mesh.yaml"), yaml.safe_load(yaml.safe_dump(data)))
    app = serve_app(ports.backend_app, backend_app("backend"))
    state_dir = tmp_path / "meshca" / "ca"
    sockets = {"frontend": socket_dir / "frontend.sock", "backend": socket_dir / "backend.sock"}
    agent: subprocess.Popen[bytes] | None = None
    log = tmp_path / "agent.log"
    try:
        async with running_meshca(tmp_path / "meshca", revocations=crl_publishing(StateDirRevocations(state_dir))) as meshca:
            meshca.app.apply_mesh_config(config)
            (tmp_path / "root.pem").write_bytes(meshca.root_pem)
            workloads = []
            for workload in (FRONTEND, BACKEND):
                name = workload.name
                (tmp_path / f"{name}.jwt").write_text(meshca.token(workload.namespace, workload.service_account))
                workloads.append({"name": name, "token_file": str(tmp_path / f"{name}.jwt"), "socket": str(sockets[name])})
            (tmp_path / "agent.yaml").write_text(yaml.safe_dump({
                "meshca": [f"127.0.0.1:{meshca.port}"], "server_name": "localhost", "ca": str(tmp_path / "root.pem"),
                "workloads": workloads,
            }))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
            with log.open("wb") as output:
                agent = subprocess.Popen(
                    [sys.executable, "-m", "meshca.cli.main", "agent", "--config", str(tmp_path / "agent.yaml")],
                    stdout=output, stderr=subprocess.STDOUT, env=env,
                )
            callee = sidecar(meshca, BACKEND, tmp_path / "backend", "DELTA_GRPC", sockets["backend"],
                             ports.admin["backend"])
            caller = sidecar(meshca, FRONTEND, tmp_path / "frontend", "DELTA_GRPC", sockets["frontend"],
                             ports.admin["frontend"])
            with callee, caller:
                await asyncio.to_thread(callee.wait_ready, 30)
                await asyncio.to_thread(caller.wait_ready, 30)
                mesh = Mesh(meshca, ports, state_dir, caller, callee, sockets, log,
                            f"http://127.0.0.1:{ports.frontend_outbound}/hello")
                await until(lambda: mesh.one_request().ok, "frontend -> backend, both in agent mode, over mTLS")
                yield mesh
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()
        if agent is not None:
            agent.wait(10)
        app.shutdown()
        app.server_close()
    text = log.read_text()
    assert "PRIVATE KEY" not in text and "eyJ" not in text


async def agent_default(socket_path: Path, directory: Path) -> tuple[Path, Path, int]:
    """The `default` secret the agent serves on a workload's socket, fetched as its Envoy does (SDS over the Unix
    socket): its chain and key written to files for a client of this test; the leaf's serial."""
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        client = XdsClient(channel, None, PER_TYPE_METHODS[ResourceType.SECRET])
        try:
            await client.send(ResourceType.SECRET.value, ["default"], node_id="test-client")
            response = await client.recv(10)
        finally:
            client.close()
    (secret,) = [Secret().parse(any_.value) for any_ in response.resources]
    chain = secret.tls_certificate.certificate_chain.inline_bytes
    (directory / "agent-leaf.pem").write_bytes(chain)
    (directory / "agent-leaf-key.pem").write_bytes(secret.tls_certificate.private_key.inline_bytes)
    return directory / "agent-leaf.pem", directory / "agent-leaf-key.pem", crypto.parse_certificate_pem(chain).serial_number


def leaf_serial(envoy: EnvoyProcess) -> int:
    chain = envoy_chain(envoy)
    return chain[0].serial_number if chain else 0


def logged_key(log: Path, serial: int) -> str:
    """The key fingerprint (16 hex) the agent logged when it served `serial`."""
    found = re.findall(rf"serving certificate serial {serial:x} .*key sha256 ([0-9a-f]{{16}})", log.read_text())
    assert len(found) == 1, f"serial {serial:x} served {len(found)} times"
    return found[0]


def envoy_key(envoy: EnvoyProcess) -> str:
    key = leaf_key_sha256(envoy)
    assert key is not None
    return key[:16]


async def test_a_revoked_identity_s_agent_signed_certificate_is_on_the_crl_and_refused_at_the_handshake(
    tmp_path: Path, socket_dir: Path
) -> None:
    async with agent_mode_mesh(tmp_path, socket_dir) as mesh:
        cert, key, serial = await agent_default(mesh.sockets["frontend"], tmp_path)
        assert serial == leaf_serial(mesh.caller)  # what frontend's Envoy presents
        bundle = mesh.meshca.app.ca.trust_bundle_pem()
        assert await asyncio.to_thread(direct_request, mesh.ports.backend_inbound, cert, key, bundle) == "ok"
        with TrafficLoop(mesh.one_request) as traffic:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(meshca_cli, "revoke", "--spiffe-id", spiffe_id(FRONTEND), "--reason",
                                    "keyCompromise", "--state-dir", str(mesh.state_dir))
            revoked_at = time.monotonic()
            await until(lambda: serial in crl_serials(mesh.callee), "the caller's agent-signed serial on the callee's CRL")
            crl_seconds = time.monotonic() - revoked_at
            await until(lambda: direct_request(mesh.ports.backend_inbound, cert, key, bundle).startswith("failed"),
                        "the caller's current certificate refused at the handshake")
            refused_seconds = time.monotonic() - revoked_at
            await until(lambda: mesh.one_request().status == 403, "the caller's next request refused (RBAC)")
            await asyncio.sleep(3)  # the agent's renewal for the listed serial is refused: it must back off
        ok_before = traffic.ok
        text = mesh.agent_log.read_text()
        refused = text.count("workload frontend: CSR failed")
        assert 1 <= refused <= 4, text  # one at once for the listed serial, then the backoff (1 s, 2 s, ...)
        assert serial in crl_serials(mesh.caller)  # every agent-mode Envoy's CRL
        assert ok_before > 5
    print(f"\nagent-mode caller's identity revoked: its agent-signed serial on the callee Envoy's CRL "
          f"{crl_seconds:.2f} s and its certificate refused at the handshake {refused_seconds:.2f} s after "
          f"`meshca revoke --spiffe-id` exited; {refused} refused CSR(s) by the agent in the following ~3 s")
    assert crl_seconds < 5


async def test_a_sidecar_s_certificate_revoked_by_serial_is_renewed_by_the_agent_under_traffic(
    tmp_path: Path, socket_dir: Path
) -> None:
    async with agent_mode_mesh(tmp_path, socket_dir) as mesh:
        timings = []
        upstream = "cluster.outbound|backend.upstream_cx_total"
        with TrafficLoop(mesh.one_request) as traffic:
            await asyncio.sleep(0.3)
            for name, envoy, peer in (("backend", mesh.callee, mesh.caller), ("frontend", mesh.caller, mesh.callee)):
                serial = leaf_serial(envoy)
                await asyncio.to_thread(meshca_cli, "revoke", "--serial", f"{serial:x}", "--force", "--reason",
                                        "keyCompromise", "--state-dir", str(mesh.state_dir))
                revoked_at = time.monotonic()
                await until(lambda: serial in crl_serials(peer), f"{name}'s serial on its peer's CRL")  # noqa: B023
                on_crl = time.monotonic() - revoked_at
                await until(lambda: leaf_serial(envoy) not in (serial, 0), f"{name}'s Envoy with a new certificate")  # noqa: B023
                renewed = time.monotonic() - revoked_at
                new_serial = leaf_serial(envoy)
                assert envoy_key(envoy) == logged_key(mesh.agent_log, new_serial)  # the agent's new key, in Envoy
                assert logged_key(mesh.agent_log, new_serial) != logged_key(mesh.agent_log, serial)
                timings.append((name, on_crl, renewed))
            await asyncio.sleep(0.5)
            # new connections, each a handshake under the new certificates and the CRLs listing the old ones
            connections = int(mesh.caller.stats()[upstream])
            with ThreadPoolExecutor(8) as pool:
                burst = list(pool.map(lambda _: mesh.one_request(), range(16)))
            assert all(r.ok for r in burst), [r for r in burst if not r.ok][:3]
            opened = int(mesh.caller.stats()[upstream]) - connections
        assert traffic.failures == [] and traffic.ok > 20, (traffic.failures[:3], traffic.ok)
        text = mesh.agent_log.read_text()
        assert text.count("is on meshca's CRL") == 2, text
        assert "CSR failed" not in text
    print("\nagent-mode sidecar's certificate revoked by serial under traffic: " + "; ".join(
        f"{name}: on the peer's CRL {crl:.2f} s, its Envoy on a new certificate (agent's new key) {renewed:.2f} s"
        for name, crl, renewed in timings
    ) + f" after `meshca revoke --serial` exited; {traffic.ok} requests, 0 failed; then {opened} new upstream "
        "connection(s) of 16 concurrent requests, all ok")
    assert all(renewed - crl < 2 for _, crl, renewed in timings)
