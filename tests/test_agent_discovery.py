"""The agent's workload directory (`workloads_dir`): directories with a token start a workload, their removal stops it,
a bad directory is one line and is retried, tokens are read without following symlinks; scans are driven by hand."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import stat
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from fakes import FakeClock
from test_agent import TRUST_DOMAIN, TTL, FakeMeshca

from meshca.agent.discovery import Problem, WorkloadDirectory, read_workload, token_expiry
from meshca.agent.registration import Endpoint
from meshca.agent.service import NodeAgent
from meshca.agent.settings import AgentSettings, WorkloadsDirSettings, WorkloadSettings, load_agent_settings
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.fields import ConfigError
from meshca.mesh.resources import DEFAULT_CERT_SECRET
from meshca.xds.snapshot import ResourceType

LOG = "test.agent.discovery"


class RecordingHost:
    """Stands in for NodeAgent: records what discovery asks of it; `refuse` makes add_workload fail as a socket would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, object]] = []
        self.refuse: str | None = None

    async def add_workload(self, workload: WorkloadSettings) -> None:
        from meshca.agent.sds import SocketError

        if self.refuse is not None:
            raise SocketError(self.refuse)
        self.calls.append(("add", workload.name, workload))

    async def remove_workload(self, name: str) -> None:
        self.calls.append(("remove", name, None))

    async def set_endpoints(self, name: str, endpoints: Sequence[Endpoint]) -> None:
        self.calls.append(("endpoints", name, tuple(endpoints)))


def jwt_like(subject: str, exp: float) -> str:
    """`<service account>:<header>.<payload>.<sig>`: FakeMeshca signs for the part before ':', discovery reads `exp`."""
    payload = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).rstrip(b"=").decode()
    return f"{subject}:eyJhbGciOiJub25lIn0.{payload}.sig"


def add_dir(root: Path, name: str, token: str = "frontend:1", endpoints: str | None = None) -> Path:
    directory = root / name
    directory.mkdir()
    if endpoints is not None:
        (directory / "endpoints.yaml").write_text(endpoints)
    (directory / "token").write_text(token)
    return directory


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock.at_real_now()


@pytest.fixture
def meshca(tmp_path: Path, clock: FakeClock) -> FakeMeshca:
    return FakeMeshca(CertificateAuthority.init(tmp_path / "ca", CaSettings(TRUST_DOMAIN, leaf_ttl_default=TTL), clock))


@pytest.fixture
def root(socket_dir: Path) -> Path:
    path = socket_dir / "w"
    path.mkdir()
    return path


def settings(root: Path) -> WorkloadsDirSettings:
    return WorkloadsDirSettings(root, 0o660, None, timedelta(seconds=1))


async def test_directories_come_and_go_and_endpoint_changes_reregister(root: Path, clock: FakeClock) -> None:
    host = RecordingHost()
    directory = WorkloadDirectory(settings(root), host, clock, logging.getLogger(LOG))
    await directory.scan_once()
    assert host.calls == []
    (root / "pending").mkdir()  # a directory without a token is not a workload (yet)
    add_dir(root, "a", endpoints="endpoints:\n  - {service: echo, address: 10.0.0.5, port: 15006}\n")
    await directory.scan_once()
    ((kind, name, added),) = host.calls
    assert (kind, name) == ("add", "a") and isinstance(added, WorkloadSettings)
    assert added.socket == root / "a" / "sds.sock" and added.socket_mode == 0o660 and added.token_no_symlink
    assert added.endpoints == (Endpoint("echo", "10.0.0.5", 15006),)
    await directory.scan_once()
    assert len(host.calls) == 1  # nothing changed: nothing done
    (root / "a" / "endpoints.yaml").write_text("endpoints: []\n")
    await directory.scan_once()
    assert host.calls[-1] == ("endpoints", "a", ())
    (root / "a" / "token").unlink()
    await directory.scan_once()
    assert host.calls[-1] == ("remove", "a", None) and directory.running == {}
    add_dir(root, "b")
    await directory.scan_once()
    for path in (root / "b").iterdir():
        path.unlink()
    (root / "b").rmdir()
    await directory.scan_once()
    assert [c[:2] for c in host.calls[-2:]] == [("add", "b"), ("remove", "b")]


