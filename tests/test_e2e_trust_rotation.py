"""End to end with real Envoys: sidecars started from a day-one bootstrap whose trust in meshca is kept current by
`meshca trust sync` live through two root rotations in a row (both old roots pruned) under continuous traffic, and
reach meshca again after a restart; an Envoy bootstrapped the old way (static root file) no longer can."""

from __future__ import annotations

import socket
import ssl
import sys
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from cryptography import x509

from meshca.ca.api import CaSettings
from meshca.ca.crypto import split_pem_certificates
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock
from meshca.dev.demo import Demo, DemoSettings
from meshca.dev.envoy_process import EnvoyProcess, dynamic_active_secrets, dynamic_listeners, free_port, wait_until
from meshca.dev.harness import INTRUDER, TrafficLoop, envoy_chain
from meshca.dev.tokens import mint_token
from meshca.files import write_atomic
from meshca.node.bootstrap import BootstrapSettings, build_bootstrap
from meshca.node.trust import TRUST_PEM_FILE

pytestmark = pytest.mark.e2e

TTL = timedelta(seconds=20)
# leaves live 20 s and at most 30 s, so an old root can be pruned ~31 s after the rotation that retired it
CA = CaSettings(
    trust_domain="mesh.local",
    leaf_ttl_min=timedelta(seconds=10),
    leaf_ttl_default=TTL,
    leaf_ttl_max=timedelta(seconds=30),
    reload_grace=timedelta(seconds=1),
)


@pytest.fixture(scope="module", params=["inline token", "token file"])
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    running = Demo(
        DemoSettings(
            check=True,
            workdir=tmp_path_factory.mktemp("trust"),
            cert_ttl=TTL,
            trust_sync=True,
            trust_sync_interval=timedelta(seconds=0.5),
            ca_settings=CA,
            token_files=request.param == "token file",
        ),
        sys.stdout,
        system_clock,
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()


def ca_now(demo: Demo) -> CertificateAuthority:
    return CertificateAuthority.load(demo.material.state_dir, system_clock)


def bundle(demo: Demo) -> list[bytes]:
    return split_pem_certificates(ca_now(demo).trust_bundle_pem())


def held(demo: Demo, name: str) -> list[bytes]:
    """The roots a node's synced trust directory holds (what its Envoy verifies meshca with)."""
    return split_pem_certificates((demo.trust_dir(name) / TRUST_PEM_FILE).read_bytes())


def sync_log(demo: Demo, name: str) -> str:
    return (demo.workdir / f"trust-sync-{name}.log").read_text()


def meshca_verifies_with(demo: Demo, root: bytes) -> bool:
    """meshca's server certificate (a new connection's) verifies against this root alone."""
    context = ssl.create_default_context(cadata=root.decode())
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", demo.ports.meshca), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost"):
                return True
    except ssl.SSLError:
        return False


def on_active_intermediate(demo: Demo) -> bool:
    serial = x509.load_pem_x509_certificate(ca_now(demo).intermediate_certificate_pem).serial_number
    return all(len(c) > 1 and c[1].serial_number == serial for c in map(envoy_chain, demo.envoys.values()))


def connected(envoy: EnvoyProcess) -> bool:
    return envoy.stats().get("control_plane.connected_state") == 1


