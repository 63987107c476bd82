"""CA keys open to other users, a state directory others may write, and CA changes by a user who does not
own the state directory are refused in one line saying what to do (issue 11, defect 12)."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from meshca.ca.api import CaSettings, CaStateError
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock

ROOT = os.geteuid() == 0
OTHER_UID = 65534


def meshca(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "meshca"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "meshca.cli.main"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "ca"
    CertificateAuthority.init(path, CaSettings("perm.test"), system_clock)
    return path


def contents(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=oct)
def test_a_ca_key_readable_by_others_is_refused_naming_file_mode_and_fix(state: Path, mode: int) -> None:
    key = next(state.glob("intermediate-*-key.pem"))
    if ROOT:
        os.chown(key, OTHER_UID, OTHER_UID)  # the service user's key (a root-owned one may be group-readable)
    key.chmod(mode)
    with pytest.raises(CaStateError) as info:
        CertificateAuthority.load(state, system_clock)
    assert str(info.value) == (
        f"{key}: CA private key has mode {mode:04o}, open to other users; run `chmod 600 {key}`"
    )
    result = meshca("ca", "status", "--state-dir", str(state))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"meshca: error: {info.value}"]


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757], ids=oct)
def test_a_state_directory_others_may_write_is_refused(state: Path, mode: int) -> None:
    state.chmod(mode)
    with pytest.raises(CaStateError) as info:
        CertificateAuthority.load(state, system_clock)
    assert str(info.value) == (
        f"state directory {state} is writable by group or others (mode 0{mode:o}); "
        f"run `chmod go-w {state}` (meshca creates it 0700)"
    )


def test_a_state_directory_others_may_read_is_accepted(state: Path) -> None:
    state.chmod(0o755)  # keys stay 0600; certificates and ca.json are public anyway
    assert CertificateAuthority.load(state, system_clock).trust_domain == "perm.test"


def _give_away(path: Path) -> None:
    for parent, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(parent, name), OTHER_UID, OTHER_UID)
    os.chown(path, OTHER_UID, OTHER_UID)


def _owner_hint() -> str:
    try:
        name = pwd.getpwuid(OTHER_UID).pw_name
    except KeyError:
        name = f"#{OTHER_UID}"
    return f"run this as that user (e.g. sudo -u {name} meshca ...)"


@pytest.mark.skipif(not ROOT, reason="needs root to hand the state directory to another user")
def test_a_ca_change_by_a_user_who_does_not_own_the_state_directory_is_refused(state: Path) -> None:
    _give_away(state)
    before = contents(state)
    result = meshca("ca", "rotate", "--intermediate", "--state-dir", str(state))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"meshca: error: state directory {state} is owned by uid {OTHER_UID}; {_owner_hint()}"
    ]
    assert contents(state) == before
    assert all(p.stat().st_uid == OTHER_UID for p in state.iterdir())  # no root-owned file left behind
    # reading is fine for anyone who can read
    status = meshca("ca", "status", "--state-dir", str(state))
    assert status.returncode == 0, status.stderr


@pytest.mark.skipif(not ROOT, reason="needs root to hand the state directory to another user")
def test_ca_init_into_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    os.chown(empty, OTHER_UID, OTHER_UID)
    result = meshca("ca", "init", "--state-dir", str(empty), "--trust-domain", "perm.test")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"meshca: error: state directory {empty} is owned by uid {OTHER_UID}; {_owner_hint()}"
    ]
    assert list(empty.iterdir()) == [] and (empty.stat().st_mode & 0o777) == 0o755


@pytest.mark.skipif(not ROOT, reason="needs root to make root-owned keys shared with a group")
def test_a_root_owned_key_may_be_readable_by_its_group_only(state: Path) -> None:
    """Like PostgreSQL's rule: 0440 root:meshca is a root-managed key (a Kubernetes Secret volume with fsGroup)."""
    key = next(state.glob("intermediate-*-key.pem"))
    os.chown(key, 0, OTHER_UID)
    key.chmod(0o440)
    CertificateAuthority.load(state, system_clock)
    for mode in (0o444, 0o460):
        key.chmod(mode)
        with pytest.raises(CaStateError, match=f"mode {mode:04o}, open to other users"):
            CertificateAuthority.load(state, system_clock)
