"""`meshca agent enroll`: the workload's token copied into its directory (0600, atomically) and again as it rotates,
its endpoints written for the agent, and everything removed on SIGTERM (as a process)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from meshca.agent.enroll import Enrollment, EnrollSettings, parse_endpoint
from meshca.agent.registration import Endpoint
from meshca.agent.settings import parse_endpoints
from meshca.dev.envoy_process import wait_until
from meshca.fields import read_yaml_mapping

LOG = "test.agent.enroll"
TOKEN = "eyJhbGciOiJub25lIn0.e30.first"


def enrollment(tmp_path: Path, endpoints: tuple[Endpoint, ...] = ()) -> Enrollment:
    source = tmp_path / "projected" / "token"
    source.parent.mkdir(exist_ok=True)
    source.write_text(TOKEN)
    return Enrollment(EnrollSettings(tmp_path / "workloads" / "pod-uid", source, endpoints), logging.getLogger(LOG))


def test_publish_writes_endpoints_then_the_token_0600(tmp_path: Path) -> None:
    (tmp_path / "workloads").mkdir()
    endpoints = (Endpoint("echo", "10.0.0.5", 15006), Endpoint("admin", "10.0.0.5", 9000))
    enroll = enrollment(tmp_path, endpoints)
    old_umask = os.umask(0)
    try:
        enroll.publish()
    finally:
        os.umask(old_umask)
    directory = enroll.settings.directory
    assert stat.S_IMODE((directory / "token").stat().st_mode) == 0o600
    assert (directory / "token").read_text() == TOKEN
    assert stat.S_IMODE((directory / "endpoints.yaml").stat().st_mode) == 0o600
    path = directory / "endpoints.yaml"
    assert parse_endpoints(path, read_yaml_mapping(path)) == endpoints  # what the agent reads back
    assert sorted(p.name for p in directory.iterdir()) == ["endpoints.yaml", "token"]  # no temp file left


def test_the_token_is_copied_again_when_it_changes_by_rename(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    enroll = enrollment(tmp_path)
    enroll.publish()
    token = enroll.token
    first = token.stat().st_ino
    assert enroll.sync_token() is False  # unchanged: not rewritten
    enroll.settings.token_file.write_text(TOKEN.replace("first", "second"))
    assert enroll.sync_token() is True
    assert token.read_text().endswith("second") and token.stat().st_ino != first  # a new file renamed in place
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    token.unlink()  # removed by someone: put back
    assert enroll.sync_token() is True and token.exists()
    enroll.settings.token_file.unlink()
    with caplog.at_level(logging.INFO, LOG):
        assert enroll.sync_token() is False
        assert enroll.sync_token() is False
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"token: {enroll.settings.token_file}: No such file or directory; retrying every 1 s"]
    assert token.read_text().endswith("second")  # the last good copy stays
    assert "first" not in caplog.text and "second" not in caplog.text


def test_withdraw_removes_the_token_endpoints_socket_and_directory(tmp_path: Path) -> None:
    enroll = enrollment(tmp_path, (Endpoint("echo", "10.0.0.5", 15006),))
    enroll.publish()
    (enroll.settings.directory / "sds.sock").touch()
    enroll.withdraw()
    assert not enroll.settings.directory.exists()
    enroll.withdraw()  # again: nothing to do


def test_parse_endpoint() -> None:
    assert parse_endpoint("echo=10.0.0.5:15006") == Endpoint("echo", "10.0.0.5", 15006)
    for bad in ("echo", "=1.2.3.4:5", "echo=1.2.3.4", "echo=1.2.3.4:0"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_enroll_process_follows_rotation_and_cleans_up_on_sigterm(tmp_path: Path) -> None:
    source = tmp_path / "token"
    source.write_text(TOKEN)
    directory = tmp_path / "workloads" / "pod-uid"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "enroll.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "meshca.cli.main", "agent", "enroll", "--dir", str(directory), "--token-file",
             str(source), "--endpoint", "echo=127.0.0.1:15006", "--interval", "50ms"],
            stdout=output, stderr=subprocess.STDOUT, env=env,
        )
    try:
        wait_until(lambda: (directory / "token").exists(), 20, 0.02, "the token copied")
        assert (directory / "token").read_text() == TOKEN
        assert (directory / "endpoints.yaml").exists()
        rotated = TOKEN.replace("first", "rotated")
        staged = tmp_path / "token.new"
        staged.write_text(rotated)
        staged.rename(source)  # as the kubelet swaps a projected token
        wait_until(lambda: (directory / "token").read_text() == rotated, 5, 0.02, "the new token copied")
        agent_socket = socket.socket(socket.AF_UNIX)  # stands in for the agent's SDS socket
        agent_socket.bind(str(directory / "sds.sock"))
        agent_socket.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert not directory.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    text = log.read_text()
    assert "withdrawn from" in text and "first" not in text and "rotated" not in text


def test_enroll_refuses_a_bad_endpoint_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshca.cli.main", "agent", "enroll", "--dir", str(tmp_path / "d"),
         "--token-file", str(tmp_path / "t"), "--endpoint", "echo:15006"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "meshca: error: --endpoint: 'echo:15006' is not SERVICE=ADDRESS:PORT"
    assert not (tmp_path / "d").exists()
