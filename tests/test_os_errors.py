"""OS errors are one line naming the file or setting; a no-op CA check writes nothing; failed CA checks
back off (issue 11, defect 11)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fakes import FakeClock, RecordingPublisher, RecordingRotator

from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.ca.state import LOCK_FILE
from meshca.cli.main import build_parser, main
from meshca.clock import system_clock
from meshca.files import write_atomic
from meshca.sds.rotation import CaWatcher, RotationSettings

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ROOT = os.geteuid() == 0
OTHER_UID = 65534  # nobody: as root, the tests act as this user so that file modes bind


def meshca_command() -> list[str]:
    script = Path(sys.executable).parent / "meshca"
    return [str(script)] if script.exists() else [sys.executable, "-m", "meshca.cli.main"]


def meshca(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*meshca_command(), *args], capture_output=True, text=True, timeout=60)


def meshca_as_other_user(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`meshca ARGS` in this process as the unprivileged user (a subprocess could not run as it here:
    the interpreter may live under root's 0700 home)."""
    capsys.readouterr()
    build_parser()  # imports what the command needs now: the interpreter's files may be unreadable to that user
    with unprivileged():
        code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A temp dir the unprivileged user can reach (pytest's tmp_path is 0700 when tests run as root)."""
    path = Path(tempfile.mkdtemp(prefix="meshca-test-"))
    path.chmod(0o755)
    yield path
    for parent, dirs, _ in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(parent, name), 0o755)
    shutil.rmtree(path)


def give_away(path: Path) -> None:
    """As root, hand `path` (recursively) to the unprivileged user; otherwise it is ours already."""
    if not ROOT:
        return
    for parent, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(parent, name), OTHER_UID, OTHER_UID)
    os.chown(path, OTHER_UID, OTHER_UID)


@contextmanager
def unprivileged() -> Iterator[None]:
    """In-process: act as the unprivileged user (root: seteuid; a normal user already is one)."""
    if not ROOT:
        yield
        return
    os.seteuid(OTHER_UID)
    try:
        yield
    finally:
        os.seteuid(0)


def read_only_state(shared_dir: Path, clock: FakeClock, *, keep_lock: bool = True) -> Path:
    state = shared_dir / "ca"
    CertificateAuthority.init(state, CaSettings("ro.test"), clock)
    if not keep_lock:
        (state / LOCK_FILE).unlink()
    give_away(state)
    if keep_lock:
        (state / LOCK_FILE).chmod(0o400)
    state.chmod(0o555)  # like a read-only mount: nothing in it can be written
    return state


def test_no_op_ca_check_on_a_read_only_state_dir_writes_nothing_and_fails_nothing(shared_dir: Path) -> None:
    clock = FakeClock(T0)
    state = read_only_state(shared_dir, clock)
    before = {p.name: p.stat().st_mtime_ns for p in state.iterdir()}
    with unprivileged():
        ca = CertificateAuthority.load(state, clock)
        publisher, rotator = RecordingPublisher(), RecordingRotator()
        log = logging.getLogger("t")
        watcher = CaWatcher(ca, publisher, rotator, RotationSettings(), clock, log)  # type: ignore[arg-type]
        for _ in range(5):
            clock.now += timedelta(seconds=1)
            watcher.check()
    assert watcher.failures() == 0
    assert {p.name: p.stat().st_mtime_ns for p in state.iterdir()} == before


