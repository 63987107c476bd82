"""End to end with real Envoys and `meshca serve` on a state dir: `meshca ca taint` of the active intermediate under
continuous traffic: 0 failed requests, every sidecar on a leaf of the new intermediate within the window, and after
it a handshake with a leftover leaf of the tainted one fails. The measured times are printed."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock
from meshca.dev.demo import Demo, DemoSettings, meshca_cli
from meshca.dev.envoy_process import EnvoyProcess, wait_until
from meshca.dev.harness import BACKEND, TrafficLoop, crl_serials, envoy_chain
from tests.test_e2e_revocation import direct_request, fail_verify, own_frontend_leaf

pytestmark = pytest.mark.e2e

REVOKE_AFTER = 12.0  # seconds: the herd window given to the taint


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    running = Demo(DemoSettings(check=True, workdir=tmp_path_factory.mktemp("taint")), sys.stdout, system_clock)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def served_intermediate(envoy: EnvoyProcess) -> int | None:
    """The serial of the intermediate that signed the leaf Envoy serves: the leaf of its admin /certs, found in the
    `default` chain it accepted (config_dump; /certs lists the leaf alone)."""
    certs = json.loads(envoy.admin_get("/certs"))
    leaves = {int(cert["serial_number"], 16) for entry in certs.get("certificates", [])
              for cert in entry.get("cert_chain", []) if cert.get("serial_number")}
    chain = envoy_chain(envoy)
    return chain[1].serial_number if len(chain) > 1 and chain[0].serial_number in leaves else None


def intermediate_serial(state_dir: Path, slot: str) -> int:
    ca = CertificateAuthority.load(state_dir, system_clock)
    return next(issuer.info.serial_number for record, issuer in ca.crl_signers() if record.id == slot)


def test_taint_the_active_intermediate_under_traffic(demo: Demo, tmp_path: Path) -> None:
    state_dir = demo.material.state_dir
    tainted = CertificateAuthority.load(state_dir, system_clock).active_intermediate_id
    tainted_serial = intermediate_serial(state_dir, tainted)
    leftover, leftover_key, _ = own_frontend_leaf(demo, tmp_path)  # a leaf of the tainted intermediate, kept
    assert direct_request(demo, leftover, leftover_key) == "ok"
    assert all(served_intermediate(e) == tainted_serial for e in demo.envoys.values())
    refused_before = fail_verify(demo.envoys[BACKEND.name])
    with TrafficLoop(demo.one_request) as traffic:
        time.sleep(1.0)
        out = meshca_cli("ca", "taint", "--intermediate", tainted, "--revoke-after", f"{REVOKE_AFTER:g}s",
                         "--state-dir", str(state_dir))
        started = time.monotonic()
        fresh = CertificateAuthority.load(state_dir, system_clock).active_intermediate_id
        fresh_serial = intermediate_serial(state_dir, fresh)
        assert fresh != tainted and f"tainted intermediate {tainted}" in out
        wait_until(lambda: all(served_intermediate(e) == fresh_serial for e in demo.envoys.values()), REVOKE_AFTER, 0.1,
                   "every sidecar's /certs shows a leaf of the new intermediate")
        reissued = time.monotonic() - started
        before_revocation = direct_request(demo, leftover, leftover_key)
        checked_at = time.monotonic() - started
        wait_until(lambda: all(tainted_serial in crl_serials(e) for e in demo.envoys.values()), REVOKE_AFTER + 15,
                   0.1, "every Envoy's CRLs list the tainted intermediate")
        revoked = time.monotonic() - started
        after_revocation = direct_request(demo, leftover, leftover_key)
        time.sleep(1.0)
    print(f"\ntaint of intermediate {tainted} (revocation after {REVOKE_AFTER:g} s): every sidecar on a leaf of the "
          f"new intermediate after {reissued:.2f} s; the tainted intermediate on every Envoy's CRLs after "
          f"{revoked:.2f} s; traffic {traffic.ok} requests ok, {len(traffic.failures)} failed")
    assert traffic.failures == [] and traffic.ok > 10
    assert reissued < REVOKE_AFTER
    if checked_at < REVOKE_AFTER - 1:  # the leftover leaf still works until the revocation takes effect
        assert before_revocation == "ok", before_revocation
    assert REVOKE_AFTER - 1 <= revoked < REVOKE_AFTER + 5
    assert after_revocation.startswith("failed"), after_revocation
    assert fail_verify(demo.envoys[BACKEND.name]) > refused_before
    # the serving meshca's audit log: the new intermediate's activation and the taint, in a chain that verifies
    events = [json.loads(line) for line in (state_dir / "audit.jsonl").read_text().splitlines()]
    assert any(e["event"] == "taint" and e.get("issuer") == tainted for e in events)
    assert any(e["event"] == "ca_activated" and e.get("issuer") == fresh for e in events)
    meshca_cli("audit", "verify", str(state_dir / "audit.jsonl"))
