"""Two `meshca serve` processes on one etcd (`store:`): a `meshca mesh apply` reaches xDS clients connected to each,
and `meshca status` on one shows both replicas' proxies."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
import yaml
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from test_e2e_reconnect import meshca_serve
from xds_client import XdsClient

from meshca.clock import system_clock
from meshca.dev.envoy_process import free_port
from meshca.dev.etcd_process import EtcdProcess
from meshca.dev.material import create_dev_material
from meshca.dev.tokens import mint_token
from meshca.xds.snapshot import ResourceType

CDS = ResourceType.CLUSTER.type_url
MESH = """\
trust_domain: mesh.local
services:
  backend:
    namespace: shop
    inbound: {port: 15006, app: "127.0.0.1:8080"}
    allow: [spiffe://mesh.local/ns/shop/sa/frontend]
  frontend:
    namespace: shop
    outbound: {port: 15001}
routes:
  - {prefix: /, to: backend}
"""


def meshca(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshca.cli.main", *args], capture_output=True, text=True, timeout=60)


async def clusters_seen(port: int, root: bytes, token: str, node_id: str, want: str, timeout: float = 20) -> list[str]:
    """Open an ADS stream to the replica on `port` and ACK CDS responses until one names `want`."""
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=root))
    client = XdsClient(channel, token)
    try:
        await client.send(CDS, node_id=node_id)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            response = await client.recv(timeout=deadline - asyncio.get_running_loop().time())
            names = [Cluster.parse(any_.value).name for any_ in response.resources]
            await client.ack(response)
            if want in names:
                return names
    finally:
        client.close()
        await channel.close()


def test_a_mesh_apply_reaches_streams_on_every_replica(tmp_path: Path) -> None:
    with EtcdProcess() as etcd, ExitStack() as stack:
        ports = [free_port(), free_port()]
        admin = [free_port(), free_port()]
        (tmp_path / "kek").write_bytes(os.urandom(32))
        store = {"etcd": {"endpoints": [etcd.endpoint], "prefix": "/serve-test", "lease_ttl": "3s",
                          "kek_file": str(tmp_path / "kek")}}
        material = create_dev_material(tmp_path / "dev", "mesh.local", system_clock, listen=f"127.0.0.1:{ports[0]}",
                                       metrics_port=admin[0], extra_settings={"store": store})
        imported = meshca("ca", "import", "--config", str(material.serve_config), "--state-dir", str(material.state_dir))
        assert imported.returncode == 0, imported.stderr
        second = material.serve_config.with_name("replica-2.yaml")
        settings = yaml.safe_load(material.serve_config.read_text())
        second.write_text(yaml.safe_dump({**settings, "listen": f"127.0.0.1:{ports[1]}", "metrics_port": admin[1]}))
        stack.enter_context(meshca_serve(material, ports[0], tmp_path / "replica-1.log"))
        material_2 = type(material)(**{**material.__dict__, "serve_config": second})
        stack.enter_context(meshca_serve(material_2, ports[1], tmp_path / "replica-2.log"))
        assert "no mesh config in etcd" in (tmp_path / "replica-1.log").read_text()

        key, root = material.signing_key.read_bytes(), material.root_bundle.read_bytes()

        def token(node_id: str) -> str:
            return mint_token(key, namespace="shop", service_account="frontend", node_id=node_id, now=system_clock())

        mesh_file = tmp_path / "mesh.yaml"
        mesh_file.write_text(MESH)

        async def run() -> list[list[str]]:
            watching = [
                asyncio.create_task(clusters_seen(port, root, token(f"node-{i}"), f"node-{i}", "outbound|backend"))
                for i, port in enumerate(ports)
            ]
            await asyncio.sleep(1.0)  # both streams are open on their replicas before the apply
            applied = await asyncio.to_thread(meshca, "mesh", "apply", "-f", str(mesh_file),
                                              "--config", str(material.serve_config))
            assert applied.returncode == 0, applied.stderr
            return list(await asyncio.gather(*watching))

        assert all("outbound|backend" in names for names in asyncio.run(run()))
        got = meshca("mesh", "get", "--config", str(second))
        assert got.returncode == 0 and got.stdout == MESH

        # the fleet view: proxies that stay connected, one per replica
        async def fleet() -> str:
            channels = [grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=root))
                        for port in ports]
            clients = [XdsClient(channel, token(f"held-{i}")) for i, channel in enumerate(channels)]
            for i, client in enumerate(clients):
                await client.send(CDS, node_id=f"held-{i}")
                await client.ack(await client.recv())
            await asyncio.sleep(2.5)  # the replicas' next registry writes (every 1 s)
            shown = await asyncio.to_thread(meshca, "status", "--config", str(material.serve_config))
            for client in clients:
                client.close()
            for channel in channels:
                await channel.close()
            assert shown.returncode == 0, shown.stderr
            return shown.stdout

        table = asyncio.run(fleet())
        lines = table.splitlines()
        assert lines[0].split()[:3] == ["NODE", "IDENTITY", "REPLICA"]
        held = {line.split()[0]: line.split()[2] for line in lines[1:] if line.startswith("held-")}
        assert set(held) == {"held-0", "held-1"} and held["held-0"] != held["held-1"], table
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin[1]}/metrics", timeout=5).read().decode()
        assert "meshca_store_reachable 1.0" in metrics and "meshca_store_writes_total" in metrics


def test_serve_refuses_mesh_with_store(tmp_path: Path) -> None:
    material = create_dev_material(tmp_path, "mesh.local", system_clock, sample_mesh=True,
                                   extra_settings={"store": {"etcd": {"endpoints": ["127.0.0.1:1"]}}})
    result = meshca("serve", "--config", str(material.serve_config))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "mesh: cannot be used with store" in result.stderr, result.stderr


pytestmark = pytest.mark.e2e
