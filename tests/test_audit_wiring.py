"""What reaches the audit log from SDS, the CSR API and CA transitions; `meshca audit verify` and `meshca certs list`."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from fakes import T0, FakeClock, FakeScheduler, FakeTokenAuthenticator

from meshca.audit import AuditEvent, AuditLog, read_records, revocation_event, verify_file
from meshca.ca import crypto
from meshca.ca.api import CaSettings
from meshca.ca.csr_service import NODE_METADATA_KEY, CertificateServicer, add_to_server
from meshca.ca.internal import CertificateAuthority
from meshca.config import AUDIT_FILE, parse_audit
from meshca.fields import ConfigError, FieldReader
from meshca.identity.spiffe import SpiffeId
from meshca.sds.rotation import CaWatcher, LeafRotator, RenewalPolicy, RotationSettings
from meshca.sds.workloads import MeshPublisher, WorkloadSecrets
from meshca.v1 import certificate_pb2, certificate_pb2_grpc
from meshca.xds.cache import SnapshotCache

TD = "mesh.test"
ALICE = SpiffeId.for_service_account(TD, "shop", "alice")
LOG = logging.getLogger("test.audit")


def audit_log(path: Path, clock: FakeClock) -> AuditLog:
    log = AuditLog(path, "replica-1", clock, LOG, flush_interval=60)
    log.open()
    return log


def records(log: AuditLog) -> list[dict[str, Any]]:
    assert log.flush()
    return read_records(log.path)


class Rig:
    def __init__(self, tmp_path: Path, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock(T0)
        self.ca = CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain=TD), self.clock)
        self.audit = audit_log(tmp_path / "audit.jsonl", self.clock)
        self.secrets = WorkloadSecrets(self.ca, self.clock, LOG, leaf_ttl=timedelta(hours=1), audit=self.audit)
        self.cache = SnapshotCache()
        self.publisher = MeshPublisher(self.cache, self.secrets, LOG)
        self.scheduler = FakeScheduler(self.clock)
        self.rotator = LeafRotator(self.secrets, self.publisher, self.scheduler, RenewalPolicy(), self.clock, LOG,
                                   random.Random(1))
        self.secrets.set_issue_listener(self.rotator.on_issued)


def test_an_sds_issuance_names_the_node_that_asked_and_a_renewal_is_recorded(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.publisher.ensure_identity(ALICE, "node-alice-1")
    rig.publisher.ensure_identity(ALICE, "node-alice-2")  # the held certificate is reused: nothing issued
    first, = rig.secrets.certificates()
    rig.secrets.renew(ALICE)
    second, = rig.secrets.certificates()
    issue, renew = records(rig.audit)
    assert issue["event"] == "issue" and issue["node_id"] == "node-alice-1"
    assert issue["spiffe_id"] == ALICE.uri and issue["serial"] == f"{first.serial_number:x}"
    assert issue["issuer"] == rig.ca.active_intermediate_id
    assert issue["not_after"].startswith(first.not_after.strftime("%Y-%m-%dT%H:%M:%S"))
    assert issue["replica"] == "replica-1"
    assert renew["event"] == "renew" and "node_id" not in renew and renew["serial"] == f"{second.serial_number:x}"
    rig.audit.close()
    assert verify_file(rig.audit.path).ok


def test_ca_transitions_committed_here_and_elsewhere_are_recorded(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    from meshca.audit import CaTransitions

    settings = RotationSettings(reissue_window=timedelta(seconds=10))
    watcher = CaWatcher(rig.ca, rig.publisher, rig.rotator, settings, rig.clock, LOG,
                        audit=CaTransitions(rig.ca, rig.audit))
    watcher.check()
    assert records(rig.audit) == []
    old_root = next(s.id for s in rig.ca.status().slots if s.kind == "root")
    old_intermediate = rig.ca.active_intermediate_id
    other = CertificateAuthority.load(tmp_path / "ca", rig.clock)  # `meshca ca rotate --root --now` elsewhere
    other.rotate_root(now=True)
    assert rig.ca.reload_if_changed()  # adopted before the watcher looks (as a store replica's watch does)
    watcher.check()
    elsewhere = records(rig.audit)
    assert {(r["event"], r["ca_kind"], r["issuer"]) for r in elsewhere} >= {
        ("ca_activated", "intermediate", rig.ca.active_intermediate_id),
        ("ca_retired", "intermediate", old_intermediate),
        ("ca_retired", "root", old_root),
    }
    assert all(r["reason"] == "committed by another process" for r in elsewhere)
    assert all(r["generation"] == rig.ca.generation for r in elsewhere)
    rig.clock.now = T0 + timedelta(days=20)  # past intermediate_prepare_at: the schedule prepares the next one
    watcher.check()
    scheduled = records(rig.audit)[len(elsewhere):]
    assert [(r["event"], r["ca_kind"]) for r in scheduled][:1] == [("ca_prepared", "intermediate")]
    assert "reason" not in scheduled[0]


async def test_a_signed_csr_is_recorded_with_the_node_the_caller_names(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    ca = CertificateAuthority.init(tmp_path / "ca", CaSettings(TD), clock)
    audit = audit_log(tmp_path / "audit.jsonl", clock)
    server = grpc.aio.server()
    add_to_server(server, CertificateServicer(FakeTokenAuthenticator({"alice-token": ALICE}), ca, audit=audit))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = certificate_pb2_grpc.CertificateServiceStub(channel)
            csr = crypto.build_csr_pem(crypto.generate_private_key_pem()).decode()
            answer = await stub.Sign(
                certificate_pb2.SignRequest(csr_pem=csr),
                metadata=(("authorization", "Bearer alice-token"), (NODE_METADATA_KEY, "vm-7")),
            )
    finally:
        await server.stop(None)
    sign, = records(audit)
    assert sign["event"] == "sign" and sign["serial"] == answer.serial_number and sign["node_id"] == "vm-7"
    assert sign["issuer"] == ca.active_intermediate_id
    audit.close()


def meshca(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshca.cli.main", *args], capture_output=True, text=True, timeout=60)


def test_meshca_audit_verify_and_certs_list(tmp_path: Path) -> None:
    rig = Rig(tmp_path, FakeClock.at_real_now())  # `meshca certs list` judges validity by the real clock
    bob = SpiffeId.for_service_account(TD, "shop", "bob")
    carol = SpiffeId.for_service_account(TD, "shop", "carol")
    expired = rig.clock.now - timedelta(minutes=1)
    rig.audit.record(AuditEvent("issue", spiffe_id=bob.uri, serial=7, node_id="node-bob", not_after=expired))
    rig.publisher.ensure_identity(ALICE, "node-alice")
    rig.publisher.ensure_identity(carol, "node-carol")
    rig.audit.record(revocation_event("revoke", spiffe_id=carol.uri, reason="leaked"))
    rig.audit.close()
    path = str(rig.audit.path)

    verified = meshca("audit", "verify", path)
    assert verified.returncode == 0, verified.stderr
    assert "OK, 4 records, chain intact" in verified.stdout

    listed = meshca("certs", "list", "--audit", path, "--json")
    assert listed.returncode == 0, listed.stderr
    states = {entry["spiffe_id"]: entry["state"] for entry in json.loads(listed.stdout)}
    assert states == {bob.uri: "expired", ALICE.uri: "valid", carol.uri: "revoked"}

    valid = meshca("certs", "list", "--audit", path, "--valid")
    assert valid.returncode == 0, valid.stderr
    header, row = valid.stdout.splitlines()
    assert header.split()[:3] == ["SPIFFE", "ID", "SERIAL"]
    assert row.split()[0] == ALICE.uri and "node-alice" in row and row.split()[-1] == "valid"
    only_bob = json.loads(meshca("certs", "list", "--audit", path, "--json", "--spiffe-id", bob.uri).stdout)
    assert [e["node_id"] for e in only_bob] == ["node-bob"]

    lines = Path(path).read_bytes().splitlines(keepends=True)
    Path(path).write_bytes(b"".join([lines[0], lines[2], lines[1], lines[3]]))
    broken = meshca("audit", "verify", path)
    assert broken.returncode == 1
    assert broken.stderr.strip() == f"meshca: audit: {path}: line 2: seq 3 where 2 was expected: lines were reordered: seq 2 is on line 3"
    warned = meshca("certs", "list", "--audit", path)
    assert warned.returncode == 0 and "meshca: warning:" in warned.stderr and "line 2" in warned.stderr


def test_certs_list_reads_the_audit_logs_of_a_serve_config(tmp_path: Path) -> None:
    state = tmp_path / "ca"
    state.mkdir()
    for index in range(2):  # `meshca serve --workers 2`: a file each
        log = audit_log(state / f"audit-worker{index}.jsonl", FakeClock(T0.replace(year=2099)))
        log.record(AuditEvent("issue", spiffe_id=ALICE.uri, serial=10 + index, not_after=T0.replace(year=2100)))
        log.close()
    config = tmp_path / "meshca.yaml"
    config.write_text("state_dir: ca\n")
    listed = meshca("certs", "list", "--config", str(config), "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(e["serial"] for e in json.loads(listed.stdout)) == ["a", "b"]
    verified = meshca("audit", "verify", "--config", str(config))
    assert verified.returncode == 0 and verified.stdout.count("OK, 1 records") == 2
    missing = meshca("audit", "verify")
    assert missing.returncode == 2 and "give audit log FILE(s) or --config" in missing.stderr


def reader(tmp_path: Path, data: dict[str, Any]) -> FieldReader:
    return FieldReader(tmp_path / "meshca.yaml", data)


def test_audit_settings(tmp_path: Path) -> None:
    state = tmp_path / "ca"
    assert parse_audit(reader(tmp_path, {}), state).path == state / AUDIT_FILE
    assert parse_audit(reader(tmp_path, {}), None).path is None  # store: without a local state dir
    assert parse_audit(reader(tmp_path, {"audit": False}), state).path is None
    custom = parse_audit(reader(tmp_path, {"audit": {"path": "logs.jsonl", "flush_interval": "20ms"}}), None)
    assert custom.path == tmp_path / "logs.jsonl" and custom.flush_interval == timedelta(milliseconds=20)
    with pytest.raises(ConfigError, match=r"audit.path: directory .*nowhere' does not exist"):
        parse_audit(reader(tmp_path, {"audit": {"path": "nowhere/a.jsonl"}}), state)
    with pytest.raises(ConfigError, match=r"audit.path: is required with store:"):
        parse_audit(reader(tmp_path, {"audit": {}}), None)
    with pytest.raises(ConfigError, match=r"audit.flush_interval: 1m must be between"):
        parse_audit(reader(tmp_path, {"audit": {"flush_interval": "1m"}}), state)
    with pytest.raises(ConfigError, match=r"audit.pth: unknown field"):
        parse_audit(reader(tmp_path, {"audit": {"pth": "x"}}), state)


def test_serve_never_shares_an_audit_file_with_another_process(tmp_path: Path) -> None:
    from meshca.cli.serve import _open_audit
    from meshca.cli.workers import WorkerRole
    from meshca.store.registry import default_replica_id

    config = tmp_path / "meshca.yaml"
    config.write_text("state_dir: .\n")
    holder = audit_log(tmp_path / AUDIT_FILE, FakeClock(T0))  # an older serve still running
    try:
        second = _open_audit(config, None, LOG)
        assert second is not None and second.path == tmp_path / f"audit-{default_replica_id()}.jsonl"
        second.close()
        worker = _open_audit(config, WorkerRole(3, 1), LOG)
        assert worker is not None and worker.path == tmp_path / "audit-worker3.jsonl"
        worker.close()
    finally:
        holder.close()
    config.write_text("state_dir: .\naudit: false\n")
    assert _open_audit(config, None, LOG) is None
