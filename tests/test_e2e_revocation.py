"""End to end with real Envoys and `meshca serve` on a state dir: `meshca revoke` of a serial and of an identity
under continuous traffic; the time from the command's exit to every Envoy holding the CRL is printed."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from meshca.ca import crypto
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock
from meshca.dev.demo import Demo, DemoSettings, meshca_cli
from meshca.dev.envoy_process import (
    EnvoyProcess,
    wait_until,
)
from meshca.dev.harness import BACKEND, FRONTEND, TrafficLoop, Workload, crl_serials, envoy_chain
from meshca.dev.material import DevMaterial
from meshca.dev.tokens import mint_token
from meshca.v1 import certificate_pb2, certificate_pb2_grpc

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    running = Demo(DemoSettings(check=True, workdir=tmp_path_factory.mktemp("revocation")), sys.stdout, system_clock)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def csr_signed(material: DevMaterial, port: int, workload: Workload, key: bytes) -> list[str]:
    """`key`'s CSR for `workload`'s identity signed by the meshca on `port` (its CSR service, as a workload calls
    it): the chain, leaf first (grpc.RpcError when refused)."""
    token = mint_token(material.signing_key.read_bytes(), namespace=workload.namespace,
                       service_account=workload.service_account, now=system_clock())

    async def sign() -> certificate_pb2.SignResponse:
        credentials = grpc.ssl_channel_credentials(root_certificates=material.root_bundle.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials,
                                           options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
            stub = certificate_pb2_grpc.CertificateServiceStub(channel)
            return await stub.Sign(certificate_pb2.SignRequest(csr_pem=crypto.build_csr_pem(key).decode()),
                                   metadata=[("authorization", f"Bearer {token}")], timeout=10)

    return list(asyncio.run(sign()).certificate_chain)


def own_frontend_leaf(demo: Demo, workdir: Path) -> tuple[Path, Path, int]:
    """A leaf of frontend's identity with a key this test holds: meshca's CSR service, as a workload would."""
    key = crypto.generate_private_key_pem()
    chain = csr_signed(demo.material, demo.ports.meshca, FRONTEND, key)
    (workdir / "leaf.pem").write_text("".join(chain))
    (workdir / "leaf-key.pem").write_bytes(key)
    info = crypto.parse_certificate_pem(chain[0].encode())
    return workdir / "leaf.pem", workdir / "leaf-key.pem", info.serial_number


def direct_request(demo: Demo, cert: Path, key: Path, bundle: str | None = None) -> str:
    """One GET straight to backend's sidecar over a new mTLS connection with `cert`: "ok", or why it failed.
    `bundle`: the roots to verify the sidecar with (default: the internal CA's in the demo's state dir)."""
    if bundle is None:
        bundle = CertificateAuthority.load(demo.material.state_dir, system_clock).trust_bundle_pem().decode()
    return mtls_get(demo.ports.backend_inbound, cert, key, bundle)


def mtls_get(port: int, cert: Path, key: Path, bundle: str) -> str:
    """One GET straight to a sidecar's inbound `port` over a new mTLS connection with `cert`: "ok", or why it failed."""
    context = ssl.create_default_context(cadata=bundle)
    context.check_hostname = False  # the sidecar's certificate names a SPIFFE ID, no host name
    context.load_cert_chain(cert, key)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
                answer = tls.recv(4096)
    except OSError as error:
        return f"failed: {error}"
    if not answer:  # TLS 1.3: the server's alert for the client's certificate arrives after the handshake
        return "failed: connection closed by the sidecar"
    return "ok" if answer.startswith(b"HTTP/1.1 200") else f"failed: {answer[:40]!r}"


def fail_verify(envoy: EnvoyProcess) -> int:
    return sum(int(v) for k, v in envoy.stats().items()
               if ".ssl.fail_verify" in k and str(v).isdigit())


def revoke_under_traffic(demo: Demo, tmp_path: Path, location: list[str], bundle: str | None = None) -> None:
    """A leaf of frontend's revoked (`meshca revoke --certificate ... <location>`) while traffic runs: every Envoy
    gets the CRL listing it (the time is printed), a new handshake with it fails, the other traffic goes on."""
    cert, key, serial = own_frontend_leaf(demo, tmp_path)
    assert direct_request(demo, cert, key, bundle) == "ok"  # the CRLs of every CA of the chain are there
    refused_before = fail_verify(demo.envoys[BACKEND.name])
    with TrafficLoop(demo.one_request) as traffic:
        time.sleep(1.0)
        meshca_cli("revoke", "--certificate", str(cert), "--reason", "keyCompromise", *location)
        revoked_at = time.monotonic()
        wait_until(lambda: all(serial in crl_serials(e) for e in demo.envoys.values()), 30, 0.05,
                   "every Envoy holds the CRL listing the revoked serial")
        propagation = time.monotonic() - revoked_at
        print(f"\n{demo.settings.vault_mode or 'internal'}: revocation propagation (meshca revoke exit -> CRL in "
              f"all {len(demo.envoys)} Envoys' config_dump): {propagation:.2f} s")
        outcome = direct_request(demo, cert, key, bundle)
        time.sleep(1.0)
    assert outcome.startswith("failed"), outcome
    assert fail_verify(demo.envoys[BACKEND.name]) > refused_before
    assert traffic.failures == [] and traffic.ok > 10
    assert propagation < 5


