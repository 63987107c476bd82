"""A port already taken fails `meshca serve` at start with one line naming the setting (issue 11, defect 3)."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml

from meshca.app import MeshcaApp
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock
from meshca.dev.envoy_process import free_port
from meshca.listen import ListenError


def meshca(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "meshca"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "meshca.cli.main"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def dev_config(tmp_path: Path) -> Path:
    directory = tmp_path / "dev"
    assert meshca("dev", "init", "--dir", str(directory)).returncode == 0
    return directory / "meshca.yaml"


def set_config(path: Path, **values: object) -> None:
    config = yaml.safe_load(path.read_text())
    config.update(values)
    path.write_text(yaml.safe_dump(config))


@pytest.fixture
def grpc_listener() -> Iterator[int]:
    """Another gRPC server on a port, with gRPC's default options (SO_REUSEPORT on, like a first meshca)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


@pytest.fixture
def plain_listener() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_listen_port_taken_by_another_grpc_server_fails_in_one_line(dev_config: Path, grpc_listener: int) -> None:
    set_config(dev_config, listen=f"127.0.0.1:{grpc_listener}")
    started = time.monotonic()
    result = meshca("serve", "--config", str(dev_config))
    assert time.monotonic() - started < 15
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"meshca: error: listen: 127.0.0.1:{grpc_listener} is already in use"]


def test_metrics_port_taken_fails_in_one_line(dev_config: Path, plain_listener: int) -> None:
    set_config(dev_config, listen=f"127.0.0.1:{free_port()}", metrics_port=plain_listener)
    result = meshca("serve", "--config", str(dev_config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"meshca: error: metrics_port: 127.0.0.1:{plain_listener} is already in use"]


async def test_start_refuses_a_taken_port_and_can_share_one_on_purpose(tmp_path: Path, grpc_listener: int) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain="t.test"), system_clock)
    app = MeshcaApp(ca, [], system_clock, logging.getLogger("test"))
    with pytest.raises(ListenError, match=f"listen: 127.0.0.1:{grpc_listener} is already in use"):
        await app.start("127.0.0.1", grpc_listener, None)
    shared = MeshcaApp(ca, [], system_clock, logging.getLogger("test"))
    assert await shared.start("127.0.0.1", grpc_listener, None, share_port=True) == grpc_listener
    await shared.stop(grace=0)
