"""End to end with real Envoys, meshca and `meshca agent` as a process: the agent-mode callee's ROOTCA follows meshca's
trust material. `meshca revoke --certificate` of a caller's leaf: the agent-mode Envoy holds the CRL and refuses that
leaf at the TLS handshake; `meshca ca rotate --root`: its ROOTCA holds the new root before any renewal. Times printed."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from meshca_harness import TRUST_DOMAIN, RunningMeshca, running_meshca
from test_e2e_agent_mode import sidecar, spiffe_id
from test_e2e_revocation import mtls_get

from meshca.app import crl_publishing
from meshca.ca import crypto
from meshca.ca.internal import CertificateAuthority
from meshca.ca.revocation import StateDirRevocations
from meshca.clock import system_clock
from meshca.dev.demo import meshca_cli
from meshca.dev.envoy_process import EnvoyProcess, dynamic_active_secrets, wait_until
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
from meshca.v1 import certificate_pb2, certificate_pb2_grpc

pytestmark = pytest.mark.e2e


def agent_config(directory: Path, meshca: RunningMeshca, socket_path: Path) -> Path:
    """The operator's YAML (docs/agent.md) for the callee's workload."""
    (directory / "root.pem").write_bytes(meshca.root_pem)
    (directory / "backend.jwt").write_text(meshca.token(BACKEND.namespace, BACKEND.service_account))
    config = directory / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "meshca": [f"127.0.0.1:{meshca.port}"],
        "server_name": "localhost",
        "ca": str(directory / "root.pem"),
        "workloads": [{"name": "backend", "token_file": str(directory / "backend.jwt"), "socket": str(socket_path)}],
    }))
    return config


async def caller_leaf(meshca: RunningMeshca, directory: Path) -> tuple[Path, Path, int]:
    """A leaf of the caller's (frontend's) identity with a key this test holds, signed by meshca's CSR service."""
    key = crypto.generate_private_key_pem()
    token = meshca.token(FRONTEND.namespace, FRONTEND.service_account)
    credentials = grpc.ssl_channel_credentials(root_certificates=meshca.root_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{meshca.port}", credentials,
                                       options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
        answer = await certificate_pb2_grpc.CertificateServiceStub(channel).Sign(
            certificate_pb2.SignRequest(csr_pem=crypto.build_csr_pem(key).decode()),
            metadata=[("authorization", f"Bearer {token}")], timeout=10,
        )
    (directory / "leaf.pem").write_text("".join(answer.certificate_chain))
    (directory / "leaf-key.pem").write_bytes(key)
    return directory / "leaf.pem", directory / "leaf-key.pem", int(answer.serial_number, 16)


def direct_request(port: int, cert: Path, key: Path, bundle: bytes) -> str:
    """One GET straight to the callee's sidecar over a new mTLS connection with `cert`: "ok", or why it failed."""
    return mtls_get(port, cert, key, bundle.decode())


def rootca(envoy: EnvoyProcess) -> dict[str, Any]:
    return dynamic_active_secrets(envoy.config_dump()).get("ROOTCA", {})


def trusted_roots(envoy: EnvoyProcess) -> list[bytes]:
    inline = rootca(envoy).get("validation_context", {}).get("trusted_ca", {}).get("inline_bytes", "")
    return crypto.split_pem_certificates(base64.b64decode(inline)) if inline else []


def default_state(envoy: EnvoyProcess) -> tuple[int, str]:
    """The `default` secret's leaf serial and when Envoy last updated it (unchanged = not touched)."""
    entries = [e for e in envoy.config_dump()["configs"] if e.get("@type", "").endswith("SecretsConfigDump")]
    (active,) = [s for s in entries[0]["dynamic_active_secrets"] if s["name"] == "default"]
    return envoy_chain(envoy)[0].serial_number, active["last_updated"]


async def test_the_agent_mode_callee_refuses_a_revoked_caller_and_trusts_a_new_root_before_any_renewal(
    tmp_path: Path, socket_dir: Path
) -> None:
    ports = Ports()
    data = mesh_config(ports)
    data["trust_domain"] = TRUST_DOMAIN
    data["services"]["backend"]["allow"] = [spiffe_id(FRONTEND)]
    config = parse_mesh_config(Path("mesh.yaml"), yaml.safe_load(yaml.safe_dump(data)))
    app = serve_app(ports.backend_app, backend_app("backend"))
    state_dir = tmp_path / "meshca" / "ca"
    socket_path = socket_dir / "backend.sock"
    agent: subprocess.Popen[bytes] | None = None
    log = tmp_path / "agent.log"
    url = f"http://127.0.0.1:{ports.frontend_outbound}/hello"

    def one_request() -> RequestResult:
        status, body = http_get(url)
        peer = body.get("peer") if isinstance(body, dict) else None
        return RequestResult(status == 200 and peer == spiffe_id(FRONTEND), status, peer, None)

    def bundle_now() -> bytes:
        return CertificateAuthority.load(state_dir, system_clock).trust_bundle_pem()

    async def until(check: Any, what: str, timeout: float = 30) -> float:
        started = time.monotonic()
        await asyncio.to_thread(wait_until, check, timeout, 0.02, what)
        return time.monotonic() - started

    try:
        async with running_meshca(tmp_path / "meshca", revocations=crl_publishing(StateDirRevocations(state_dir))) as meshca:
            meshca.app.apply_mesh_config(config)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
            with log.open("wb") as output:
                agent = subprocess.Popen(
                    [sys.executable, "-m", "meshca.cli.main", "agent", "--config",
                     str(agent_config(tmp_path, meshca, socket_path))],
                    stdout=output, stderr=subprocess.STDOUT, env=env,
                )
            callee = sidecar(meshca, BACKEND, tmp_path / "backend", "DELTA_GRPC", socket_path, ports.admin["backend"])
            caller = sidecar(meshca, FRONTEND, tmp_path / "frontend", "DELTA_GRPC", None, ports.admin["frontend"])
            with callee, caller:
                await asyncio.to_thread(callee.wait_ready, 30)
                await asyncio.to_thread(caller.wait_ready, 30)
                await until(lambda: one_request().ok, "frontend -> agent-mode backend over mTLS")
                # the agent serves meshca's ROOTCA material: the same bundle and CRLs a normal node gets
                assert meshca.app.revocations is not None
                bundle, crls = meshca.app.ca.trust_bundle_pem(), meshca.app.revocations.crls_pem
                await until(lambda: "crl" in rootca(callee).get("validation_context", {}), "CRLs in the callee's ROOTCA",
                            timeout=10)
                held = rootca(callee)["validation_context"]
                assert base64.b64decode(held["trusted_ca"]["inline_bytes"]) == bundle
                assert base64.b64decode(held["crl"]["inline_bytes"]) == crls and len(crypto.split_pem_crls(crls)) == 2
                default_before = await asyncio.to_thread(default_state, callee)

                cert, key, serial = await caller_leaf(meshca, tmp_path)
                assert await asyncio.to_thread(direct_request, ports.backend_inbound, cert, key, bundle) == "ok"
                with TrafficLoop(one_request) as traffic:
                    await asyncio.sleep(0.5)
                    await asyncio.to_thread(meshca_cli, "revoke", "--certificate", str(cert), "--reason", "keyCompromise",
                                            "--state-dir", str(state_dir))
                    revoked_at = time.monotonic()
                    await until(lambda: serial in crl_serials(callee), "the CRL listing the serial in the callee's ROOTCA")
                    crl_seconds = time.monotonic() - revoked_at
                    await until(lambda: serial in crl_serials(caller), "the CRL in the normal caller's ROOTCA")
                    normal_seconds = time.monotonic() - revoked_at  # (at most: polled after the callee's)
                    await until(lambda: direct_request(ports.backend_inbound, cert, key, bundle).startswith("failed"),
                                "the revoked leaf refused at the handshake")
                    refused_seconds = time.monotonic() - revoked_at

                    before = set(crypto.split_pem_certificates(bundle_now()))
                    await asyncio.to_thread(meshca_cli, "ca", "rotate", "--root", "--state-dir", str(state_dir))
                    rotated_at = time.monotonic()
                    (new_root,) = set(crypto.split_pem_certificates(bundle_now())) - before
                    await until(lambda: new_root in trusted_roots(callee), "the new root in the callee's ROOTCA")
                    root_seconds = time.monotonic() - rotated_at
                    await asyncio.sleep(1.0)
                assert traffic.failures == [] and traffic.ok > 10, (traffic.failures[:3], traffic.ok)
                # ROOTCA changed twice, `default` never: the same leaf, not updated since, and one CSR in all
                assert await asyncio.to_thread(default_state, callee) == default_before
                held = rootca(callee)["validation_context"]
                assert crypto.split_pem_certificates(base64.b64decode(held["trusted_ca"]["inline_bytes"])) == \
                    crypto.split_pem_certificates(bundle_now())
                assert len(crypto.split_pem_crls(base64.b64decode(held["crl"]["inline_bytes"]))) == 4
                assert default_before[0] == envoy_chain(callee)[0].serial_number
        text = log.read_text()
        assert text.count("serving certificate serial") == 1, text
        assert "PRIVATE KEY" not in text and "eyJ" not in text
        print(f"\nagent-mode callee: revoked caller leaf -> CRL in its Envoy's ROOTCA {crl_seconds:.2f} s, "
              f"refused at the handshake {refused_seconds:.2f} s after `meshca revoke` exited (the normal caller's "
              f"Envoy: CRL by {normal_seconds:.2f} s); "
              f"`ca rotate --root` -> new root in its ROOTCA {root_seconds:.2f} s (no renewal); "
              f"{traffic.ok} requests, 0 failed")
        assert crl_seconds < 5 and root_seconds < 5
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()
        if agent is not None:
            agent.wait(10)
        app.shutdown()
        app.server_close()