def test_a_revoked_serial_is_refused_by_every_sidecar_and_other_traffic_goes_on(demo: Demo, tmp_path: Path) -> None:
    revoke_under_traffic(demo, tmp_path, ["--state-dir", str(demo.material.state_dir)])


def test_a_revoked_serial_in_use_is_replaced_at_once_without_a_failed_request(demo: Demo) -> None:
    frontend = demo.envoys[FRONTEND.name]
    serial = envoy_chain(frontend)[0].serial_number
    with TrafficLoop(demo.one_request) as traffic:
        time.sleep(0.5)
        meshca_cli("revoke", "--serial", f"{serial:x}", "--force", "--state-dir", str(demo.material.state_dir))
        revoked_at = time.monotonic()
        wait_until(lambda: envoy_chain(frontend)[0].serial_number != serial, 15, 0.05,
                   "frontend's sidecar presents a new certificate")
        replaced = time.monotonic() - revoked_at
        wait_until(lambda: all(serial in crl_serials(e) for e in demo.envoys.values()), 15, 0.05,
                   "every Envoy holds the CRL listing the revoked serial")
        time.sleep(1.0)
    print(f"\nrevoked serial in use: replaced in frontend's sidecar {replaced:.2f} s after meshca revoke")
    assert traffic.failures == [] and traffic.ok > 10


def test_a_revoked_identity_gets_no_certificate_and_its_current_one_is_listed(demo: Demo, tmp_path: Path) -> None:
    frontend = demo.envoys[FRONTEND.name]
    serial = envoy_chain(frontend)[0].serial_number
    meshca_cli("revoke", "--spiffe-id", FRONTEND.spiffe_id, "--state-dir", str(demo.material.state_dir))
    revoked_at = time.monotonic()
    wait_until(lambda: all(serial in crl_serials(e) for e in demo.envoys.values() if e is not frontend), 30, 0.05,
               "the revoked identity's certificate on every other Envoy's CRL")
    print(f"\nidentity revocation propagation (its serial on the CRLs of every peer): "
          f"{time.monotonic() - revoked_at:.2f} s")
    with pytest.raises(grpc.RpcError) as refused:
        own_frontend_leaf(demo, tmp_path)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in (refused.value.details() or "")
    # refused per request (RBAC over RDS) also on frontend's open connection to backend
    denied_before = int(demo.envoys[BACKEND.name].stats().get("http.inbound_backend.rbac.denied", 0))
    wait_until(lambda: not demo.one_request().ok, 5, 0.05, "the revoked identity's next request refused")
    assert int(demo.envoys[BACKEND.name].stats().get("http.inbound_backend.rbac.denied", 0)) > denied_before
    meshca_cli("unrevoke", "--spiffe-id", FRONTEND.spiffe_id, "--state-dir", str(demo.material.state_dir))
    wait_until(lambda: isinstance(own_frontend_leaf(demo, tmp_path)[2], int), 10, 0.2,
               "the identity gets certificates again")
    # its sidecar's stream was ended at the revocation: it reconnects, gets a new certificate and calls again
    wait_until(lambda: envoy_chain(frontend)[0].serial_number != serial, 20, 0.1,
               "frontend's sidecar holds a new certificate after unrevoke")
    wait_until(lambda: demo.one_request().ok, 10, 0.1, "frontend's requests go through again")


def test_revocations_reach_the_audit_log_and_the_inventory(demo: Demo, tmp_path: Path) -> None:
    """The serving meshca records what it adopted: revoke (serial, identity) and unrevoke lines in its chain."""
    _, _, serial = own_frontend_leaf(demo, tmp_path)
    config = str(demo.material.serve_config)
    audit = demo.material.state_dir / "audit.jsonl"
    before = audit.read_text().count(f'"event":"unrevoke","spiffe_id":"{FRONTEND.spiffe_id}"')
    meshca_cli("revoke", "--serial", f"{serial:x}", "--force", "--reason", "superseded", "--config", config)
    meshca_cli("revoke", "--spiffe-id", FRONTEND.spiffe_id, "--config", config)
    meshca_cli("unrevoke", "--spiffe-id", FRONTEND.spiffe_id, "--config", config)

    def events() -> list[dict[str, object]]:
        return [json.loads(line) for line in audit.read_text().splitlines()]

    def seen(want: dict[str, object]) -> bool:
        return any(all(e.get(k) == v for k, v in want.items()) for e in events())

    # (an earlier test revoked and unrevoked frontend too: its lines are in the same log)
    wait_until(lambda: seen({"event": "revoke", "serial": f"{serial:x}", "reason": "superseded"}), 15, 0.1,
               "the serial's revoke line")
    wait_until(lambda: audit.read_text().count(f'"event":"unrevoke","spiffe_id":"{FRONTEND.spiffe_id}"') > before,
               15, 0.1, "the identity's unrevoke line")
    identity_lines = [e["event"] for e in events() if e.get("spiffe_id") == FRONTEND.spiffe_id
                      and e["event"] in ("revoke", "unrevoke")]
    assert identity_lines[-2:] == ["revoke", "unrevoke"]
    meshca_cli("audit", "verify", str(audit))  # raises unless it exits 0 (the chain holds)
    listed = json.loads(meshca_cli("certs", "list", "--audit", str(audit), "--spiffe-id", FRONTEND.spiffe_id, "--json"))
    assert any(e["serial"] == f"{serial:x}" and e["state"] == "revoked" for e in listed), listed
