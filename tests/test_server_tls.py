"""meshca's own server certificate: renewed (or re-read from its files) and served to new connections
without a restart."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshca.app import MeshcaApp
from meshca.ca.crypto import CertificateInfo, certificate_issued_by, parse_certificate_pem, split_pem_certificates
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock
from meshca.sds.rotation import RotationSettings
from meshca.sds.server_tls import (
    FileServerCertificate,
    IssuedServerCertificate,
    ServerCredentials,
    ServerTlsError,
    ServingCertificate,
    issue_server_credentials,
)
from tests.fakes import FakeClock
from tests.meshca_harness import make_ca

NAMES = ["localhost", "127.0.0.1"]
FAST_CHECKS = RotationSettings(ca_check_interval=timedelta(milliseconds=50))


def served_certificate(port: int) -> CertificateInfo:
    """The leaf a brand-new TLS connection is handed (no verification: only read)."""
    return parse_certificate_pem(ssl.get_server_certificate(("127.0.0.1", port), timeout=5).encode())


async def wait_for_served(port: int, accept: Callable[[CertificateInfo], bool], timeout: float = 10.0) -> CertificateInfo:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await asyncio.to_thread(served_certificate, port)
        if accept(info) or asyncio.get_running_loop().time() > deadline:
            return info
        await asyncio.sleep(0.05)


async def health_check(port: int, root_pem: bytes) -> int:
    """A verified gRPC call over a new channel (root_pem as the only trust anchor)."""
    credentials = grpc.ssl_channel_credentials(root_certificates=root_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(response.status)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[tuple[MeshcaApp, CertificateAuthority]]:
    ca = make_ca(tmp_path)
    meshca = MeshcaApp(ca, [], system_clock, logging.getLogger("meshca.test"), rotation=FAST_CHECKS)
    try:
        yield meshca, ca
    finally:
        await meshca.stop(0)


async def test_issued_certificate_is_renewed_at_two_thirds_and_new_connections_get_it(
    app: tuple[MeshcaApp, CertificateAuthority],
) -> None:
    meshca, ca = app
    clock = FakeClock.at_real_now()
    certificate = IssuedServerCertificate(ca, NAMES, timedelta(hours=1), clock, logging.getLogger("meshca.test.tls"))
    port = await meshca.start("127.0.0.1", 0, certificate)
    first = await asyncio.to_thread(served_certificate, port)
    assert first.serial_number == certificate.serial_number
    lifetime = first.not_after - clock()
    assert timedelta(minutes=39) < certificate.renew_at - clock() <= lifetime * 2 / 3

    credentials = grpc.ssl_channel_credentials(root_certificates=ca.trust_bundle_pem())
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as old_channel:
        stub = health_pb2_grpc.HealthStub(old_channel)
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)

        clock.now = certificate.renew_at - timedelta(seconds=1)
        await asyncio.sleep(0.3)  # several checks by the job: not due yet
        assert (await asyncio.to_thread(served_certificate, port)).serial_number == first.serial_number

        clock.now = certificate.renew_at
        renewed = await wait_for_served(port, lambda info: info.serial_number != first.serial_number)
        assert renewed.serial_number != first.serial_number
        assert renewed.serial_number == certificate.serial_number
        assert renewed.not_after >= first.not_after  # the CA stamps with its own (real) clock, in whole seconds
        assert await health_check(port, ca.trust_bundle_pem()) == health_pb2.HealthCheckResponse.SERVING
        # The connection opened before the renewal keeps working.
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)


async def test_a_new_signing_intermediate_renews_the_certificate_at_once(
    app: tuple[MeshcaApp, CertificateAuthority],
) -> None:
    meshca, ca = app
    certificate = IssuedServerCertificate(ca, NAMES, timedelta(hours=1), FakeClock.at_real_now(),
                                          logging.getLogger("meshca.test.tls"))
    port = await meshca.start("127.0.0.1", 0, certificate)
    old_issuer = (await asyncio.to_thread(served_certificate, port)).issuer
    ca.rotate_intermediate(now=True)  # what CaWatcher's tick or `meshca ca rotate` does
    renewed = await wait_for_served(port, lambda info: info.issuer != old_issuer)
    assert renewed.issuer != old_issuer
    chain = split_pem_certificates(certificate.current.certificate_chain_pem)
    assert chain[1] == ca.intermediate_certificate_pem  # the chain served is the new intermediate's
    assert await health_check(port, ca.trust_bundle_pem()) == health_pb2.HealthCheckResponse.SERVING


def write_pair(directory: Path, credentials: ServerCredentials) -> None:
    """Replace both files at once, the way the kubelet swaps a Secret volume's ..data symlink."""
    staging = directory.parent / f"{directory.name}.new"
    staging.mkdir(exist_ok=True)
    (staging / "tls.crt").write_bytes(credentials.certificate_chain_pem)
    (staging / "tls.key").write_bytes(credentials.private_key_pem)
    for name in ("tls.crt", "tls.key"):
        os.replace(staging / name, directory / name)