@pytest.mark.parametrize("keep_lock", [True, False], ids=["lock-file", "no-lock-file"])
def test_ca_status_works_on_a_read_only_state_dir(
    shared_dir: Path, keep_lock: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    state = read_only_state(shared_dir, FakeClock(datetime.now(UTC)), keep_lock=keep_lock)
    code, out, err = meshca_as_other_user(capsys, "ca", "status", "--state-dir", str(state))
    assert code == 0, err
    assert "trust domain ro.test" in out and err == ""


def test_a_ca_change_on_a_read_only_state_dir_fails_in_one_line_naming_the_file(
    shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = FakeClock(T0)
    state = read_only_state(shared_dir, clock)
    with unprivileged():
        ca = CertificateAuthority.load(state, clock)
    code, _, err = meshca_as_other_user(capsys, "ca", "rotate", "--intermediate", "--state-dir", str(state))
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith("meshca: error: ") and str(state) in line and "Traceback" not in line
    assert ca.generation == 1


class FakeFullDiskCa:
    """Fake of a CA whose due transition hits a full disk (ENOSPC cannot be produced on demand)."""

    active_intermediate_id = "i1"

    def __init__(self) -> None:
        self.ticks = 0
        self.full = True

    def trust_bundle_pem(self) -> bytes:
        return b"bundle"

    def reload_if_changed(self) -> bool:
        return False

    def tick(self, now: datetime | None = None) -> list[object]:
        self.ticks += 1
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/var/lib/meshca/intermediate-0123-key.pem")
        return []


def test_failed_ca_checks_back_off_and_log_once_per_step_naming_the_file(caplog: pytest.LogCaptureFixture) -> None:
    clock, ca = FakeClock(T0), FakeFullDiskCa()
    settings = RotationSettings(ca_check_interval=timedelta(seconds=0.5))
    publisher, rotator = RecordingPublisher(), RecordingRotator()
    watcher = CaWatcher(ca, publisher, rotator, settings, clock, logging.getLogger("t.ca"))  # type: ignore[arg-type]
    attempts = []
    with caplog.at_level(logging.INFO, "t.ca"):
        for _ in range(int(600 / 0.5)):  # ten minutes of ticks every 0.5 s
            before = ca.ticks
            watcher.check()
            if ca.ticks != before:
                attempts.append(clock.now - T0)
            clock.now += timedelta(seconds=0.5)
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[:6] == [timedelta(seconds=s) for s in (1, 2, 4, 8, 16, 32)]
    assert max(gaps) == timedelta(seconds=60) and all(g <= timedelta(seconds=60) for g in gaps)
    assert watcher.failures() == len(attempts) < 20
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == len(attempts)
    assert all("/var/lib/meshca/intermediate-0123-key.pem: No space left on device" in m for m in errors)
    assert "next try in 1m" in errors[-1] and "[Errno" not in errors[-1]
    ca.full = False
    clock.now += timedelta(seconds=60)
    with caplog.at_level(logging.INFO, "t.ca"):
        watcher.check()
    assert watcher.failures() == len(attempts)
    assert "works again" in caplog.records[-1].getMessage()


def test_write_atomic_names_the_file_not_its_temp_name(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "key.pem"
    with pytest.raises(FileNotFoundError) as info:
        write_atomic(target, b"x", 0o600)
    assert info.value.filename == str(target)


def test_unreadable_server_tls_key_is_one_line_naming_the_setting_and_file(tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    assert meshca("dev", "init", "--dir", str(directory)).returncode == 0
    key = directory / "server-key.pem"
    if ROOT:  # root reads any file: make it unreadable another way
        key.unlink()
        key.mkdir()
    else:
        key.chmod(0)
    result = meshca("serve", "--config", str(directory / "meshca.yaml"))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    reason = "Is a directory" if ROOT else "Permission denied"
    assert line == f"meshca: error: {directory / 'meshca.yaml'}: tls.private_key: cannot read {key}: {reason}"


def test_dev_token_into_a_closed_pipe_is_silent(tmp_path: Path) -> None:
    assert meshca("dev", "init", "--dir", str(tmp_path / "dev")).returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -c0`: the reader is gone before the token is written
    try:
        result = subprocess.run(
            [*meshca_command(), "dev", "token", "--dir", str(tmp_path / "dev"), "--ns", "a", "--sa", "b"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode != 0


def _can_mount_read_only() -> bool:
    if not ROOT or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


def meshca_on_read_only_mount(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`meshca ARGS` in a private mount namespace where `directory` is a read-only bind mount (EROFS, as
    a read-only volume: it binds root too)."""
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(directory), *meshca_command(), *args],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.skipif(not _can_mount_read_only(), reason="needs root and mount namespaces for a read-only mount")
@pytest.mark.parametrize("keep_lock", [True, False], ids=["lock-file", "no-lock-file"])
def test_ca_status_and_rotate_on_a_read_only_file_system(tmp_path: Path, keep_lock: bool) -> None:
    state = tmp_path / "ca"
    CertificateAuthority.init(state, CaSettings("ro.test"), system_clock)
    if not keep_lock:
        (state / LOCK_FILE).unlink()
    state.chmod(0o1777)  # like a Kubernetes Secret volume: the mode does not matter on a read-only mount
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    status = meshca_on_read_only_mount(state, "ca", "status", "--state-dir", str(state))
    assert status.returncode == 0, status.stderr
    assert "trust domain ro.test" in status.stdout and status.stderr == ""
    rotate = meshca_on_read_only_mount(state, "ca", "rotate", "--intermediate", "--state-dir", str(state))
    assert rotate.returncode == 2
    (line,) = rotate.stderr.splitlines()
    assert line.startswith(f"meshca: error: {state}") and "Read-only file system" in line and "[Errno" not in line
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before


@pytest.mark.skipif(not _can_mount_read_only(), reason="needs root and mount namespaces for a small tmpfs")
def test_a_ca_change_on_a_full_disk_names_the_file_it_could_not_write(tmp_path: Path) -> None:
    """A real full disk: a 1 MiB tmpfs in a private mount namespace, filled up before `ca rotate`."""
    command = " ".join(f"'{part}'" for part in meshca_command())
    script = (
        'mount -t tmpfs -o size=1m tmpfs "$0" && '
        f'{command} ca init --state-dir "$0/ca" --trust-domain full.test >/dev/null && '
        '{ dd if=/dev/zero of="$0/filler" bs=4k 2>/dev/null; true; } && '
        f'exec {command} ca rotate --intermediate --state-dir "$0/ca"'
    )
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"meshca: error: {tmp_path}/ca/intermediate-")
    assert line.endswith(": No space left on device") and "[Errno" not in line
