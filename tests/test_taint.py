"""`meshca ca taint`: the new intermediate at once, leaves re-issued within the window, the revocation only after it."""

from __future__ import annotations

import io
import logging
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from meshca.ca import crypto
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.ca.revocation import CrlSettings, Revocation, RevocationList, StateDirRevocations
from meshca.cli.main import build_parser
from meshca.cli.taint import cmd_ca_taint
from meshca.identity.spiffe import SpiffeId
from meshca.sds.crl import RevocationPublisher
from meshca.sds.rotation import CaWatcher, LeafRotator, RotationSettings
from meshca.sds.taint import TaintedLeaves
from meshca.sds.workloads import MeshPublisher, WorkloadSecrets
from meshca.xds.cache import SnapshotCache
from tests.fakes import FakeClock, FakeScheduler

TD = "mesh.test"
LOG = logging.getLogger("meshca.test")
IDENTITIES = [SpiffeId.parse(f"spiffe://{TD}/ns/shop/sa/{name}") for name in ("frontend", "backend", "cart", "db")]
WINDOW = timedelta(minutes=5)


class Serve:
    """What `meshca serve` runs for a taint, on a fake clock and scheduler: the CA check, then the CRLs, then the
    tainted leaves (MeshcaApp._check_ca's order)."""

    def __init__(self, ca: CertificateAuthority, clock: FakeClock) -> None:
        self.ca, self.clock = ca, clock
        self.jobs = FakeScheduler(clock)
        self.secrets = WorkloadSecrets(ca, clock, LOG, timedelta(hours=1), reuse_until=0.9)
        self.publisher = MeshPublisher(SnapshotCache(), self.secrets, LOG)
        settings = RotationSettings(reissue_window=WINDOW)
        self.rotator = LeafRotator(self.secrets, self.publisher, self.jobs, settings.policy, clock, LOG)
        self.secrets.set_issue_listener(self.rotator.on_issued)
        self.watcher = CaWatcher(ca, self.publisher, self.rotator, settings, clock, LOG)
        self.revocations = RevocationPublisher(
            ca, StateDirRevocations(ca.state_dir), self.secrets, self.publisher, clock, LOG, CrlSettings()
        )
        self.revocations.start()
        self.tainted = TaintedLeaves(ca, self.secrets, self.rotator, settings, clock, LOG)

    def check(self) -> bool:
        """One CA check; True when the CRLs were re-signed and pushed."""
        self.watcher.check()
        pushed = self.revocations.check()
        self.tainted.check(self.revocations.revocations)
        return pushed

    def issuer_ids(self) -> dict[SpiffeId, str]:
        """identity -> the slot id of the intermediate that signed its held leaf."""
        signers = [(r.id, i) for r, i in self.ca.crl_signers() if r.kind == "intermediate"]
        return {leaf.spiffe_id: next(slot for slot, issuer in signers if issuer.issued(leaf.chain_pem))
                for leaf in self.secrets.certificates()}

    def root_crl_serials(self) -> set[int]:
        root = next(i for r, i in self.ca.crl_signers() if r.kind == "root")
        blocks = [b for b in crypto.split_pem_crls(self.revocations.crls_pem) if crypto.crl_issued_by(b, root.certificate_pem)]
        assert len(blocks) == 1
        return {r.serial_number for r in crypto.parse_crl_pem(blocks[0]).revoked}


def serial_of(ca: CertificateAuthority, slot: str) -> int:
    return next(i.info.serial_number for r, i in ca.crl_signers() if r.id == slot)


def taint(state_dir: Path, clock: FakeClock, *argv: str) -> tuple[int, str]:
    args = build_parser().parse_args(["ca", "taint", "--state-dir", str(state_dir), *argv])
    out = io.StringIO()
    return cmd_ca_taint(args, out, clock), out.getvalue()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ca(tmp_path: Path, clock: FakeClock) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain=TD), clock)


