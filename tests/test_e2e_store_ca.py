"""`meshca serve` with `store:`: the internal CA imported into a real etcd serves JWT-authenticated SDS with no
state_dir, follows a `meshca ca rotate` committed to etcd, and refuses a wrong or missing KEK in one line."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from test_e2e_reconnect import meshca_serve
from xds_client import XdsClient

from meshca.clock import system_clock
from meshca.dev.envoy_process import free_port
from meshca.dev.etcd_process import EtcdProcess
from meshca.dev.material import DevMaterial, create_dev_material
from meshca.dev.tokens import mint_token
from meshca.store.etcd import EtcdSettings, EtcdStore
from meshca.xds.snapshot import ResourceType

pytestmark = pytest.mark.e2e

SDS = ResourceType.SECRET.type_url
TRUST_DOMAIN = "mesh.local"


def meshca(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MESHCA_STORE_KEK"}
    return subprocess.run([sys.executable, "-m", "meshca.cli.main", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def error_lines(stderr: str) -> list[str]:
    """The lines a failed start prints for the user (the others are JSON log records)."""
    return [line for line in stderr.splitlines() if not line.startswith("{")]


def store_material(tmp_path: Path, endpoint: str, port: int, kek_file: str | None = "kek") -> DevMaterial:
    etcd = {"endpoints": [endpoint], "prefix": "/serve", "lease_ttl": "2s", **({"kek_file": kek_file} if kek_file else {})}
    material = create_dev_material(tmp_path / "dev", TRUST_DOMAIN, system_clock, listen=f"127.0.0.1:{port}",
                                   extra_settings={"store": {"etcd": etcd}})
    return material


def without_state_dir(config: Path, name: str, **changes: object) -> Path:
    data = yaml.safe_load(config.read_text())
    data.pop("state_dir", None)
    data["store"]["etcd"].update(changes)
    other = config.with_name(name)
    other.write_text(yaml.safe_dump(data))
    return other


async def served_intermediate(material: DevMaterial, port: int, service_account: str) -> str:
    """The slot id of the intermediate in the chain SDS serves a new identity."""
    key = material.signing_key.read_bytes()
    token = mint_token(key, namespace="shop", service_account=service_account, node_id=service_account,
                       now=system_clock())
    credentials = grpc.ssl_channel_credentials(root_certificates=material.root_bundle.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials,
                                       options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
        client = XdsClient(channel, token)
        await client.send(SDS, ["default"], node_id=service_account)
        response = await client.recv(timeout=15)
        client.close()
    secret = Secret.parse(response.resources[0].value)
    chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/{service_account}"]
    return hashlib.sha256(chain[1].public_bytes(Encoding.DER)).hexdigest()[:16]


async def test_serve_issues_from_the_ca_in_etcd_and_follows_a_rotation(tmp_path: Path) -> None:
    port = free_port()
    with EtcdProcess() as etcd:
        material = store_material(tmp_path, etcd.endpoint, port)
        kek = material.directory / "kek"
        kek.write_bytes(secrets.token_bytes(32))
        kek.chmod(0o600)
        # without the CA in etcd: one line saying how to put it there
        missing = meshca("serve", "--config", str(material.serve_config))
        assert missing.returncode == 2 and "meshca ca import" in missing.stderr
        assert len(error_lines(missing.stderr)) == 1, missing.stderr

        imported = meshca("ca", "import", "--config", str(material.serve_config), "--state-dir", str(material.state_dir))
        assert imported.returncode == 0, imported.stderr
        again = meshca("ca", "import", "--config", str(material.serve_config), "--state-dir", str(material.state_dir))
        assert again.returncode == 2 and "already holds a CA under /serve/ca/" in again.stderr
        material.state_dir.rename(material.directory / "ca-imported")  # the replicas no longer need it
        config = without_state_dir(material.serve_config, "store.yaml")

        log = tmp_path / "meshca.log"
        with meshca_serve(DevMaterial(material.directory, config, material.root_bundle, material.signing_key,
                                      TRUST_DOMAIN, material.state_dir), port, log):
            status = meshca("ca", "status", "--config", str(config), "--json")
            assert status.returncode == 0, status.stderr
            first = yaml.safe_load(status.stdout)["active_intermediate_id"]
            assert await served_intermediate(material, port, "web") == first

            rotated = meshca("ca", "rotate", "--config", str(config), "--intermediate", "--now")
            assert rotated.returncode == 0, rotated.stderr
            assert "committed to etcd" in rotated.stdout
            second = yaml.safe_load(meshca("ca", "status", "--config", str(config), "--json").stdout)[
                "active_intermediate_id"]
            assert second != first
            for _ in range(100):
                if "CA state from etcd adopted" in log.read_text():
                    break
                await asyncio.sleep(0.1)
            assert await served_intermediate(material, port, "api") == second
        text = log.read_text()
        assert "is the leader" in text and "PRIVATE KEY" not in text

        wrong = material.directory / "wrong-kek"
        wrong.write_bytes(secrets.token_bytes(32))
        refused = meshca("serve", "--config", str(without_state_dir(config, "wrong.yaml", kek_file="wrong-kek")))
        assert refused.returncode == 2
        assert len(error_lines(refused.stderr)) == 1, refused.stderr
        assert "key-encryption key" in refused.stderr and "/serve/ca/files/" in refused.stderr
        no_kek = without_state_dir(config, "nokek.yaml")
        data = yaml.safe_load(no_kek.read_text())
        del data["store"]["etcd"]["kek_file"]
        no_kek.write_text(yaml.safe_dump(data))
        refused = meshca("serve", "--config", str(no_kek))
        assert refused.returncode == 2 and "store.etcd.kek_file" in refused.stderr and "MESHCA_STORE_KEK" in refused.stderr
        assert len(error_lines(refused.stderr)) == 1, refused.stderr


def test_a_replica_cannot_start_without_etcd_and_says_so_in_one_line(tmp_path: Path) -> None:
    """A new replica has no CA and no mesh until etcd answers: it refuses to start, naming the setting."""
    dead = f"127.0.0.1:{free_port()}"
    material = store_material(tmp_path, dead, free_port())
    (material.directory / "kek").write_bytes(secrets.token_bytes(32))
    config = without_state_dir(material.serve_config, "down.yaml", timeout=1)
    refused = meshca("serve", "--config", str(config))
    assert refused.returncode == 2
    lines = error_lines(refused.stderr)
    assert len(lines) == 1, refused.stderr
    assert "store.etcd.endpoints" in lines[0] and f"etcd at {dead} did not answer" in lines[0]


async def every_lease_holds_a_key(store: EtcdStore, within: float = 1.0) -> bool:
    """True once every lease in etcd has a key under it (a registry lease is granted just before its put)."""
    lease = store.client.lease
    assert lease is not None
    deadline = asyncio.get_running_loop().time() + within
    while True:
        ids = [item.ID for item in (await lease.leases()).leases]
        keys = [len((await lease.time_to_live(i, keys=True)).keys) for i in ids]
        if ids and all(keys):
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)


async def test_serve_on_etcd_holds_one_election_lease_and_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    """One leader election per process (serve started it twice: two leases, the key under the other one), and
    SIGTERM ends the watches, the election and the registry at once: exit 0, no traceback, the leader key and
    the replica's registry entry gone (revoked, not left to expire)."""
    port = free_port()
    with EtcdProcess() as etcd:
        material = store_material(tmp_path, etcd.endpoint, port)
        kek = material.directory / "kek"
        kek.write_bytes(secrets.token_bytes(32))
        kek.chmod(0o600)
        imported = meshca("ca", "import", "--config", str(material.serve_config), "--state-dir", str(material.state_dir))
        assert imported.returncode == 0, imported.stderr
        store = EtcdStore(EtcdSettings((etcd.endpoint,), prefix="/serve"), logging.getLogger("test"))
        await store.connect()
        try:
            log = tmp_path / "meshca.log"
            with meshca_serve(material, port, log) as process:
                await served_intermediate(material, port, "web")  # a stream open while it stops
                for _ in range(100):
                    if await store.get("ca/leader") is not None:
                        break
                    await asyncio.sleep(0.1)
                assert await every_lease_holds_a_key(store)  # none granted for nothing
                await asyncio.sleep(2.5)  # past the TTL: the leader key stayed under the lease the election refreshes
                assert await store.get("ca/leader") is not None
                process.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(process.wait, 15) == 0
            text = log.read_text()
            assert "no longer the leader" not in text.split("signal received")[0]
            for bad in ("Traceback", "Task was destroyed", "aclose()", "did not end within", "never retrieved"):
                assert bad not in text, text[-3000:]
            assert await store.get("ca/leader") is None
            replicas, _ = await store.get_prefix("replicas/")
            assert replicas == []
        finally:
            await store.close()
