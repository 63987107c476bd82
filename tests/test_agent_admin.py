"""The agent's admin endpoint over real HTTP: /healthz 503 → 200 → 503 as certificates arrive and expire (fake clock,
the fake meshca of test_agent.py signing with a real CA), /status without a token or a key, `admin` refused in one line."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from fakes import FakeClock
from test_agent import GOOD, TRUST_DOMAIN, TTL, FakeMeshca, write_config

from meshca.agent.admin import AgentAdmin
from meshca.agent.service import NodeAgent
from meshca.agent.settings import AgentSettings, WorkloadsDirSettings, WorkloadSettings, load_agent_settings
from meshca.agent.workload import Retry, key_fingerprint
from meshca.ca import crypto
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.fields import ConfigError
from meshca.mesh.resources import DEFAULT_CERT_SECRET
from meshca.xds.snapshot import ResourceType

SECRET = "s3cr3t-token-value-do-not-show"


async def forever(_: float) -> None:
    """The agent's sleep: its tasks make their first attempt and then wait; the test drives what follows."""
    await asyncio.Event().wait()


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def http(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(get, port, path)


def settings(tmp_path: Path, socket_dir: Path, workloads: tuple[WorkloadSettings, ...] = (),
             directory: Path | None = None) -> AgentSettings:
    (tmp_path / "root.pem").write_text("roots")
    return AgentSettings((("127.0.0.1", 1),), "meshca.local", tmp_path / "root.pem", workloads,
                         workloads_dir=None if directory is None else WorkloadsDirSettings(directory))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock.at_real_now()


@pytest.fixture
def meshca(tmp_path: Path, clock: FakeClock) -> FakeMeshca:
    return FakeMeshca(CertificateAuthority.init(tmp_path / "ca", CaSettings(TRUST_DOMAIN, leaf_ttl_default=TTL), clock))


@pytest.fixture
async def running(tmp_path: Path, socket_dir: Path, meshca: FakeMeshca, clock: FakeClock
                  ) -> AsyncIterator[tuple[NodeAgent, int]]:
    """An agent with one configured workload (token `frontend:SECRET`) and its admin endpoint on a free port."""
    token_file = tmp_path / "frontend.jwt"
    token_file.write_text(f"frontend:{SECRET}\n")
    workload = WorkloadSettings("frontend", token_file, socket_dir / "frontend.sock")
    agent = NodeAgent(settings(tmp_path, socket_dir, (workload,)), clock, logging.getLogger("test.agent"),
                      signer=meshca, retry=Retry(timedelta(seconds=1), timedelta(seconds=30)), sleep=forever)
    admin = AgentAdmin(agent, clock, logging.getLogger("test.agent.admin"))
    port = admin.start("127.0.0.1", 0)
    try:
        yield agent, port
    finally:
        admin.stop()
        await agent.stop()


async def test_healthz_is_503_before_the_certificate_200_with_it_and_503_once_it_expired(
    running: tuple[NodeAgent, int], meshca: FakeMeshca, clock: FakeClock
) -> None:
    agent, port = running
    assert await http(port, "/healthz") == (503, "agent: not running\n")
    meshca.down = True
    await agent.start()
    await asyncio.sleep(0)  # the workload's first attempt (it fails: meshca is down)
    assert agent.identities[0].failures == 1
    code, body = await http(port, "/healthz")
    assert code == 503
    assert body == ("frontend: no certificate yet (last CSR failed: meshca at 127.0.0.1:1: UNAVAILABLE: "
                    "connection refused)\n")

    meshca.down = False
    await agent.identities[0].attempt()
    assert await http(port, "/healthz") == (200, "ok\n")
    served = agent.identities[0].served
    assert served is not None

    clock.now = served.not_after - timedelta(seconds=1)
    assert (await http(port, "/healthz"))[0] == 200
    clock.now = served.not_after
    code, body = await http(port, "/healthz")
    assert (code, body) == (503, f"frontend: certificate {served.serial_number} expired at "
                                 f"{served.not_after.isoformat()}\n")

    await agent.identities[0].attempt()  # renewed
    assert await http(port, "/healthz") == (200, "ok\n")
    await agent.stop()
    assert await http(port, "/healthz") == (503, "agent: not running\n")


async def test_status_shows_the_certificate_and_the_key_fingerprint_never_the_key_or_the_token(
    running: tuple[NodeAgent, int], meshca: FakeMeshca, clock: FakeClock
) -> None:
    agent, port = running
    await agent.start()
    await agent.wait_served(5)
    served = agent.identities[0].served
    assert served is not None
    code, body = await http(port, "/status")
    assert code == 200
    status = json.loads(body)
    assert status["ready"] is True and status["problems"] == []
    (workload,) = status["workloads"]
    assert workload == {
        "name": "frontend",
        "socket": str(agent.settings.workloads[0].socket),
        "spiffe_id": served.spiffe_id,
        "serial": served.serial_number,
        "not_before": served.not_before.isoformat(),
        "not_after": served.not_after.isoformat(),
        "received_at": served.received_at.isoformat(),
        "renew_at": served.renew_at.isoformat(),
        "key_sha256": served.key_sha256,
        "issued": 1,
        "failures": 0,
        "last_failure": None,
        "sds_streams": 0,
        "endpoints": None,
    }
    assert status["trust"] is None and status["workloads_dir"] is None

    snapshot = agent.cache.get("frontend")
    assert snapshot is not None
    default = snapshot.of_type(ResourceType.SECRET).resources[DEFAULT_CERT_SECRET].payload
    leaf = crypto.parse_certificate_pem(crypto.split_pem_certificates(default)[0])
    assert key_fingerprint(leaf.public_key.spki_der) == workload["key_sha256"]
    # the key the agent serves Envoy: none of its base64 lines, nor the token, is in /status or /healthz
    (key_body,) = re.findall(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----(.*?)-----END", default, re.DOTALL)
    key_lines = [line for line in key_body.split() if len(line) > 16]
    assert key_lines
    for path in ("/status", "/healthz"):
        text = (await http(port, path))[1]
        assert "PRIVATE KEY" not in text and SECRET not in text
        assert not any(line.decode() in text for line in key_lines)
    assert (await http(port, "/metrics")) == (404, "not found: try /healthz, /status\n")


async def test_a_workload_found_in_workloads_dir_is_not_ready_until_it_has_a_certificate(
    tmp_path: Path, socket_dir: Path, meshca: FakeMeshca, clock: FakeClock
) -> None:
    workloads = socket_dir / "w"
    workloads.mkdir()
    agent = NodeAgent(settings(tmp_path, socket_dir, directory=workloads), clock, logging.getLogger("test.agent"),
                      signer=meshca, sleep=forever)
    admin = AgentAdmin(agent, clock, logging.getLogger("test.agent.admin"))
    port = admin.start("127.0.0.1", 0)
    try:
        await agent.start()
        await asyncio.sleep(0)
        assert await http(port, "/healthz") == (200, "ok\n")  # no workloads yet: ready
        (workloads / "pod-a").mkdir()
        (workloads / "pod-a" / "token").write_text(f"frontend:{SECRET}")
        (workloads / "pod-b").mkdir()
        (workloads / "pod-b" / "token").write_text("")
        meshca.down = True
        assert agent.directory is not None
        await agent.directory.scan_once()
        await asyncio.sleep(0)
        code, body = await http(port, "/healthz")
        assert code == 503 and body.startswith("pod-a: no certificate yet (last CSR failed:") and SECRET not in body
        status = json.loads((await http(port, "/status"))[1])
        assert [w["name"] for w in status["workloads"]] == ["pod-a"]
        assert status["workloads_dir"] == {
            "path": str(workloads), "problems": {"pod-b": f"{workloads / 'pod-b' / 'token'}: empty"}}
        meshca.down = False
        await agent.identities[0].attempt()
        assert await http(port, "/healthz") == (200, "ok\n")
    finally:
        admin.stop()
        await agent.stop()


def test_a_bad_admin_address_is_one_line_naming_the_field(tmp_path: Path) -> None:
    assert load_agent_settings(write_config(tmp_path, GOOD)).admin is None
    path = write_config(tmp_path, GOOD + 'admin: "0.0.0.0:15021"\n')
    assert load_agent_settings(path).admin == ("0.0.0.0", 15021)
    for bad in ('"localhost"', '"127.0.0.1:99999"', "15021"):
        path = write_config(tmp_path, GOOD + f"admin: {bad}\n")
        with pytest.raises(ConfigError) as error:
            load_agent_settings(path)
        assert str(error.value).startswith(f"{path}: admin: ") and "\n" not in str(error.value)


async def test_a_taken_admin_port_is_refused_in_one_line_before_any_socket(tmp_path: Path, socket_dir: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    (tmp_path / "root.pem").write_text("roots")
    (tmp_path / "f.jwt").write_text("token")
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"meshca: ['127.0.0.1:1']\nserver_name: meshca.local\nca: root.pem\nadmin: '127.0.0.1:{port}'\n"
        f"workloads:\n  - {{name: w, token_file: f.jwt, socket: {socket_dir}/w.sock}}\n"
    )
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshca.cli.main", "agent", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        taken.close()
    assert process.returncode == 2
    assert stderr.decode().splitlines() == [f"meshca: error: admin: 127.0.0.1:{port} is already in use"]
    assert not (socket_dir / "w.sock").exists()
