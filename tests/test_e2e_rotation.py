"""End to end with real Envoys and 20 s certificates: leaf, intermediate and root rotation under traffic,
a long-lived connection across rotation, and kill -9 of meshca in the middle of a rotation."""

from __future__ import annotations

import http.client
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock
from meshca.dev.demo import Demo, DemoSettings
from meshca.dev.envoy_process import wait_until
from meshca.dev.harness import ChainWatcher, TrafficLoop, envoy_chain

pytestmark = pytest.mark.e2e

TTL = timedelta(seconds=20)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    running = Demo(
        DemoSettings(check=True, workdir=tmp_path_factory.mktemp("rotation"), cert_ttl=TTL), sys.stdout, system_clock
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()


def current_bundle(demo: Demo) -> list[x509.Certificate]:
    ca = CertificateAuthority.load(demo.material.state_dir, system_clock)
    return x509.load_pem_x509_certificates(ca.trust_bundle_pem())


def active_intermediate(demo: Demo) -> int:
    """The serial of the intermediate that signs now, read from the CA state as the operator would."""
    ca = CertificateAuthority.load(demo.material.state_dir, system_clock)
    return x509.load_pem_x509_certificate(ca.intermediate_certificate_pem).serial_number


def on_intermediate(demo: Demo, serial: int, bundle: list[x509.Certificate]) -> bool:
    """Every sidecar holds a chain through that intermediate which verifies against the bundle."""
    chains = [envoy_chain(envoy) for envoy in demo.envoys.values()]
    return all(len(c) > 1 and c[1].serial_number == serial and verifies(c, bundle) for c in chains)


def verifies(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> bool:
    verifier = PolicyBuilder().store(Store(roots)).time(datetime.now(UTC)).build_client_verifier()
    try:
        verifier.verify(chain[0], chain[1:])
    except Exception:
        return False
    return True


def test_leaf_rotation_is_seen_in_envoy_with_no_failed_request(demo: Demo) -> None:
    watcher = ChainWatcher(demo.envoys)
    with TrafficLoop(demo.one_request) as traffic:

        def rotated_twice() -> bool:
            watcher.sample()
            return min(watcher.leaf_rotations().values()) >= 2

        wait_until(rotated_twice, 60, 0.5, "every workload's certificate rotated twice")
    assert traffic.failures == [] and traffic.ok > 50
    # each new leaf Envoy accepted was a new serial, still its own identity
    for name, envoy in demo.envoys.items():
        chain = envoy_chain(envoy)
        san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://mesh.local/ns/{'attic' if name == 'intruder' else 'shop'}/sa/{name}"
        ]


def test_long_lived_connection_survives_rotation(demo: Demo) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", demo.ports.frontend_outbound, timeout=10)
    connection.request("GET", "/before")
    first = connection.getresponse()
    assert first.status == 200
    first.read()
    socket_before = connection.sock
    watcher = ChainWatcher(demo.envoys)

    def both_rotated() -> bool:
        watcher.sample()
        rotations = watcher.leaf_rotations()
        return rotations["frontend"] >= 1 and rotations["backend"] >= 1

    wait_until(both_rotated, 60, 0.5, "frontend and backend certificates rotated")
    connection.request("GET", "/after")
    second = connection.getresponse()
    assert second.status == 200
    second.read()
    assert connection.sock is socket_before  # the same TCP connection, not a reconnect
    connection.close()


@pytest.mark.parametrize("which", ["--intermediate", "--root"])
def test_forced_ca_rotation_with_no_failed_request(demo: Demo, which: str) -> None:
    before = active_intermediate(demo)
    with TrafficLoop(demo.one_request) as traffic:
        demo.ca_command("rotate", which, "--now")
        after = active_intermediate(demo)
        assert after != before
        bundle = current_bundle(demo)
        wait_until(lambda: on_intermediate(demo, after, bundle), 60, 0.5, f"every sidecar re-issued after {which}")
        for _ in range(3):  # and traffic keeps flowing on the new chains
            assert demo.one_request().ok
    assert traffic.failures == [] and traffic.ok > 0
    if which == "--root":
        assert len(bundle) >= 2  # old root kept in the bundle while its leaves may live


def test_kill_9_during_rotation_then_restart_converges(demo: Demo) -> None:
    demo.ca_command("rotate", "--intermediate", "--now")
    rotating = active_intermediate(demo)

    def some_moved() -> bool:
        return any(len(c) > 1 and c[1].serial_number == rotating for c in map(envoy_chain, demo.envoys.values()))

    wait_until(some_moved, 30, 0.05, "the server started re-issuing")
    demo.kill_meshca()  # SIGKILL in the middle of re-issuing every leaf
    demo.start_meshca()
    bundle = current_bundle(demo)
    active = active_intermediate(demo)
    wait_until(lambda: on_intermediate(demo, active, bundle), 60, 0.5, "every workload on the active intermediate")
    results = [demo.one_request() for _ in range(10)]
    assert all(r.ok for r in results), results
