"""The node agent without Envoy: settings, renewal and backoff on a fake clock (a real CA signs), the Unix socket."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from fakes import FakeClock

from meshca.agent.csr import SignedCertificate, SignFailed
from meshca.agent.sds import SocketError, WorkloadSocket, check_socket_path
from meshca.agent.settings import WorkloadSettings, load_agent_settings
from meshca.agent.workload import Retry, WorkloadIdentity
from meshca.ca import crypto
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.fields import ConfigError
from meshca.identity.spiffe import SpiffeId
from meshca.mesh.resources import DEFAULT_CERT_SECRET, ROOT_CA_SECRET
from meshca.sds.rotation import RenewalPolicy
from meshca.xds.cache import SnapshotCache
from meshca.xds.snapshot import ResourceType

TRUST_DOMAIN = "mesh.test"
TTL = timedelta(minutes=10)


class FakeMeshca:
    """Stands in for meshca's CSR service over the network (a real CA signs); `down` simulates an outage."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.down = False
        self.tokens: list[str] = []
        self.calls = 0

    async def sign(self, csr_pem: bytes, token: str, ttl: timedelta | None = None) -> SignedCertificate:
        self.calls += 1
        if self.down:
            raise SignFailed("meshca at 127.0.0.1:1: UNAVAILABLE: connection refused")
        self.tokens.append(token)
        spiffe_id = SpiffeId.for_service_account(TRUST_DOMAIN, "shop", token.split(":")[0])
        issued = self.ca.sign_csr(csr_pem, spiffe_id, ttl)
        return SignedCertificate(
            issued.chain_pem, self.ca.trust_bundle_pem(), spiffe_id.uri, f"{issued.serial_number:x}",
            issued.not_before, issued.not_after,
        )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock.at_real_now()


@pytest.fixture
def meshca(tmp_path: Path, clock: FakeClock) -> FakeMeshca:
    settings = CaSettings(trust_domain=TRUST_DOMAIN, leaf_ttl_default=TTL)
    return FakeMeshca(CertificateAuthority.init(tmp_path / "ca", settings, clock))


def workload(tmp_path: Path, token: str = "frontend:1") -> WorkloadSettings:
    token_file = tmp_path / "frontend.jwt"
    token_file.write_text(token + "\n")
    return WorkloadSettings("frontend", token_file, tmp_path / "frontend.sock")


def identity(tmp_path: Path, meshca: FakeMeshca, clock: FakeClock, cache: SnapshotCache) -> WorkloadIdentity:
    return WorkloadIdentity(
        workload(tmp_path), meshca, cache, clock, logging.getLogger("test.agent"), RenewalPolicy(),
        Retry(timedelta(seconds=1), timedelta(seconds=30)),
    )


def served_secrets(cache: SnapshotCache) -> dict[str, bytes]:
    snapshot = cache.get("frontend")
    assert snapshot is not None
    return {name: r.payload for name, r in snapshot.of_type(ResourceType.SECRET).resources.items()}


async def test_first_certificate_is_served_with_the_key_made_here(
    tmp_path: Path, meshca: FakeMeshca, clock: FakeClock
) -> None:
    cache = SnapshotCache()
    agent = identity(tmp_path, meshca, clock, cache)
    renew_at = await agent.attempt()
    served = agent.served
    assert served is not None and served.spiffe_id == f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"
    secrets = served_secrets(cache)
    assert set(secrets) == {DEFAULT_CERT_SECRET, ROOT_CA_SECRET}
    assert b"PRIVATE KEY" in secrets[DEFAULT_CERT_SECRET] and b"PRIVATE KEY" not in secrets[ROOT_CA_SECRET]
    leaf = crypto.parse_certificate_pem(crypto.split_pem_certificates(secrets[DEFAULT_CERT_SECRET])[0])
    import hashlib

    assert hashlib.sha256(leaf.public_key.spki_der).hexdigest() == served.key_sha256
    assert meshca.ca.trust_bundle_pem() in secrets[ROOT_CA_SECRET]
    # half the lifetime from receipt ± 10% jitter
    lifetime = served.not_after - clock()
    assert clock() + lifetime * 0.4 <= renew_at <= clock() + lifetime * 0.6
    assert agent.first_served.is_set()