@pytest.mark.parametrize(("make", "message"), [
    (lambda d, other: (d / "token").symlink_to(other), "token: cannot read it (is a symbolic link (not followed here))"),
    (lambda d, other: os.mkfifo(d / "token"), "token: cannot read it (is not a regular file)"),
    (lambda d, other: (d / "token").write_bytes(b"x" * 70000), "token: cannot read it (is larger than 65536 bytes)"),
    (lambda d, other: (d / "token").write_text("\n"), "token: empty"),
    (lambda d, other: ((d / "endpoints.yaml").write_text("endpoints:\n  - {service: a, address: b, port: 0}\n"),
                       (d / "token").write_text("frontend:1")),
     "endpoints.yaml: endpoints[0].port: 0 is not a port (1..65535)"),
    (lambda d, other: ((d / "endpoints.yaml").symlink_to(other), (d / "token").write_text("frontend:1")),
     "endpoints.yaml: cannot read it (is a symbolic link (not followed here))"),
])
async def test_a_bad_directory_is_one_line_naming_it_retried_and_the_others_unaffected(
    root: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture, make: object, message: str
) -> None:
    other = root.parent / "someone-elses-token"
    other.write_text("backend:1")
    host = RecordingHost()
    directory = WorkloadDirectory(settings(root), host, clock, logging.getLogger(LOG))
    (root / "bad").mkdir()
    make(root / "bad", other)  # type: ignore[operator]
    add_dir(root, "good")
    with caplog.at_level(logging.INFO, LOG):
        await directory.scan_once()
        await directory.scan_once()
        await directory.scan_once()
    assert [c[:2] for c in host.calls] == [("add", "good")]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"workload directory {root / 'bad'}/{message}; retried every 1 s"]
    assert "backend:1" not in caplog.text and "frontend:1" not in caplog.text  # never a token in the log
    for path in (root / "bad").iterdir():
        path.unlink()
    (root / "bad" / "token").write_text("frontend:2")
    await directory.scan_once()
    assert [c[:2] for c in host.calls] == [("add", "good"), ("add", "bad")]