async def test_operator_files_are_read_again_when_they_change(
    app: tuple[MeshcaApp, CertificateAuthority], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    meshca, ca = app
    files = tmp_path / "tls"
    files.mkdir()
    first = issue_server_credentials(ca, NAMES, timedelta(hours=1))
    write_pair(files, first)
    certificate = FileServerCertificate(files / "tls.crt", files / "tls.key", logging.getLogger("meshca.test.tls"))
    port = await meshca.start("127.0.0.1", 0, certificate)
    first_serial = parse_certificate_pem(first.certificate_chain_pem).serial_number
    assert (await asyncio.to_thread(served_certificate, port)).serial_number == first_serial

    second = issue_server_credentials(ca, NAMES, timedelta(hours=2))
    second_serial = parse_certificate_pem(second.certificate_chain_pem).serial_number
    write_pair(files, second)
    assert (await wait_for_served(port, lambda i: i.serial_number == second_serial)).serial_number == second_serial

    # A key that does not belong to the certificate: logged once, the last good pair stays.
    third = issue_server_credentials(ca, NAMES, timedelta(hours=3))
    caplog.set_level(logging.INFO, logger="meshca.test.tls")
    (files / "tls.key").write_bytes(third.private_key_pem)
    await asyncio.sleep(0.3)
    assert (await asyncio.to_thread(served_certificate, port)).serial_number == second_serial
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"server certificate files changed but cannot be used; serving the previous one: tls.private_key: "
        f"{files / 'tls.key'} does not belong to the certificate in {files / 'tls.crt'}"
    ]
    assert "PRIVATE KEY" not in caplog.text
    # The certificate follows: the pair is whole again and served.
    (files / "tls.crt").write_bytes(third.certificate_chain_pem)
    third_serial = parse_certificate_pem(third.certificate_chain_pem).serial_number
    assert (await wait_for_served(port, lambda i: i.serial_number == third_serial)).serial_number == third_serial


def test_a_broken_pair_at_start_names_the_setting(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    one, other = (issue_server_credentials(ca, NAMES, timedelta(hours=1)) for _ in range(2))
    (tmp_path / "tls.crt").write_bytes(one.certificate_chain_pem)
    (tmp_path / "tls.key").write_bytes(other.private_key_pem)
    with pytest.raises(ServerTlsError) as info:
        FileServerCertificate(tmp_path / "tls.crt", tmp_path / "tls.key", logging.getLogger("meshca.test.tls"))
    assert info.value.field == "tls.private_key"
    (tmp_path / "tls.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ServerTlsError) as info:
        FileServerCertificate(tmp_path / "tls.crt", tmp_path / "tls.key", logging.getLogger("meshca.test.tls"))
    assert str(info.value) == f"tls.private_key: {tmp_path / 'tls.key'} is not a PEM private key"


class UnavailableCa:
    """Fake: a CA that has started refusing to issue (e.g. Vault down); the real one issued the first."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.down = False

    def issue_server_certificate(self, dns_names: list[str], ip_addresses: list[str], ttl: timedelta | None = None):  # type: ignore[no-untyped-def]
        if self.down:
            raise RuntimeError("CA unavailable")
        return self.ca.issue_server_certificate(dns_names, ip_addresses, ttl)

    @property
    def active_intermediate_id(self) -> str:
        return self.ca.active_intermediate_id

    def trust_bundle_pem(self) -> bytes:
        return self.ca.trust_bundle_pem()


def test_a_failed_renewal_keeps_the_certificate_and_retries_with_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = UnavailableCa(make_ca(tmp_path))
    clock = FakeClock.at_real_now()
    certificate = IssuedServerCertificate(ca, NAMES, timedelta(hours=1), clock, logging.getLogger("meshca.test.tls"))
    serial = certificate.serial_number
    ca.down = True
    clock.now = certificate.renew_at
    certificate.check()
    certificate.check()  # inside the backoff: not tried again, not logged again
    assert certificate.serial_number == serial
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    ca.down = False
    clock.advance(2)
    certificate.check()
    assert certificate.serial_number != serial and certificate.replacements == 1


def test_plain_credentials_are_served_as_they_are(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    credentials = issue_server_credentials(ca, NAMES, timedelta(hours=1))
    serving = ServingCertificate(credentials, logging.getLogger("meshca.test.tls"))
    serving.check()
    assert serving.current == credentials and serving.replacements == 0
    assert "PRIVATE KEY" not in repr(credentials)


def test_a_certificate_under_a_new_root_is_served_only_once_proxies_can_hold_that_root(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    clock = FakeClock.at_real_now()
    certificate = IssuedServerCertificate(ca, NAMES, timedelta(hours=1), clock, logging.getLogger("meshca.test.tls"),
                                          trust_propagation=timedelta(minutes=10))
    serial = certificate.serial_number
    ca.rotate_root(now=True)  # prepared and activated at once: proxies' synced bundles lack the new root yet
    new_root = split_pem_certificates(ca.trust_bundle_pem())[0]
    certificate.check()
    assert certificate.serial_number == serial and certificate.held_until is not None
    assert certificate.held_until - clock() == timedelta(minutes=10)
    clock.advance(9 * 60)
    certificate.check()
    assert certificate.serial_number == serial
    clock.advance(60)
    certificate.check()
    assert certificate.serial_number != serial and certificate.held_until is None
    chain = split_pem_certificates(certificate.current.certificate_chain_pem)
    assert chain[1] == ca.intermediate_certificate_pem and certificate_issued_by(chain[1], new_root)
    ca.rotate_intermediate(now=True)  # under the same root: served at once
    certificate.check()
    assert split_pem_certificates(certificate.current.certificate_chain_pem)[1] == ca.intermediate_certificate_pem


def test_a_held_certificate_is_served_when_the_current_one_nears_its_end(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    clock = FakeClock.at_real_now()
    certificate = IssuedServerCertificate(ca, NAMES, timedelta(minutes=10), clock, logging.getLogger("meshca.test.tls"),
                                          trust_propagation=timedelta(hours=1))
    serial = certificate.serial_number
    ca.rotate_root(now=True)
    certificate.check()
    assert certificate.held_until is not None
    assert certificate.held_until <= certificate.not_before + (certificate.not_after - certificate.not_before) * 0.9
    clock.now = certificate.held_until
    certificate.check()
    assert certificate.serial_number != serial
