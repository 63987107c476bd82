"""The `meshca` command line: ca init, dev init, dev token, serve (a real process, SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import yaml
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from grpc_health.v1 import health_pb2, health_pb2_grpc
from xds_client import XdsClient

from meshca.clock import system_clock
from meshca.dev.envoy_process import free_port
from meshca.dev.tokens import DEV_AUDIENCE, DEV_ISSUER
from meshca.identity.jwt import TokenVerifier, TrustedIssuer
from meshca.xds.snapshot import ResourceType


def meshca_command() -> list[str]:
    script = Path(sys.executable).parent / "meshca"
    return [str(script)] if script.exists() else [sys.executable, "-m", "meshca.cli.main"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*meshca_command(), *args], capture_output=True, text=True, timeout=60)


def test_ca_init_creates_state_and_refuses_to_overwrite(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = run("ca", "init", "--state-dir", str(state), "--trust-domain", "corp.example")
    assert first.returncode == 0, first.stderr
    assert "corp.example" in first.stdout
    keys = [p for p in state.iterdir() if "key" in p.name]
    assert keys and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys)
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    second = run("ca", "init", "--state-dir", str(state), "--trust-domain", "corp.example")
    assert second.returncode == 2
    assert "meshca: error:" in second.stderr and "refusing to overwrite" in second.stderr
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before


def test_dev_init_and_dev_token(tmp_path: Path) -> None:
    directory = tmp_path / "certs-dev"
    result = run("dev", "init", "--dir", str(directory), "--trust-domain", "dev.test")
    assert result.returncode == 0, result.stderr
    for name in ("root.pem", "server.pem", "server-key.pem", "jwt-signing-key.pem", "jwks.json", "meshca.yaml"):
        assert (directory / name).exists(), name
    for secret in ("server-key.pem", "jwt-signing-key.pem"):
        assert stat.S_IMODE((directory / secret).stat().st_mode) == 0o600
    again = run("dev", "init", "--dir", str(directory))
    assert again.returncode == 2 and "--force" in again.stderr

    token = run("dev", "token", "--dir", str(directory), "--ns", "shop", "--sa", "frontend", "--node-id", "fe-1")
    assert token.returncode == 0, token.stderr
    issuer = TrustedIssuer(DEV_ISSUER, (DEV_AUDIENCE,), "dev.test", jwks_path=directory / "jwks.json")
    identity = TokenVerifier([issuer], system_clock).verify(token.stdout.strip())
    assert identity.spiffe_id.uri == "spiffe://dev.test/ns/shop/sa/frontend"
    assert identity.node_id == "fe-1"


def test_dev_token_without_dev_init_explains(tmp_path: Path) -> None:
    result = run("dev", "token", "--dir", str(tmp_path / "missing"), "--namespace", "a", "--service-account", "b")
    assert result.returncode == 2 and "meshca dev init" in result.stderr


async def test_serve_issues_secrets_logs_json_and_stops_on_sigterm(tmp_path: Path) -> None:
    directory = tmp_path / "certs-dev"
    assert run("dev", "init", "--dir", str(directory)).returncode == 0
    config_path = directory / "meshca.yaml"
    config = yaml.safe_load(config_path.read_text())
    port = free_port()
    config["listen"] = f"127.0.0.1:{port}"
    config["metrics_port"] = free_port()  # dev init writes the fixed 15011
    config_path.write_text(yaml.safe_dump(config))
    token = run("dev", "token", "--dir", str(directory), "--ns", "shop", "--sa", "frontend").stdout.strip()
    stderr_path = tmp_path / "serve.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen([*meshca_command(), "serve", "--config", str(config_path)], stderr=stderr)
    try:
        credentials = grpc.ssl_channel_credentials((directory / "root.pem").read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(100):
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            client = XdsClient(channel, token)
            await client.send(ResourceType.SECRET.type_url, ["default"], node_id="frontend-1")
            response = await client.recv()
            secret = Secret.parse(response.resources[0].value)
            key_pem = secret.tls_certificate.private_key.inline_bytes
            assert b"PRIVATE KEY" in key_pem
            client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = stderr_path.read_bytes()
    lines = [json.loads(line) for line in log.decode().splitlines() if line.strip()]
    messages = [line["msg"] for line in lines]
    assert any("serving on 127.0.0.1" in m for m in messages)
    assert any("issued workload certificate" in m and "ns/shop/sa/frontend" in m for m in messages)
    assert any("stopping gracefully" in m for m in messages)
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    key_body = b"".join(key_pem.splitlines()[1:-1])
    assert key_body[:40] not in log.replace(b"\n", b"")  # the private key never reaches the log


def test_serve_with_corrupt_state_fails_clearly(tmp_path: Path) -> None:
    directory = tmp_path / "certs-dev"
    assert run("dev", "init", "--dir", str(directory)).returncode == 0
    (directory / "ca" / "intermediate.pem").write_text("not a certificate")
    result = run("serve", "--config", str(directory / "meshca.yaml"))
    assert result.returncode == 2
    assert "intermediate.pem" in result.stderr and "meshca: error:" in result.stderr