async def test_a_socket_that_cannot_be_served_is_retried(root: Path, clock: FakeClock,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    host = RecordingHost()
    host.refuse = f"socket {root}/a/sds.sock: exists and is not a socket; remove it or choose another path"
    directory = WorkloadDirectory(settings(root), host, clock, logging.getLogger(LOG))
    add_dir(root, "a")
    with caplog.at_level(logging.ERROR, LOG):
        await directory.scan_once()
        await directory.scan_once()
    assert [r.getMessage() for r in caplog.records] == [f"workload directory {host.refuse}; retried every 1 s"]
    host.refuse = None
    await directory.scan_once()
    assert [c[:2] for c in host.calls] == [("add", "a")]


async def test_an_expired_token_stops_the_workload_and_a_configured_name_is_refused(
    root: Path, clock: FakeClock
) -> None:
    """A pod deleted while its enroll sidecar could not clean up: nothing refreshes the token any more."""
    host = RecordingHost()
    directory = WorkloadDirectory(settings(root), host, clock, logging.getLogger(LOG), reserved=["static"])
    add_dir(root, "a", token=jwt_like("frontend", clock().timestamp() + 60))
    add_dir(root, "static")
    await directory.scan_once()
    assert [c[:2] for c in host.calls] == [("add", "a")]
    assert "is a configured workload's" in directory.problems["static"]
    clock.advance(61)
    await directory.scan_once()
    assert [c[:2] for c in host.calls] == [("add", "a"), ("remove", "a")]
    assert "expired at" in directory.problems["a"]
    assert token_expiry(b"not a jwt") is None


def test_read_workload_refuses_a_socket_path_too_long(socket_dir: Path, clock: FakeClock) -> None:
    long_root = socket_dir / ("d" * 90)
    long_root.mkdir()
    add_dir(long_root, "workload")
    found = read_workload(settings(long_root), long_root / "workload", clock())
    assert isinstance(found, Problem) and "longer than a Unix socket path may be (107 bytes)" in found.line


async def forever(_: float) -> None:
    await asyncio.Event().wait()


async def test_the_node_agent_serves_a_discovered_workload_and_drops_it_when_its_token_goes(
    root: Path, tmp_path: Path, meshca: FakeMeshca, clock: FakeClock
) -> None:
    (tmp_path / "ca.pem").write_text("unused: the fake meshca signs")
    agent = NodeAgent(
        AgentSettings((("127.0.0.1", 1),), "localhost", tmp_path / "ca.pem", (), workloads_dir=settings(root)),
        clock, logging.getLogger(LOG), signer=meshca, sleep=forever,
    )
    await agent.start()
    try:
        assert agent.directory is not None
        directory = add_dir(root, "a")
        await agent.directory.scan_once()
        await agent.wait_served(5)
        (identity,) = agent.identities
        sock = directory / "sds.sock"
        assert stat.S_ISSOCK(sock.lstat().st_mode) and stat.S_IMODE(sock.lstat().st_mode) == 0o660
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(sock))  # served
        probe.close()
        snapshot = agent.cache.get("a")
        assert snapshot is not None and DEFAULT_CERT_SECRET in snapshot.of_type(ResourceType.SECRET).resources
        assert meshca.tokens == ["frontend:1"]

        # Token rotation: the next CSR reads the new token; a symlink put in its place is not followed.
        tmp = directory / ".token.new"
        tmp.write_text("frontend:2")
        tmp.rename(directory / "token")
        await identity.attempt()
        assert meshca.tokens[-1] == "frontend:2"
        (directory / "token").unlink()
        (directory / "token").symlink_to(tmp_path / "ca.pem")
        failures = identity.failures
        await identity.attempt()
        assert identity.failures == failures + 1 and meshca.tokens[-1] == "frontend:2"

        (directory / "token").unlink()
        await agent.directory.scan_once()
        assert not sock.exists() and agent.identities == [] and agent.sockets == []
        assert agent.cache.get("a") is None  # the key is no longer held
        assert [s.name for s in agent.status()] == []
    finally:
        await agent.stop()


def test_settings_take_workloads_dir_as_a_path_or_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "root.pem").write_text("x")
    (tmp_path / "w").mkdir()
    config = tmp_path / "agent.yaml"
    config.write_text("meshca: ['127.0.0.1:15010']\nserver_name: m\nca: root.pem\nworkloads_dir: w\n")
    loaded = load_agent_settings(config)
    assert loaded.workloads == () and loaded.workloads_dir == WorkloadsDirSettings(tmp_path / "w")
    config.write_text("meshca: ['127.0.0.1:15010']\nserver_name: m\nca: root.pem\n"
                      "workloads_dir: {path: w, socket_mode: '0660', interval: 2s}\n")
    loaded = load_agent_settings(config)
    assert loaded.workloads_dir == WorkloadsDirSettings(tmp_path / "w", 0o660, None, timedelta(seconds=2))
    for text, message in [
        ("workloads_dir: nope\n", f"agent.yaml: workloads_dir: directory '{tmp_path / 'nope'}' does not exist"),
        ("workloads_dir: {path: w, socket_mode: '0644'}\n", "workloads_dir.socket_mode: '0644' is not"),
        ("workloads_dir: {path: w, interval: 0s}\n", "workloads_dir.interval: must be positive"),
        ("workloads_dir: {path: w, every: 1s}\n", "workloads_dir.every: unknown field"),
        ("", "workloads: is required"),
    ]:
        config.write_text("meshca: ['127.0.0.1:15010']\nserver_name: m\nca: root.pem\n" + text)
        with pytest.raises(ConfigError) as raised:
            load_agent_settings(config)
        assert message in str(raised.value), str(raised.value)