def test_tainting_the_active_intermediate_reissues_every_leaf_then_revokes_it(
    ca: CertificateAuthority, clock: FakeClock
) -> None:
    serve = Serve(ca, clock)
    for spiffe_id in IDENTITIES:
        serve.secrets.default_secret(spiffe_id)
    tainted = ca.active_intermediate_id
    started = clock()
    code, out = taint(ca.state_dir, clock, "--intermediate", tainted)
    assert code == 0 and f"tainted intermediate {tainted}" in out
    effective = started + WINDOW + timedelta(seconds=30)  # the default: the herd window plus the margin
    assert effective.isoformat(timespec="seconds") in out
    listed = StateDirRevocations(ca.state_dir).read().find("intermediate", tainted)
    assert listed is not None and listed.effective_at == effective and listed.reason == "keyCompromise"

    assert serve.check()
    fresh = serve.ca.active_intermediate_id
    assert fresh != tainted
    assert serve.root_crl_serials() == set()  # not before the window: the leaves are still in use
    renewed_at: list[datetime] = []
    while serve.jobs.jobs and min(t for t, _ in serve.jobs.jobs.values()) <= effective:
        serve.jobs.advance_to(min(t for t, _ in serve.jobs.jobs.values()))
        renewed_at.append(clock())
    assert set(serve.issuer_ids().values()) == {fresh}, "every leaf re-issued by the new intermediate"
    assert len(renewed_at) == len(IDENTITIES) and max(renewed_at) <= started + WINDOW
    print(f"\nleaves re-issued {', '.join(f'{(t - started).total_seconds():.0f}s' for t in renewed_at)} after "
          f"the taint (window {WINDOW.total_seconds():.0f}s); revocation at {(effective - started).total_seconds():.0f}s")

    clock.now = effective - timedelta(seconds=1)
    serve.check()
    assert serve.root_crl_serials() == set()
    clock.now = effective
    assert serve.check(), "the CRLs are re-signed when the revocation takes effect"
    assert serve.root_crl_serials() == {serial_of(ca, tainted)}
    assert serve.ca.active_intermediate_id == fresh


def test_tainting_an_old_intermediate_reissues_only_its_leaves(tmp_path: Path, clock: FakeClock) -> None:
    CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain=TD), clock)
    serving = CertificateAuthority.load(tmp_path / "ca", clock)
    serve = Serve(serving, clock)
    old = serving.active_intermediate_id
    serve.secrets.default_secret(IDENTITIES[0])  # signed by `old`
    CertificateAuthority.load(tmp_path / "ca", clock).rotate_intermediate(now=True)  # another process
    serving.reload_if_changed()
    serve.watcher = CaWatcher(serving, serve.publisher, serve.rotator, RotationSettings(reissue_window=WINDOW), clock, LOG)
    for spiffe_id in IDENTITIES[1:]:
        serve.secrets.default_secret(spiffe_id)
    assert serve.issuer_ids()[IDENTITIES[0]] == old and serving.active_intermediate_id != old
    before = dict(serve.jobs.jobs)
    code, out = taint(serving.state_dir, clock, "--intermediate", old, "--revoke-after", "2m", "--reason",
                      "cACompromise")
    assert code == 0 and "activated" not in out  # no rotation: the active one is not tainted
    serve.check()
    moved = {job for job, (when, _) in serve.jobs.jobs.items() if (when, job) != (before[job][0], job)}
    assert moved == {f"renew:{IDENTITIES[0].uri}"}
    assert serve.jobs.jobs[f"renew:{IDENTITIES[0].uri}"][0] < clock() + timedelta(minutes=2)
    serve.jobs.advance_to(clock() + timedelta(minutes=2))
    assert set(serve.issuer_ids().values()) == {serving.active_intermediate_id}
    serve.check()
    assert serve.root_crl_serials() == {serial_of(serving, old)}


