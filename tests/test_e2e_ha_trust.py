"""The trust lifecycle with the HA store: three meshca replicas on a three-member etcd, each sidecar on its own
replica, continuous traffic; `meshca revoke` (a serial in use, an identity), `unrevoke` and `meshca ca taint`
through the store reach every Envoy of every replica, and every replica's audit log holds them. The tests share
one setup and run in order; the measured times are printed (`pytest -s`)."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import yaml

from meshca.ca import crypto
from meshca.ca.revocation import RevocationList
from meshca.clock import system_clock
from meshca.dev.demo import DemoSettings, meshca_cli
from meshca.dev.demo_ha import REPLICAS, HaDemo
from meshca.dev.harness import BACKEND, FRONTEND, INTRUDER, TrafficLoop, Workload, crl_serials, envoy_chain
from meshca.dev.tokens import mint_token
from meshca.files import write_atomic
from meshca.xds.snapshot import ResourceType
from tests.test_e2e_ha import HaSetup, chain_intermediate_id, running, wait_for
from tests.test_e2e_revocation import csr_signed
from tests.xds_client import XdsClient

pytestmark = pytest.mark.e2e

LEAF_TTL = timedelta(minutes=2)  # no scheduled renewal during the run: every new serial comes from a revocation
REVOKE_AFTER = 10.0  # seconds: the taint's delay before its revocation takes effect
SDS_TYPE = ResourceType.SECRET.type_url
PINNED = {BACKEND.name: 0, FRONTEND.name: 1, INTRUDER.name: 2}  # the replica each sidecar's bootstrap names


class HaTrust(HaSetup):
    """The HA demo with each sidecar pinned to one replica (so every replica serves one) and an audit log per
    replica."""

    def __init__(self, workdir: Path) -> None:
        settings = DemoSettings(check=True, workdir=workdir, cert_ttl=LEAF_TTL, ha=True, startup_timeout=60.0)
        HaDemo.__init__(self, settings, io.StringIO(), system_clock)
        self.stopped = set()
        self.prefix = "/meshca"

    def meshca_endpoints(self, workload: Workload) -> tuple[tuple[str, int], ...]:
        return (("127.0.0.1", self.replica_ports[PINNED[workload.name]]),)

    def audit_path(self, index: int) -> Path:
        return self.workdir / f"audit-{index}.jsonl"

    def start_replica(self, index: int) -> None:
        config = yaml.safe_load(self.replica_config(index).read_text())
        config["audit"] = {"path": str(self.audit_path(index))}
        write_atomic(self.replica_config(index), yaml.safe_dump(config, sort_keys=False).encode(), 0o644)
        super().start_replica(index)

    def revocations(self) -> RevocationList:
        raw = self.etcd_get("revocations.json")
        return RevocationList() if raw is None else RevocationList.from_bytes(raw, "etcd")

    def holder(self, workload: Workload) -> int:
        """The replica holding `workload`'s xDS stream."""
        held = [i for i in self.live() if workload.node_id in self.own_proxies(i)]
        assert len(held) == 1, (workload.node_id, held)
        return held[0]

    def sign(self, index: int, workload: Workload) -> int:
        """A CSR of `workload`'s identity signed by replica `index`'s CSR service: the leaf's serial
        (grpc.RpcError when refused)."""
        chain = csr_signed(self.material, self.replica_ports[index], workload, crypto.generate_private_key_pem())
        return crypto.parse_certificate_pem(chain[0].encode()).serial_number

    def xds_status(self, index: int, workload: Workload) -> str | None:
        """Replica `index`'s answer to a new xDS stream of `workload`'s identity asking for its certificate: the
        stream's status and details when it is ended, None when the certificate is served."""
        token = mint_token(self.material.signing_key.read_bytes(), namespace=workload.namespace,
                           service_account=workload.service_account, node_id=f"{workload.name}-probe",
                           now=system_clock())

        async def ask() -> str | None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.material.root_bundle.read_bytes())
            async with grpc.aio.secure_channel(f"127.0.0.1:{self.replica_ports[index]}", credentials,
                                               options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
                client = XdsClient(channel, token)
                try:
                    await client.send(SDS_TYPE, ["default"], node_id=f"{workload.name}-probe")
                    await client.recv(timeout=10)
                except EOFError as ended:
                    return str(ended)
                finally:
                    client.close()
            return None

        return asyncio.run(ask())


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaTrust]:
    setup = HaTrust(tmp_path_factory.mktemp("ha-trust"))
    with running(setup):
        yield setup


def listed_serials(demo: HaTrust) -> set[int]:
    """The serials the revocation list in etcd names."""
    return {e.serial for e in demo.revocations().entries if e.serial is not None}