def test_two_root_rotations_with_pruning_then_a_restart_with_no_failed_request(demo: Demo) -> None:
    day_one = split_pem_certificates(demo.material.root_bundle.read_bytes())
    names = list(demo.envoys)
    times: dict[str, float] = {}
    cx_before = {name: demo.envoys[name].stats()["cluster.meshca_xds.upstream_cx_total"] for name in names}
    started = time.monotonic()
    with TrafficLoop(demo.one_request) as traffic:
        for n in (1, 2):
            start = time.monotonic()
            demo.ca_command("rotate", "--root", "--now")
            new_root = bundle(demo)[0]  # the active root comes first
            wait_until(lambda: all(new_root in held(demo, name) for name in names), 30, 0.05,
                       f"rotation {n}: every node's synced bundle holds the new root")
            times[f"rotation {n}: new root in every node's trust dir"] = time.monotonic() - start
            wait_until(lambda: meshca_verifies_with(demo, new_root), 60, 0.1,
                       f"rotation {n}: meshca serves its certificate under the new root")
            times[f"rotation {n}: meshca's certificate under the new root"] = time.monotonic() - start
            wait_until(lambda: on_active_intermediate(demo), 60, 0.2, f"rotation {n}: every sidecar re-issued")
            times[f"rotation {n}: every sidecar's leaf re-issued"] = time.monotonic() - start
        wait_until(lambda: bundle(demo) == [new_root], 120, 0.25, "both old roots pruned from meshca's bundle")
        times["both old roots pruned (from the first rotation)"] = time.monotonic() - started
        wait_until(lambda: all(held(demo, name) == [new_root] for name in names), 30, 0.05,
                   "every node's synced bundle holds only the newest root")
        times["every node's trust dir holds only the newest root"] = time.monotonic() - started
        for name in names:  # what Envoy itself now verifies meshca with: the reloaded file-based secret
            secret = dynamic_active_secrets(demo.envoys[name].config_dump())["meshca_trust"]
            assert secret["validation_context"]["trusted_ca"]["inline_string"].encode() == new_root, name
        for name in names:  # the ADS streams lived through both rotations on the connections they had
            assert demo.envoys[name].stats()["cluster.meshca_xds.upstream_cx_total"] == cx_before[name], name
        # a new handshake of every running Envoy (meshca restarted: a new certificate under the newest root)
        start = time.monotonic()
        if demo.settings.token_files:  # a token replaced on disk is what the next stream sends
            token = mint_token(demo.material.signing_key.read_bytes(), namespace="attic", service_account="renamed",
                               node_id=INTRUDER.node_id, now=system_clock())
            write_atomic(demo.token_file(INTRUDER.name), token.encode(), 0o600)
        demo.kill_meshca()
        # the fault on the node's side: the syncs cannot reach meshca, keep the bundle they hold, say so, retry
        wait_until(lambda: all("trust sync failed (keeping" in sync_log(demo, name) for name in names), 30, 0.05,
                   "every trust sync reported that meshca is unreachable")
        demo.start_meshca()
        wait_until(lambda: all(connected(demo.envoys[name]) for name in names), 30, 0.05,
                   "every sidecar reconnected to the restarted meshca")
        times["meshca restarted: every running sidecar reconnected"] = time.monotonic() - start
        wait_until(lambda: all("reached again" in sync_log(demo, name) for name in names), 30, 0.05,
                   "every trust sync reached meshca again")
        if demo.settings.token_files:
            assert f"node={INTRUDER.node_id} identity=spiffe://mesh.local/ns/attic/sa/renamed" in \
                demo.meshca_log.read_text()
            token = mint_token(demo.material.signing_key.read_bytes(), namespace="attic", service_account="intruder",
                               node_id=INTRUDER.node_id, now=system_clock())
            write_atomic(demo.token_file(INTRUDER.name), token.encode(), 0o600)  # its own identity again
        for name in names:
            failed = [line for line in sync_log(demo, name).splitlines() if "trust sync failed" in line]
            assert failed and all("cannot reach meshca at 127.0.0.1:" in line for line in failed), failed
            assert held(demo, name) == [new_root]
        for _ in range(5):
            assert demo.one_request().ok
    assert traffic.failures == [] and traffic.ok > 100, traffic.failures[:5]
    assert not set(day_one) & set(held(demo, names[0]))
    for name in names:
        stats = demo.envoys[name].stats()
        assert stats["control_plane.connected_state"] == 1, name
        assert stats.get("cluster.meshca_xds.ssl.fail_verify_error", 0) == 0, name

    # Restart every sidecar from its day-one bootstrap: its trust dir now holds the newest root only.
    for name in names:
        start = time.monotonic()
        envoy = demo.restart_envoy(name)
        wait_until(lambda envoy=envoy: connected(envoy), 30, 0.05, f"restarted {name} connected to meshca")
        wait_until(lambda envoy=envoy: dynamic_listeners(envoy.config_dump()) and "default" in
                   dynamic_active_secrets(envoy.config_dump()), 30, 0.1, f"restarted {name} has listeners and secrets")
        times[f"restart {name}: connected, listeners and certificate"] = time.monotonic() - start
    wait_until(lambda: demo.one_request().ok, 30, 0.2, "traffic through the restarted sidecars")
    results = [demo.one_request() for _ in range(20)]
    assert all(r.ok for r in results), results
    mode = "token file" if demo.settings.token_files else "inline token"
    print(f"\nroot rotation end to end, {mode} (seconds):")
    for what, seconds in times.items():
        print(f"  {what}: {seconds:.2f}")
    print(f"  requests during the rotations: {traffic.ok} ok, {len(traffic.failures)} failed")


def test_an_envoy_with_the_static_day_one_root_cannot_reach_meshca_any_more(demo: Demo) -> None:
    """The gap this closes: after the prune above, the old bootstrap mode's root file verifies nothing."""
    if split_pem_certificates(demo.material.root_bundle.read_bytes())[0] in bundle(demo):
        pytest.skip("runs after the rotations above")
    settings = BootstrapSettings(
        node_id="spare-1", cluster="spare", meshca_address="127.0.0.1", meshca_port=demo.ports.meshca,
        meshca_ca_path=demo.material.root_bundle, meshca_server_name="localhost", token="a.b.c",
        admin_port=free_port(),
    )
    with EnvoyProcess(build_bootstrap(settings), workdir=demo.workdir / "envoy-static-root") as envoy:
        envoy.wait_ready(30, live=False)
        wait_until(lambda: envoy.stats().get("cluster.meshca_xds.ssl.fail_verify_error", 0) > 0, 30, 0.1,
                   "the static-root Envoy fails to verify meshca")
        assert envoy.stats().get("control_plane.connected_state") == 0