async def test_renewal_makes_a_new_key_and_rereads_the_token(
    tmp_path: Path, meshca: FakeMeshca, clock: FakeClock
) -> None:
    cache = SnapshotCache()
    agent = identity(tmp_path, meshca, clock, cache)
    renew_at = await agent.attempt()
    first = agent.served
    assert first is not None
    agent.settings.token_file.write_text("frontend:2")  # the token rotated on disk
    clock.now = renew_at
    await agent.attempt()
    second = agent.served
    assert second is not None
    assert second.serial_number != first.serial_number and second.key_sha256 != first.key_sha256
    assert meshca.tokens == ["frontend:1", "frontend:2"]


async def test_outage_keeps_serving_backs_off_capped_and_catches_up(
    tmp_path: Path, meshca: FakeMeshca, clock: FakeClock
) -> None:
    cache = SnapshotCache()
    agent = identity(tmp_path, meshca, clock, cache)
    renew_at = await agent.attempt()
    first = agent.served
    assert first is not None
    before = served_secrets(cache)
    meshca.down = True
    clock.now = renew_at
    delays = []
    for _ in range(8):
        next_at = await agent.attempt()
        delays.append((next_at - clock()).total_seconds())
        clock.now = next_at
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert served_secrets(cache) == before  # the old certificate is still served
    assert agent.failures == 8
    meshca.down = False
    await agent.attempt()
    assert agent.served is not None and agent.served.serial_number != first.serial_number
    assert served_secrets(cache) != before


async def test_retries_reach_into_the_hard_zone_and_tighten_there(
    tmp_path: Path, meshca: FakeMeshca, clock: FakeClock
) -> None:
    cache = SnapshotCache()
    agent = identity(tmp_path, meshca, clock, cache)
    await agent.attempt()
    served = agent.served
    assert served is not None
    meshca.down = True
    hard_zone = served.not_after - (served.not_after - served.received_at) * 0.1
    clock.now = hard_zone - timedelta(seconds=5)
    agent._failures_in_row = 10  # a long outage: the backoff is at its cap
    assert await agent.attempt() == hard_zone  # not 30 s later, past the hard zone's start
    clock.now = hard_zone
    next_at = await agent.attempt()
    assert next_at - clock() == (served.not_after - clock()) / 10  # 6 s of the 60 s left


async def test_run_sleeps_until_each_next_attempt(tmp_path: Path, meshca: FakeMeshca, clock: FakeClock) -> None:
    cache = SnapshotCache()
    agent = identity(tmp_path, meshca, clock, cache)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)
        if len(slept) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await agent.run(sleep)
    assert agent.issued == 3 and all(0.4 * 600 <= s <= 0.6 * 600 for s in slept)


async def test_unreadable_token_is_a_failure_naming_the_file(
    tmp_path: Path, meshca: FakeMeshca, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    agent = identity(tmp_path, meshca, clock, SnapshotCache())
    agent.settings.token_file.unlink()
    next_at = await agent.attempt()
    assert next_at - clock() == timedelta(seconds=1) and meshca.calls == 0
    assert f"token_file: {agent.settings.token_file}: No such file or directory" in caplog.text


# --- settings ---------------------------------------------------------------------------------


def write_config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "root.pem").write_text("roots")
    (tmp_path / "f.jwt").write_text("token")
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


GOOD = """\
meshca: ["127.0.0.1:15010", "[::1]:15011"]
server_name: meshca.local
ca: root.pem
workloads:
  - name: frontend
    token_file: f.jwt
    socket: frontend.sock
    socket_mode: 0660
    endpoints:
      - {service: frontend, address: 10.0.0.5, port: 15006}
"""


