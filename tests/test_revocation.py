"""Revocation: the list and its file, CRL contents and expiry, re-signing, revoked identities, the CLI."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from meshca.app import MeshcaApp, crl_publishing
from meshca.ca import crypto
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.ca.revocation import (
    REVOCATIONS_FILE,
    CrlSettings,
    Revocation,
    RevocationList,
    RevocationRefused,
    StateDirRevocations,
    build_crls,
    intermediate_revocation,
    leaf_revocation,
)
from meshca.cli.main import main
from meshca.identity.spiffe import SpiffeId
from meshca.mesh.model import parse_mesh_config
from meshca.sds.workloads import IdentityRevoked
from tests.fakes import FakeClock

TD = "mesh.test"
FRONTEND = SpiffeId.parse(f"spiffe://{TD}/ns/shop/sa/frontend")
LOG = logging.getLogger("meshca.test")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ca(tmp_path: Path, clock: FakeClock) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain=TD), clock)


def crls_by_issuer(ca: CertificateAuthority, pem: bytes) -> dict[str, crypto.CrlInfo]:
    """slot id -> its CRL, each checked to be signed by that slot's key."""
    found = {}
    blocks = crypto.split_pem_crls(pem)
    for record, issuer in ca.crl_signers():
        mine = [b for b in blocks if crypto.crl_issued_by(b, issuer.certificate_pem)]
        assert len(mine) == 1, f"{record.kind} {record.id} has {len(mine)} CRLs"
        found[record.id] = crypto.parse_crl_pem(mine[0])
    assert len(blocks) == len(found)
    return found


def test_every_ca_certificate_gets_a_crl_listing_what_it_signed(ca: CertificateAuthority, clock: FakeClock) -> None:
    old = ca.active_intermediate_id
    leaf = ca.issue_workload(FRONTEND)
    ca.rotate_intermediate(now=True)
    new = ca.active_intermediate_id
    root = next(r.id for r, _ in ca.crl_signers() if r.kind == "root")
    entries = RevocationList().with_entries([
        leaf_revocation(ca.crl_signers(), leaf.certificate_pem, "keyCompromise", clock(), "leaf"),
        intermediate_revocation(ca.crl_signers(), old, "cACompromise", clock()),
    ])
    settings = CrlSettings(validity=timedelta(hours=6))
    crls = crls_by_issuer(ca, build_crls(ca.crl_signers(), entries, clock(), settings))
    assert [(r.serial_number, r.reason) for r in crls[old].revoked] == [(leaf.serial_number, "keyCompromise")]
    old_serial = next(i.info.serial_number for r, i in ca.crl_signers() if r.id == old)
    assert [(r.serial_number, r.reason) for r in crls[root].revoked] == [(old_serial, "cACompromise")]
    assert crls[new].revoked == ()
    assert crls[new].next_update == clock() + timedelta(hours=6)
    assert crls[new].this_update <= clock()


def test_an_entry_leaves_the_crl_once_its_certificate_expired(ca: CertificateAuthority, clock: FakeClock) -> None:
    leaf = ca.issue_workload(FRONTEND, ttl=timedelta(hours=1))
    entries = RevocationList().with_entries(
        [leaf_revocation(ca.crl_signers(), leaf.certificate_pem, "unspecified", clock(), "leaf")]
    )
    listed = crls_by_issuer(ca, build_crls(ca.crl_signers(), entries, clock(), CrlSettings()))
    assert [r.serial_number for r in listed[ca.active_intermediate_id].revoked] == [leaf.serial_number]
    clock.advance(3601)
    later = crls_by_issuer(ca, build_crls(ca.crl_signers(), entries, clock(), CrlSettings()))
    assert later[ca.active_intermediate_id].revoked == ()
    assert entries.pruned(clock()).entries == ()


def test_the_signing_or_an_unknown_intermediate_is_refused(ca: CertificateAuthority, clock: FakeClock) -> None:
    with pytest.raises(RevocationRefused, match="active intermediate"):
        intermediate_revocation(ca.crl_signers(), ca.active_intermediate_id, "unspecified", clock())
    with pytest.raises(RevocationRefused, match="no such intermediate"):
        intermediate_revocation(ca.crl_signers(), "0123456789abcdef", "unspecified", clock())
    other = CertificateAuthority.init(ca.state_dir.parent / "other", CaSettings(trust_domain=TD), clock)
    foreign = other.issue_workload(FRONTEND)
    with pytest.raises(RevocationRefused, match="not signed by any intermediate"):
        leaf_revocation(ca.crl_signers(), foreign.certificate_pem, "unspecified", clock(), "leaf.pem")


