"""End to end with real Envoys under continuous traffic: meshca's own server certificate is renewed (self-issued,
short-lived) or replaced on disk (`tls:` files), proxies keep their xDS connections and new connections get the
new certificate."""

from __future__ import annotations

import socket
import ssl
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from meshca.app import issue_server_credentials
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock
from meshca.dev.demo import Demo, DemoSettings
from meshca.dev.envoy_process import wait_until
from meshca.dev.harness import TrafficLoop
from meshca.dev.material import SERVER_NAMES
from meshca.files import write_atomic

pytestmark = pytest.mark.e2e

TTL = timedelta(seconds=20)


def start_demo(workdir: Path, **settings: object) -> Demo:
    demo = Demo(DemoSettings(check=True, workdir=workdir, cert_ttl=TTL, **settings), sys.stdout, system_clock)  # type: ignore[arg-type]
    try:
        demo.start()
    except BaseException:
        demo.stop()
        raise
    return demo


@pytest.fixture
def self_issued(tmp_path: Path) -> Iterator[Demo]:
    # meshca's own certificate is capped at leaf_ttl_max like every leaf: 30 s, renewed at 2/3 (20 s)
    ca = CaSettings(trust_domain="mesh.local", leaf_ttl_min=timedelta(seconds=10), leaf_ttl_default=TTL,
                    leaf_ttl_max=timedelta(seconds=30))
    demo = start_demo(tmp_path, trust_sync=True, ca_settings=ca)
    yield demo
    demo.stop()


@pytest.fixture
def with_files(tmp_path: Path) -> Iterator[Demo]:
    demo = start_demo(tmp_path)  # `tls:` files written by `meshca dev init`
    yield demo
    demo.stop()


def served(demo: Demo) -> x509.Certificate:
    """The certificate a new connection to meshca gets."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", demo.ports.meshca), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def xds_connections(demo: Demo) -> dict[str, int]:
    return {name: int(envoy.stats()["cluster.meshca_xds.upstream_cx_total"]) for name, envoy in demo.envoys.items()}


def assert_streams_kept(demo: Demo, before: dict[str, int]) -> None:
    assert xds_connections(demo) == before  # no reconnect: the streams outlived the certificate they began with
    for name, envoy in demo.envoys.items():
        stats = envoy.stats()
        assert stats["control_plane.connected_state"] == 1, name
        assert stats.get("cluster.meshca_xds.ssl.fail_verify_error", 0) == 0, name


def new_connection_verifies(demo: Demo, name: str) -> float:
    """Restart a sidecar (a new TLS connection that verifies meshca's new certificate); seconds to connected."""
    start = time.monotonic()
    envoy = demo.restart_envoy(name)
    wait_until(lambda: envoy.stats().get("control_plane.connected_state") == 1, 30, 0.05, f"{name} reconnected")
    return time.monotonic() - start


def test_self_issued_certificate_renews_under_traffic_and_streams_stay(self_issued: Demo) -> None:
    demo = self_issued
    first = served(demo)
    lifetime = (first.not_valid_after_utc - first.not_valid_before_utc).total_seconds()
    assert lifetime <= 30 + 30 / 4  # notBefore backdated by up to a quarter of the life
    before = xds_connections(demo)
    start = time.monotonic()
    with TrafficLoop(demo.one_request) as traffic:
        wait_until(lambda: served(demo).serial_number != first.serial_number, 40, 0.2, "a renewed server certificate")
        renewed_after = time.monotonic() - start
        for _ in range(5):
            assert demo.one_request().ok
    renewed = served(demo)
    assert renewed.not_valid_after_utc > first.not_valid_after_utc
    assert_streams_kept(demo, before)
    assert traffic.failures == [] and traffic.ok >= 20, traffic.failures[:5]
    reconnect = new_connection_verifies(demo, "intruder")  # not on the traffic's path
    print(f"\nself-issued server certificate ({lifetime:.0f} s): renewed {renewed_after:.1f} s into the test, "
          f"{traffic.ok} requests ok, 0 failed; a restarted Envoy connected in {reconnect:.2f} s")


def test_replaced_tls_files_are_served_under_traffic_and_streams_stay(with_files: Demo) -> None:
    demo = with_files
    first = served(demo)
    before = xds_connections(demo)
    ca = CertificateAuthority.load(demo.material.state_dir, system_clock)
    pair = issue_server_credentials(ca, SERVER_NAMES, timedelta(hours=1))
    directory = demo.material.serve_config.parent
    with TrafficLoop(demo.one_request) as traffic:
        start = time.monotonic()
        write_atomic(directory / "server-key.pem", pair.private_key_pem, 0o600)
        write_atomic(directory / "server.pem", pair.certificate_chain_pem, 0o644)
        wait_until(lambda: served(demo).serial_number != first.serial_number, 30, 0.05, "the new files served")
        switched = time.monotonic() - start
        ok_at_switch = traffic.ok
        wait_until(lambda: traffic.ok >= ok_at_switch + 20, 30, 0.05, "20 more requests after the switch")
    assert served(demo).serial_number == x509.load_pem_x509_certificate(pair.certificate_chain_pem).serial_number
    assert_streams_kept(demo, before)
    assert traffic.failures == [] and traffic.ok >= 20, traffic.failures[:5]
    reconnect = new_connection_verifies(demo, "intruder")
    print(f"\ntls: files replaced: served to new connections {switched:.2f} s later, {traffic.ok} requests ok, "
          f"0 failed; a restarted Envoy connected in {reconnect:.2f} s")
