"""Agent mode with real Envoys: an agent-mode sidecar takes its secrets from a local SDS socket, meshca sends it none."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
import yaml
from meshca_harness import TRUST_DOMAIN, RunningMeshca, running_meshca

from meshca.clock import system_clock
from meshca.dev.envoy_process import EnvoyProcess, config_of_type, free_port, wait_until
from meshca.dev.harness import BACKEND, FRONTEND, Ports, Workload, backend_app, http_get, mesh_config, serve_app
from meshca.identity.spiffe import SpiffeId
from meshca.mesh.model import parse_mesh_config
from meshca.mesh.resources import tls_certificate_secret, validation_context_secret
from meshca.node.bootstrap import BootstrapSettings, build_bootstrap
from meshca.xds.cache import SnapshotCache
from meshca.xds.server import Admission, NodeInfo, XdsServer
from meshca.xds.snapshot import ResourceType, Snapshot
from meshca.xds.status import ProxyRegistry

pytestmark = pytest.mark.e2e

_LOCAL_KEY = "local"


def spiffe_id(workload: Workload) -> str:
    """In running_meshca's trust domain (the demo harness's Workload names another)."""
    return f"spiffe://{TRUST_DOMAIN}/ns/{workload.namespace}/sa/{workload.service_account}"


class StandInAgentGate:
    """STAND-IN for the meshca agent's own SDS gate (built by another helper): every local peer sees one snapshot."""

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> object:
        return None

    async def admit(self, principal: object, node: NodeInfo) -> Admission:
        return Admission(_LOCAL_KEY, node.id)

    def release(self, admission: Admission) -> None:
        pass


async def stand_in_agent(meshca: RunningMeshca, workload: Workload, socket: Path) -> grpc.aio.Server:
    """STAND-IN for `meshca agent`: meshca's own XdsServer + SnapshotCache on a Unix socket, serving `default`
    (a certificate for the workload from the test's CA, with its key) and `ROOTCA`. It is not meshca's xDS server:
    what it serves is not what meshca sent."""
    leaf = meshca.app.ca.issue_workload(SpiffeId.parse(spiffe_id(workload)))
    assert leaf.private_key_pem is not None
    cache = SnapshotCache()
    cache.set_snapshot(_LOCAL_KEY, Snapshot.build([
        tls_certificate_secret("default", leaf.chain_pem, leaf.private_key_pem),
        validation_context_secret("ROOTCA", meshca.app.ca.trust_bundle_pem()),
    ]))
    xds = XdsServer(cache, StandInAgentGate(), ProxyRegistry(system_clock), logging.getLogger("meshca.test.agent"))
    server = grpc.aio.server()
    xds.add_to_server(server)
    assert server.add_insecure_port(f"unix:{socket}")
    await server.start()
    socket.chmod(0o600)
    return server


def sidecar(meshca: RunningMeshca, workload: Workload, directory: Path, api_type: str, agent_socket: Path | None,
            admin_port: int) -> EnvoyProcess:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meshca-root.pem").write_bytes(meshca.root_pem)
    settings = BootstrapSettings(
        node_id=workload.node_id,
        cluster=workload.name,
        meshca_address="127.0.0.1",
        meshca_port=meshca.port,
        meshca_ca_path=directory / "meshca-root.pem",
        meshca_server_name="localhost",
        token=meshca.token(workload.namespace, workload.service_account, node_id=workload.node_id),
        admin_port=admin_port,
        api_type=api_type,
        agent_socket=agent_socket,
    )
    return EnvoyProcess(build_bootstrap(settings), workdir=directory / "envoy")


@pytest.mark.parametrize("api_type", ["DELTA_GRPC", "GRPC"])
async def test_agent_mode_sidecar_calls_a_normal_one_over_mtls_and_meshca_sends_it_no_secret(
    api_type: str, tmp_path: Path
) -> None:
    ports = Ports()
    data = mesh_config(ports)
    data["trust_domain"] = TRUST_DOMAIN
    data["services"]["backend"]["allow"] = [spiffe_id(FRONTEND)]
    config = parse_mesh_config(Path("mesh.yaml"), yaml.safe_load(yaml.safe_dump(data)))
    app = serve_app(ports.backend_app, backend_app("backend"))
    socket = Path(f"/tmp/meshca-agent-{free_port()}.sock")  # short: a Unix socket path has ~107 bytes at most
    sent: list[tuple[str, bytes]] = []
    try:
        async with running_meshca(tmp_path) as meshca:
            xds = meshca.app.xds
            original = xds._send

            async def recording(stream_id: int, node_id: str, context: grpc.aio.ServicerContext, message: bytes) -> None:
                sent.append((node_id, message))  # every response meshca's xDS server writes, as bytes on the wire
                await original(stream_id, node_id, context, message)

            xds._send = recording  # type: ignore[method-assign]
            meshca.app.apply_mesh_config(config)
            agent = await stand_in_agent(meshca, FRONTEND, socket)
            try:
                backend = sidecar(meshca, BACKEND, tmp_path / "backend", api_type, None, ports.admin["backend"])
                frontend = sidecar(meshca, FRONTEND, tmp_path / "frontend", api_type, socket, ports.admin["frontend"])
                with backend, frontend:
                    await asyncio.to_thread(backend.wait_ready, 30)
                    await asyncio.to_thread(frontend.wait_ready, 30)
                    url = f"http://127.0.0.1:{ports.frontend_outbound}/hello"

                    def answered() -> bool:
                        return http_get(url)[0] == 200

                    await asyncio.to_thread(wait_until, answered, 30, 0.1, "frontend -> backend over mTLS")
                    status, body = http_get(url)
                    assert status == 200 and isinstance(body, dict)
                    assert body.get("peer") == spiffe_id(FRONTEND), body  # backend's sidecar saw the agent's cert
                    secrets = config_of_type(frontend.config_dump(), "SecretsConfigDump")
                    names = {s["name"] for s in secrets.get("dynamic_active_secrets", [])}
                    assert names == {"default", "ROOTCA"}
            finally:
                await agent.stop(None)
            agent_key = meshca.app.publisher.agent_snapshot_key(SpiffeId.parse(spiffe_id(FRONTEND)))
            frontend_snapshot = meshca.app.cache.get(agent_key)
            assert frontend_snapshot is not None and not frontend_snapshot.of_type(ResourceType.SECRET).resources
            # meshca issued a certificate for backend (a normal node) only
            issued = {c.spiffe_id.uri for c in meshca.app.secrets.certificates()}
            assert issued == {spiffe_id(BACKEND)}
    finally:
        app.shutdown()
        socket.unlink(missing_ok=True)
    to_frontend = [message for node, message in sent if node == FRONTEND.node_id]
    to_backend = [message for node, message in sent if node == BACKEND.node_id]
    assert to_frontend and to_backend
    secret_type = ResourceType.SECRET.value.encode()
    assert not [m for m in to_frontend if b"PRIVATE KEY" in m or secret_type in m]
    assert any(b"PRIVATE KEY" in m for m in to_backend)  # the capture sees keys where meshca does send them
    print(f"\n{api_type}: {len(to_frontend)} responses to the agent-mode node, none with a Secret or a private key")