def test_the_list_persists_0600_and_another_reader_sees_each_write(ca: CertificateAuthority, clock: FakeClock) -> None:
    writer, reader = StateDirRevocations(ca.state_dir), StateDirRevocations(ca.state_dir)
    assert reader.read().entries == ()
    assert reader.changed() is None
    entry = Revocation("spiffe_id", FRONTEND.uri, "keyCompromise", clock())
    after = writer.update(lambda current: current.with_entries([entry]))
    assert after.version == 1
    assert stat.S_IMODE(os.stat(ca.state_dir / REVOCATIONS_FILE).st_mode) == 0o600
    seen = reader.changed()
    assert seen is not None and seen.entries == (entry,) and seen.denied_spiffe_ids == {FRONTEND.uri}
    assert reader.changed() is None
    assert writer.update(lambda current: current.with_entries([entry])).version == 1  # nothing new: no write
    assert writer.update(lambda current: current.without("spiffe_id", FRONTEND.uri)).version == 2
    seen = reader.changed()
    assert seen is not None and seen.entries == ()


_WRITER = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from meshca.ca.revocation import Revocation, StateDirRevocations
source = StateDirRevocations(Path(sys.argv[1]))
i = 0
print("ready", flush=True)
while True:
    i += 1
    entry = Revocation("serial", f"{i:x}", "unspecified", datetime.now(UTC), None, None, i)
    source.update(lambda current: current.with_entries([entry]))