def test_an_unknown_root_or_prepared_id_is_one_clear_error_and_a_second_taint_changes_nothing(
    ca: CertificateAuthority, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    root = next(r.id for r, _ in ca.crl_signers() if r.kind == "root")
    for slot, why in (("0123456789abcdef", "no such intermediate"), (root, "that is a root")):
        code, _ = taint(ca.state_dir, clock, "--intermediate", slot)
        err = capsys.readouterr().err
        assert code == 2 and why in err and err.count("\n") == 1
    ca.prepare_intermediate()
    prepared = next(r.id for r, _ in ca.crl_signers() if r.state == "prepared")
    code, _ = taint(ca.state_dir, clock, "--intermediate", prepared)
    assert code == 2 and "prepared" in capsys.readouterr().err
    code, _ = taint(ca.state_dir, clock, "--intermediate", ca.active_intermediate_id, "--revoke-after", "soon")
    assert code == 2 and "--revoke-after" in capsys.readouterr().err
    assert StateDirRevocations(ca.state_dir).read().entries == () and ca.generation == 2  # nothing done

    first = ca.active_intermediate_id
    assert taint(ca.state_dir, clock, "--intermediate", first)[0] == 0
    generation = CertificateAuthority.load(ca.state_dir, clock).generation
    clock.advance(10)
    code, out = taint(ca.state_dir, clock, "--intermediate", first)
    assert code == 0 and out.startswith("nothing to do") and "already tainted" in out
    assert CertificateAuthority.load(ca.state_dir, clock).generation == generation  # no second rotation
    assert StateDirRevocations(ca.state_dir).read().version == 1


def test_vault_modes_are_refused_with_one_line(tmp_path: Path, clock: FakeClock,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "meshca.yaml"
    config.write_text("state_dir: ca\nca:\n  mode: vault-leaf\n")
    args = build_parser().parse_args(["ca", "taint", "--intermediate", "0123456789abcdef", "--config", str(config)])
    assert cmd_ca_taint(args, io.StringIO(), clock) == 2
    err = capsys.readouterr().err
    assert "vault-leaf" in err and "revoke the old one in Vault" in err and err.count("\n") == 1


def test_a_delayed_entry_round_trips_and_is_left_out_of_the_crls_until_it_takes_effect(
    ca: CertificateAuthority, clock: FakeClock
) -> None:
    entry = Revocation("serial", "abc", "unspecified", clock(), clock() + timedelta(hours=1), None, 0xABC,
                       clock() + timedelta(minutes=1))
    listed = RevocationList((entry,), 1)
    assert RevocationList.from_bytes(listed.to_bytes(), "test").entries == (entry,)
    plain = Revocation("serial", "abd", "unspecified", clock(), clock() + timedelta(hours=1), None, 0xABD)
    assert "effective_at" not in RevocationList((plain,), 1).to_bytes().decode()  # older lists stay as they were
    assert listed.in_force(clock()) == () and listed.next_effective(clock()) == entry.effective_at
    assert listed.in_force(clock() + timedelta(minutes=1)) == (entry,)
    assert listed.next_effective(clock() + timedelta(minutes=1)) is None


def test_leaves_of_an_intermediate_revoked_at_once_are_reissued_at_once(tmp_path: Path, clock: FakeClock) -> None:
    CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain=TD), clock)
    serving = CertificateAuthority.load(tmp_path / "ca", clock)
    serve = Serve(serving, clock)
    old = serving.active_intermediate_id
    for spiffe_id in IDENTITIES:
        serve.secrets.default_secret(spiffe_id)
    CertificateAuthority.load(tmp_path / "ca", clock).rotate_intermediate(now=True)
    serving.reload_if_changed()
    serve.watcher = CaWatcher(serving, serve.publisher, serve.rotator, RotationSettings(reissue_window=WINDOW),
                              clock, LOG)
    args = build_parser().parse_args(["revoke", "--intermediate", old, "--state-dir", str(serving.state_dir)])
    assert args.handler(args, io.StringIO(), clock) == 0  # `meshca revoke`: in force at once, no herd window
    serve.check()
    assert serve.root_crl_serials() == {serial_of(serving, old)}
    latest = max(when for when, _ in serve.jobs.jobs.values())
    assert latest <= clock() + timedelta(seconds=len(IDENTITIES) / RotationSettings().reissue_rate)
    serve.jobs.advance_to(latest)
    assert set(serve.issuer_ids().values()) == {serving.active_intermediate_id}


def test_a_replica_that_sees_the_taint_before_the_rotation_still_reissues_before_the_revocation(
    tmp_path: Path, clock: FakeClock
) -> None:
    """With `store:` the CA and the revocation list are two watches: the list may arrive first."""
    CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain=TD), clock)
    serving = CertificateAuthority.load(tmp_path / "ca", clock)  # does not see the rotation until it reloads
    serve = Serve(serving, clock)
    tainted = serving.active_intermediate_id
    for spiffe_id in IDENTITIES:
        serve.secrets.default_secret(spiffe_id)
    assert taint(serving.state_dir, clock, "--intermediate", tainted, "--revoke-after", "1m")[0] == 0
    effective = clock() + timedelta(minutes=1)
    serve.revocations.check()
    assert serve.tainted.check(serve.revocations.revocations) == 0  # it still signs here: renewing would not help
    serve.check()  # the rotation arrives: every leaf re-issued over the 5 min window, then the tainted ones sooner
    assert serving.active_intermediate_id != tainted
    assert len(serve.jobs.jobs) == len(IDENTITIES)
    assert max(when for when, _ in serve.jobs.jobs.values()) < effective
    serve.jobs.advance_to(effective - timedelta(seconds=1))
    assert tainted not in serve.issuer_ids().values()