def sign_refused(demo: HaTrust, index: int) -> bool:
    """Whether replica `index` refuses a CSR of frontend's identity because it is revoked."""
    try:
        demo.sign(index, FRONTEND)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in (error.details() or "")
        return True
    return False


def on_every_crl(demo: HaTrust, serial: int) -> bool:
    return all(serial in crl_serials(envoy) for envoy in demo.envoys.values())


def test_sidecars_are_spread_over_the_replicas(demo: HaTrust) -> None:
    assert {workload: demo.holder(workload) for workload in (BACKEND, FRONTEND, INTRUDER)} == {
        BACKEND: 0, FRONTEND: 1, INTRUDER: 2}


def test_a_revoked_serial_in_use_reaches_every_replicas_envoys_and_is_replaced(demo: HaTrust) -> None:
    frontend = demo.envoys[FRONTEND.name]
    holder = demo.holder(FRONTEND)
    serial = envoy_chain(frontend)[0].serial_number
    with TrafficLoop(demo.one_request) as traffic:
        time.sleep(0.5)
        command_started = time.monotonic()
        demo.meshca_command("revoke", "--serial", f"{serial:x}", "--force")
        command = time.monotonic() - command_started
        listed = wait_for(demo, lambda: on_every_crl(demo, serial), "the revoked serial on every Envoy's CRLs", 15)
        replaced = wait_for(demo, lambda: envoy_chain(frontend)[0].serial_number != serial,
                            "frontend's sidecar presents a new certificate", 15)
        time.sleep(1.0)
    print(f"\nrevoke --serial (frontend's, held by replica {holder}) through etcd: on the CRLs of all "
          f"{len(demo.envoys)} Envoys ({REPLICAS} replicas) {listed:.2f} s after the command exited (it ran {command:.2f} s); frontend re-issued "
          f"{listed + replaced:.2f} s after the command; requests {traffic.ok} ok, {len(traffic.failures)} failed")
    assert traffic.failures == [], [f.detail for f in traffic.failures[:5]]
    assert traffic.ok > 10
    assert demo.holder(FRONTEND) == holder


def test_a_revoked_identity_is_listed_by_the_replica_holding_its_leaf_even_when_it_sees_it_last(
        demo: HaTrust) -> None:
    frontend = demo.envoys[FRONTEND.name]
    holder = demo.holder(FRONTEND)
    serial = envoy_chain(frontend)[0].serial_number
    others = [i for i in range(REPLICAS) if i != holder]
    peers = [envoy for name, envoy in demo.envoys.items() if name != FRONTEND.name]
    denied_before = int(demo.envoys[BACKEND.name].stats().get("http.inbound_backend.rbac.denied", 0))
    process = demo.replicas[holder]
    assert process is not None
    # The replica holding frontend's leaf is frozen while the others adopt the revocation: they hold no leaf of
    # it, so only the holder, when it wakes, can put its serial on the list (and so on every replica's CRLs).
    process.send_signal(signal.SIGSTOP)
    demo.stopped.add(holder)
    try:
        command_started = time.monotonic()
        demo.meshca_command("revoke", "--spiffe-id", FRONTEND.spiffe_id)
        revoked_at = time.monotonic()
        command = revoked_at - command_started
        refused = wait_for(demo, lambda: not demo.one_request().ok, "frontend's next request refused", 10)
        # a replica signs until its CA check has adopted the list (every `ca_check_interval`, 0.5 s here)
        for index in others:
            wait_for(demo, functools.partial(sign_refused, demo, index), f"replica {index} refuses frontend's CSR", 5)
        signing_refused = time.monotonic() - revoked_at
        time.sleep(max(0.0, 2.0 - (time.monotonic() - revoked_at)))  # every other replica's CA check has run
        assert serial not in listed_serials(demo), "a replica without its leaf listed the serial"
        assert not any(serial in crl_serials(e) for e in demo.envoys.values())
    finally:
        process.send_signal(signal.SIGCONT)
        demo.stopped.discard(holder)
    # (frontend's own sidecar is cut off: its stream was ended and it gets no resource until the unrevoke)
    listed = wait_for(demo, lambda: all(serial in crl_serials(e) for e in peers), "the serial on every peer's CRLs", 15)
    print(f"\nrevoke --spiffe-id (leaf held by replica {holder}, frozen 2 s): the command ran {command:.2f} s; "
          f"frontend's next request refused {refused:.2f} s after it exited, its CSRs refused by every other replica after {signing_refused:.2f} s; "
          f"the serial on every peer's CRLs {listed:.2f} s after the holder "
          f"woke ({time.monotonic() - revoked_at:.2f} s after the command)")
    assert serial in listed_serials(demo)
    assert int(demo.envoys[BACKEND.name].stats().get("http.inbound_backend.rbac.denied", 0)) > denied_before
    assert all(sign_refused(demo, index) for index in range(REPLICAS))
    for index in range(REPLICAS):  # no certificate over SDS either, whichever replica its sidecar would reach
        ended = demo.xds_status(index, FRONTEND) or "served"
        assert "PERMISSION_DENIED" in ended and "revoked" in ended, (index, ended)

    demo.meshca_command("unrevoke", "--spiffe-id", FRONTEND.spiffe_id)
    unrevoked_at = time.monotonic()
    wait_for(demo, lambda: envoy_chain(frontend)[0].serial_number != serial, "frontend's sidecar re-issued", 30, 0.1)
    back = wait_for(demo, lambda: demo.one_request().ok, "frontend's requests go through again", 10, 0.1)
    print(f"unrevoke: frontend's sidecar holds a new certificate and its requests go through "
          f"{time.monotonic() - unrevoked_at:.2f} s after the command (the last wait {back:.2f} s)")
    assert all(isinstance(demo.sign(index, FRONTEND), int) for index in range(REPLICAS))
    assert all(demo.xds_status(index, FRONTEND) is None for index in range(REPLICAS))