"""


def test_a_writer_killed_mid_write_leaves_a_readable_list(ca: CertificateAuthority) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(ca.state_dir)], env=env, stdout=subprocess.PIPE)
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(0.3)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        listed = StateDirRevocations(ca.state_dir).read()  # never a torn file
        assert listed.version == len(listed.entries) > 0


def make_app(ca: CertificateAuthority, clock: FakeClock, settings: CrlSettings = CrlSettings()) -> MeshcaApp:
    return MeshcaApp(ca, [], clock, LOG, revocations=crl_publishing(StateDirRevocations(ca.state_dir), settings))


def test_crls_are_re_signed_well_before_next_update(ca: CertificateAuthority, clock: FakeClock) -> None:
    app = make_app(ca, clock, CrlSettings(validity=timedelta(hours=4), refresh=0.5))
    assert app.revocations is not None
    first = app.revocations.crls_pem
    assert len(crypto.split_pem_crls(first)) == 2  # the root's and the intermediate's, before any revocation
    clock.advance(2 * 3600 - 1)
    assert not app.revocations.check()
    clock.advance(1)
    assert app.revocations.check()
    infos = [crypto.parse_crl_pem(b) for b in crypto.split_pem_crls(app.revocations.crls_pem)]
    assert all(info.next_update == clock() + timedelta(hours=4) for info in infos)
    ca.rotate_intermediate()  # a prepared intermediate needs its CRL before it signs anything
    assert app.revocations.check()
    assert len(crypto.split_pem_crls(app.revocations.crls_pem)) == 3


def test_a_revoked_identity_gets_no_certificate_and_its_serial_is_listed(
    ca: CertificateAuthority, clock: FakeClock
) -> None:
    app = make_app(ca, clock)
    assert app.revocations is not None
    held = app.secrets.renew(FRONTEND)
    StateDirRevocations(ca.state_dir).update(
        lambda current: current.with_entries([Revocation("spiffe_id", FRONTEND.uri, "keyCompromise", clock())])
    )
    assert app.revocations.check()
    with pytest.raises(IdentityRevoked, match="revoked"):
        app.secrets.default_secret(FRONTEND)
    assert app.secrets.held_secret(FRONTEND) is None
    listed = crls_by_issuer(ca, app.revocations.crls_pem)[ca.active_intermediate_id]
    assert [r.serial_number for r in listed.revoked] == [held.serial_number]
    on_disk = StateDirRevocations(ca.state_dir).read()  # every replica's CRLs list it
    assert on_disk.find("serial", f"{held.serial_number:x}") is not None
    secret = app.secrets.bundle_secrets()[0]
    assert app.revocations.crls_pem in secret.payload


def test_revoked_identities_reach_the_mesh_build(
    ca: CertificateAuthority, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import meshca.app

    seen: list[frozenset[str]] = []
    real = meshca.app.build_mesh

    def recording(*args: object, denied_spiffe_ids: frozenset[str] = frozenset()) -> object:
        seen.append(denied_spiffe_ids)
        return real(*args, denied_spiffe_ids=denied_spiffe_ids)  # type: ignore[arg-type]

    monkeypatch.setattr(meshca.app, "build_mesh", recording)
    app = make_app(ca, clock)
    assert app.revocations is not None
    app.apply_mesh_config(parse_mesh_config(Path("mesh.yaml"), {"trust_domain": TD, "services": {}}))
    StateDirRevocations(ca.state_dir).update(
        lambda current: current.with_entries([Revocation("spiffe_id", FRONTEND.uri, "unspecified", clock())])
    )
    app.revocations.check()
    assert seen == [frozenset(), frozenset({FRONTEND.uri})]


def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_revoke_and_unrevoke(ca: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(ca.state_dir)
    leaf = ca.issue_workload(FRONTEND)
    (tmp_path / "leaf.pem").write_bytes(leaf.certificate_pem)
    code, out, _ = run_cli("revoke", "--certificate", str(tmp_path / "leaf.pem"), "--reason", "keyCompromise",
                           "--state-dir", d, capsys=capsys)
    assert code == 0 and f"revoked serial {leaf.serial_number:x}" in out
    code, _, err = run_cli("revoke", "--serial", "abc123", "--state-dir", d, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "--force" in err
    code, out, _ = run_cli("revoke", "--serial", "abc123", "--force", "--state-dir", d, capsys=capsys)
    assert code == 0 and "revoked serial abc123" in out
    code, _, err = run_cli("revoke", "--intermediate", ca.active_intermediate_id, "--state-dir", d, capsys=capsys)
    assert code == 2 and "active intermediate" in err and err.count("\n") == 1
    code, _, err = run_cli("revoke", "--spiffe-id", "spiffe://other.test/ns/a/sa/b", "--state-dir", d, capsys=capsys)
    assert code == 2 and "trust domain" in err
    code, _, err = run_cli("revoke", "--spiffe-id", FRONTEND.uri, "--reason", "stolen", "--state-dir", d, capsys=capsys)
    assert code == 2 and "RFC 5280" in err
    code, out, _ = run_cli("revoke", "--spiffe-id", FRONTEND.uri, "--state-dir", d, capsys=capsys)
    assert code == 0 and f"revoked identity {FRONTEND.uri}" in out
    code, out, _ = run_cli("revoke", "--spiffe-id", FRONTEND.uri, "--state-dir", d, capsys=capsys)
    assert code == 0 and "already revoked" in out
    listed = StateDirRevocations(ca.state_dir).read()
    assert listed.version == 3 and listed.denied_spiffe_ids == {FRONTEND.uri}
    code, out, _ = run_cli("unrevoke", "--spiffe-id", FRONTEND.uri, "--state-dir", d, capsys=capsys)
    assert code == 0 and "may get certificates again" in out
    code, out, _ = run_cli("unrevoke", "--spiffe-id", FRONTEND.uri, "--state-dir", d, capsys=capsys)
    assert code == 0 and "not revoked" in out
    assert StateDirRevocations(ca.state_dir).read().denied_spiffe_ids == frozenset()


class RecordingAudit:
    def __init__(self) -> None:
        self.events: list[object] = []

    def record(self, event: object) -> None:
        self.events.append(event)


def test_every_change_is_audited_also_when_several_versions_are_adopted_at_once(
    ca: CertificateAuthority, clock: FakeClock
) -> None:
    audit = RecordingAudit()
    app = MeshcaApp(ca, [], clock, LOG, revocations=crl_publishing(StateDirRevocations(ca.state_dir)),
                    audit=audit)  # type: ignore[arg-type]
    assert app.revocations is not None
    writer = StateDirRevocations(ca.state_dir)
    # revoked and lifted between two checks of the serving replica: both are still recorded, in order
    writer.update(lambda c: c.with_entries([Revocation("spiffe_id", FRONTEND.uri, "keyCompromise", clock())]))
    writer.update(lambda c: c.without("spiffe_id", FRONTEND.uri))
    writer.update(lambda c: c.with_entries([Revocation("serial", "abc", "superseded", clock(), serial=0xABC)]))
    app.revocations.check()
    seen = [(e.event, e.spiffe_id, e.serial, e.reason) for e in audit.events  # type: ignore[attr-defined]
            if e.event in ("revoke", "unrevoke")]  # type: ignore[attr-defined]
    assert seen == [
        ("revoke", FRONTEND.uri, None, "keyCompromise"),
        ("unrevoke", FRONTEND.uri, None, None),
        ("revoke", None, 0xABC, "superseded"),
    ]
    assert [c.version for c in writer.read().history] == [1, 2, 3]
    # a restart reads the list without recording its past again
    again = RecordingAudit()
    MeshcaApp(ca, [], clock, LOG, revocations=crl_publishing(StateDirRevocations(ca.state_dir)),
              audit=again)  # type: ignore[arg-type]
    assert [e for e in again.events if e.event in ("revoke", "unrevoke")] == []  # type: ignore[attr-defined]


class FailingWrites(StateDirRevocations):
    """A fake fault: the state-dir list whose next `fail` writes by the serving process fail, as an etcd write
    that times out between the watch delivering a revocation and the replica adding its serials (the real
    store cannot be made to fail at that instant)."""

    def __init__(self, state_dir: Path, fail: int) -> None:
        super().__init__(state_dir)
        self.fail = fail

    def update(self, change: Callable[[RevocationList], RevocationList]) -> RevocationList:
        if self.fail > 0:
            self.fail -= 1
            raise OSError("store unavailable")
        return super().update(change)


def test_the_serial_of_a_revoked_identity_is_written_once_the_list_is_writable_again(
    ca: CertificateAuthority, clock: FakeClock
) -> None:
    source = FailingWrites(ca.state_dir, fail=1)
    app = MeshcaApp(ca, [], clock, LOG, revocations=crl_publishing(source))
    assert app.revocations is not None
    held = app.secrets.renew(FRONTEND)
    writer = StateDirRevocations(ca.state_dir)  # the CLI
    writer.update(lambda c: c.with_entries([Revocation("spiffe_id", FRONTEND.uri, "keyCompromise", clock())]))
    assert app.revocations.check()  # the write of the serial fails: this replica's CRLs list it alone

    def listed() -> list[int]:
        assert app.revocations is not None
        return [r.serial_number for r in crls_by_issuer(ca, app.revocations.crls_pem)[ca.active_intermediate_id].revoked]

    assert listed() == [held.serial_number]
    assert writer.read().find("serial", f"{held.serial_number:x}") is None
    # another change of the list: the serial stays on this replica's CRLs and is written now
    writer.update(lambda c: c.with_entries([Revocation("serial", "abc", "superseded", clock(), serial=0xABC)]))
    app.revocations.check()
    assert sorted(listed()) == sorted([held.serial_number, 0xABC])
    assert writer.read().find("serial", f"{held.serial_number:x}") is not None  # every replica's CRLs list it


def test_an_unwritten_serial_is_written_on_a_later_check_without_another_change(
    ca: CertificateAuthority, clock: FakeClock
) -> None:
    source = FailingWrites(ca.state_dir, fail=2)
    app = MeshcaApp(ca, [], clock, LOG, revocations=crl_publishing(source))
    assert app.revocations is not None
    held = app.secrets.renew(FRONTEND)
    writer = StateDirRevocations(ca.state_dir)
    writer.update(lambda c: c.with_entries([Revocation("spiffe_id", FRONTEND.uri, "keyCompromise", clock())]))
    app.revocations.check()  # fails (1)
    app.revocations.check()  # too soon to try again
    clock.advance(30)
    app.revocations.check()  # fails (2)
    assert writer.read().find("serial", f"{held.serial_number:x}") is None
    clock.advance(30)
    app.revocations.check()
    assert writer.read().find("serial", f"{held.serial_number:x}") is not None