def test_settings_parse(tmp_path: Path) -> None:
    settings = load_agent_settings(write_config(tmp_path, GOOD))
    assert settings.meshca == (("127.0.0.1", 15010), ("::1", 15011))
    assert settings.ca == tmp_path / "root.pem"
    (w,) = settings.workloads
    assert (w.name, w.socket, w.socket_mode, w.token_file) == ("frontend", tmp_path / "frontend.sock", 0o660, tmp_path / "f.jwt")
    assert w.endpoints[0].port == 15006


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("socket_mode: 0660", 'socket_mode: "0644"'), "workloads[0].socket_mode: '0644' is not"),
        (("token_file: f.jwt", "token_file: nope.jwt"), "workloads[0].token_file: file"),
        (("socket: frontend.sock", "socket: no/such/dir.sock"), "workloads[0].socket: directory"),
        (('"127.0.0.1:15010"', '"127.0.0.1"'), "meshca[0]: '127.0.0.1' is not host:port"),
        (("port: 15006", "port: 0"), "workloads[0].endpoints[0].port: 0 is not a port"),
        (("server_name: meshca.local\n", ""), "server_name: is required"),
        (("    endpoints:", "    colour: red\n    endpoints:"), "workloads[0].colour: unknown field"),
    ],
)
def test_bad_settings_name_file_and_field(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = write_config(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as error:
        load_agent_settings(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("timeout", ["0s", "0", "0ms", "-5"])
def test_a_zero_or_negative_timeout_is_refused_not_replaced_by_the_default(tmp_path: Path, timeout: str) -> None:
    path = write_config(tmp_path, GOOD.replace("server_name: meshca.local\n", f"server_name: meshca.local\ntimeout: {timeout}\n"))
    with pytest.raises(ConfigError) as error:
        load_agent_settings(path)
    assert str(error.value) == f"{path}: timeout: must be positive"


def test_the_timeout_is_the_one_given_or_10_s(tmp_path: Path) -> None:
    assert load_agent_settings(write_config(tmp_path, GOOD)).timeout == timedelta(seconds=10)
    text = GOOD.replace("server_name: meshca.local\n", "server_name: meshca.local\ntimeout: 2500ms\n")
    assert load_agent_settings(write_config(tmp_path, text)).timeout == timedelta(seconds=2.5)


def test_a_socket_given_twice_is_refused(tmp_path: Path) -> None:
    text = GOOD + "  - {name: other, token_file: f.jwt, socket: frontend.sock}\n"
    with pytest.raises(ConfigError, match=r"workloads\[1\]\.socket: .* is given to two workloads"):
        load_agent_settings(write_config(tmp_path, text))


# --- the socket -------------------------------------------------------------------------------


def short_dir() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="agt", dir="/tmp"))  # sun_path is short; pytest's tmp_path may not be


async def test_socket_has_its_mode_and_a_stale_one_is_replaced(tmp_path: Path, clock: FakeClock) -> None:
    directory = short_dir()
    path = directory / "w.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # bound, never listening: what a killed agent leaves
    settings = WorkloadSettings("w", tmp_path / "t", path, socket_mode=0o660)
    served = WorkloadSocket(settings, SnapshotCache(), clock, logging.getLogger("test.agent"))
    await served.start()
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode) and stat.S_IMODE(path.lstat().st_mode) == 0o660
        assert sorted(os.listdir(directory)) == ["w.sock"]  # the staging directory is gone
        with pytest.raises(SocketError, match=f"socket {path}: another process is serving it"):
            check_socket_path(path)
    finally:
        await served.stop()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(SocketError, match="exists and is not a socket"):
        check_socket_path(path)


async def test_cli_refuses_a_socket_a_live_agent_serves_in_one_line(tmp_path: Path, clock: FakeClock) -> None:
    directory = short_dir()
    (tmp_path / "root.pem").write_text("roots")
    (tmp_path / "f.jwt").write_text("token")
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"meshca: ['127.0.0.1:1']\nserver_name: meshca.local\nca: root.pem\n"
        f"workloads:\n  - {{name: w, token_file: f.jwt, socket: {directory}/w.sock}}\n"
    )
    live = WorkloadSocket(WorkloadSettings("w", tmp_path / "f.jwt", directory / "w.sock"), SnapshotCache(), clock,
                          logging.getLogger("test.agent"))
    await live.start()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshca.cli.main", "agent", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        await live.stop()
    lines = stderr.decode().strip().splitlines()
    assert process.returncode == 2
    assert lines == [f"meshca: error: socket {directory}/w.sock: another process is serving it (is another meshca agent running?)"]
