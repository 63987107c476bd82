"""End to end with real Envoys, `meshca serve` and a real OpenBao, in both Vault modes: a revoked certificate is
refused at a new handshake (the CRLs: meshca's intermediate's and Vault's), a revoked identity per request; the time
from `meshca revoke` exiting to every Envoy holding the CRL is printed."""

from __future__ import annotations

import socket
import ssl
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_e2e_revocation import fail_verify, own_frontend_leaf

from meshca.ca.vault.setup import policy_text
from meshca.clock import system_clock
from meshca.dev.demo import Demo, DemoSettings, meshca_cli
from meshca.dev.envoy_process import wait_until
from meshca.dev.harness import BACKEND, FRONTEND, TrafficLoop, crl_serials, envoy_chain

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["vault", "vault-leaf"])
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    running = Demo(DemoSettings(check=True, ca=request.param, workdir=tmp_path_factory.mktemp(request.param)),
                   sys.stdout, system_clock)
    try:
        running.start()
        mode = running.settings.vault_mode
        assert mode is not None and running.openbao is not None
        # the identity running `meshca revoke --config` needs <mount>/revoke on top of meshca's serving policy
        running.openbao.root_client().sys.create_or_update_acl_policy(
            "meshca", policy_text(mode) + 'path "pki/revoke" {\n  capabilities = ["update"]\n}\n')
        yield running
    finally:
        running.stop()


def vault_root(demo: Demo) -> str:
    with urllib.request.urlopen(f"{demo.vault_address}/v1/pki/ca/pem", timeout=5) as response:
        return str(response.read().decode())


def direct_request(demo: Demo, cert: Path, key: Path) -> str:
    """One GET straight to backend's sidecar over a new mTLS connection with `cert`: "ok", or why it failed."""
    context = ssl.create_default_context(cadata=vault_root(demo))
    context.check_hostname = False
    context.load_cert_chain(cert, key)
    try:
        with socket.create_connection(("127.0.0.1", demo.ports.backend_inbound), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
                answer = tls.recv(4096)
    except OSError as error:
        return f"failed: {error}"
    if not answer:
        return "failed: connection closed by the sidecar"
    return "ok" if answer.startswith(b"HTTP/1.1 200") else f"failed: {answer[:40]!r}"


def test_a_revoked_certificate_is_refused_at_a_new_handshake_and_other_traffic_goes_on(
    demo: Demo, tmp_path: Path
) -> None:
    cert, key, serial = own_frontend_leaf(demo, tmp_path)
    assert direct_request(demo, cert, key) == "ok"  # the CRLs of every CA of the chain are there: Envoy accepts it
    refused_before = fail_verify(demo.envoys[BACKEND.name])
    with TrafficLoop(demo.one_request) as traffic:
        time.sleep(1.0)
        meshca_cli("revoke", "--certificate", str(cert), "--reason", "keyCompromise",
                   "--config", str(demo.material.serve_config))
        revoked_at = time.monotonic()
        wait_until(lambda: all(serial in crl_serials(e) for e in demo.envoys.values()), 30, 0.05,
                   "every Envoy holds the CRL listing the revoked serial")
        propagation = time.monotonic() - revoked_at
        print(f"\n{demo.settings.vault_mode}: revocation propagation (meshca revoke exit -> CRL in all "
              f"{len(demo.envoys)} Envoys' config_dump): {propagation:.2f} s")
        outcome = direct_request(demo, cert, key)
        time.sleep(1.0)
    assert outcome.startswith("failed"), outcome
    assert fail_verify(demo.envoys[BACKEND.name]) > refused_before
    assert traffic.failures == [] and traffic.ok > 10
    assert propagation < 5


def test_a_revoked_identity_is_refused_per_request_and_gets_no_certificate(demo: Demo, tmp_path: Path) -> None:
    frontend = demo.envoys[FRONTEND.name]
    serial = envoy_chain(frontend)[0].serial_number
    assert demo.one_request().ok
    meshca_cli("revoke", "--spiffe-id", FRONTEND.spiffe_id, "--config", str(demo.material.serve_config))
    revoked_at = time.monotonic()
    wait_until(lambda: not demo.one_request().ok, 10, 0.05, "the revoked identity's next request refused")
    print(f"\n{demo.settings.vault_mode}: revoked identity refused per request after "
          f"{time.monotonic() - revoked_at:.2f} s")
    assert int(demo.envoys[BACKEND.name].stats().get("http.inbound_backend.rbac.denied", 0)) > 0
    if demo.settings.vault_mode == "vault-intermediate":  # meshca signed it: its serial is on meshca's CRL
        wait_until(lambda: all(serial in crl_serials(e) for e in demo.envoys.values() if e is not frontend), 30,
                   0.05, "the revoked identity's certificate on every other Envoy's CRL")
    with pytest.raises(grpc.RpcError) as refused:
        own_frontend_leaf(demo, tmp_path)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    meshca_cli("unrevoke", "--spiffe-id", FRONTEND.spiffe_id, "--config", str(demo.material.serve_config))
    wait_until(lambda: demo.one_request().ok, 30, 0.1, "frontend's requests go through again")
