"""End to end with real Envoys, `meshca serve` and a real OpenBao, in both Vault modes: a revoked certificate is
refused at a new handshake (the CRLs: meshca's intermediate's and Vault's), a revoked identity per request; the time
from `meshca revoke` exiting to every Envoy holding the CRL is printed."""

from __future__ import annotations

import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from meshca.ca.vault.setup import policy_text
from meshca.clock import system_clock
from meshca.dev.demo import Demo, DemoSettings, meshca_cli
from meshca.dev.envoy_process import wait_until
from meshca.dev.harness import BACKEND, FRONTEND, crl_serials, envoy_chain
from tests.test_e2e_revocation import own_frontend_leaf, revoke_under_traffic

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


def test_a_revoked_certificate_is_refused_at_a_new_handshake_and_other_traffic_goes_on(
    demo: Demo, tmp_path: Path
) -> None:
    revoke_under_traffic(demo, tmp_path, ["--config", str(demo.material.serve_config)], vault_root(demo))


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