def test_taint_the_active_intermediate_through_the_store(demo: HaTrust) -> None:
    tainted = yaml.safe_load(demo.ca_command("status", "--json"))["active_intermediate_id"]
    chains = {name: envoy_chain(envoy) for name, envoy in demo.envoys.items()}
    assert {chain_intermediate_id(chain) for chain in chains.values()} == {tainted}
    tainted_serial = chains[BACKEND.name][1].serial_number
    with TrafficLoop(demo.one_request) as traffic:
        time.sleep(0.5)
        out = demo.ca_command("taint", "--intermediate", tainted, "--revoke-after", f"{REVOKE_AFTER:g}s")
        started = time.monotonic()
        fresh = yaml.safe_load(demo.ca_command("status", "--json"))["active_intermediate_id"]
        assert fresh != tainted and f"tainted intermediate {tainted}" in out
        reissued = wait_for(demo, lambda: set(demo.envoy_intermediates().values()) == {fresh},
                            "every sidecar on a leaf of the new intermediate", REVOKE_AFTER, 0.1)
        assert not any(tainted_serial in crl_serials(e) for e in demo.envoys.values())
        wait_for(demo, lambda: on_every_crl(demo, tainted_serial), "the tainted intermediate on every Envoy's CRLs",
                 REVOKE_AFTER + 15, 0.1)
        revoked = time.monotonic() - started
        time.sleep(1.0)
    print(f"\nca taint {tainted} --revoke-after {REVOKE_AFTER:g}s through etcd: every sidecar ({REPLICAS} replicas) "
          f"on a leaf of {fresh} after {reissued:.2f} s; the tainted intermediate on every Envoy's CRLs after "
          f"{revoked:.2f} s; requests {traffic.ok} ok, {len(traffic.failures)} failed")
    assert traffic.failures == [], [f.detail for f in traffic.failures[:5]]
    assert traffic.ok > 10
    assert REVOKE_AFTER - 1 <= revoked < REVOKE_AFTER + 5


def has_taint_line(path: Path) -> bool:
    return '"event":"taint"' in path.read_text()


def test_every_replicas_audit_log_verifies_and_holds_the_trust_events(demo: HaTrust) -> None:
    serial_entries = [e for e in demo.revocations().entries if e.kind == "serial"]
    tainted = {e.value for e in demo.revocations().entries if e.kind == "intermediate"}
    assert serial_entries and len(tainted) == 1
    for index in range(REPLICAS):
        path = demo.audit_path(index)
        wait_for(demo, functools.partial(has_taint_line, path), f"replica {index}'s taint line", 10)
        meshca_cli("audit", "verify", str(path))  # raises unless it exits 0
        text = path.read_text()
        events = [json.loads(line) for line in text.splitlines()]
        assert {e["replica"] for e in events} == {demo.replica_id(index)}
        trust = [(e["event"], e.get("spiffe_id") or e.get("serial") or e.get("issuer")) for e in events
                 if e["event"] in ("revoke", "unrevoke", "taint")]
        assert ("revoke", FRONTEND.spiffe_id) in trust and ("unrevoke", FRONTEND.spiffe_id) in trust, trust
        assert {("revoke", e.value) for e in serial_entries} <= set(trust), trust
        assert {e["issuer"] for e in events if e["event"] == "taint"} == tainted, events
        assert "PRIVATE KEY" not in text and "eyJ" not in text  # no key, no JWT
        print(f"replica {index}: {len(events)} audit lines, trust events {trust}")
