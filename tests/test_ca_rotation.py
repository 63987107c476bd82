"""CA rotation: slots, trust bundle overlap, schedule, pruning, journal, crash recovery, two processes, CLI."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import stat
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import VerificationError
from fakes import T0, FakeClock
from test_ca import TD, WORKLOAD, verify_client_chain, write_v1_state

from meshca.ca.api import (
    CaSettings,
    CaStateError,
    InvalidSettings,
    InvalidTtl,
    IssuedCertificate,
    RotationRefused,
    ScheduledStep,
)
from meshca.ca.internal import CertificateAuthority
from meshca.ca.policy import due_prunes, scheduled_step
from meshca.ca.state import (
    CRASH_POINTS,
    JOURNAL_FILE,
    LOCK_FILE,
    METADATA_FILE,
    V1_FILES,
    CrashPoint,
    SlotRecord,
    read_journal,
    slot_files,
)
from meshca.cli import ca as cli_ca

# Short lives so that a whole root rotation happens within days of fake time.
SHORT = CaSettings(
    TD,
    root_ttl=timedelta(days=20),
    intermediate_ttl=timedelta(days=4),
    leaf_ttl_min=timedelta(seconds=10),
    leaf_ttl_default=timedelta(hours=6),
    leaf_ttl_max=timedelta(hours=12),
    reload_grace=timedelta(seconds=30),
)


class Crash(Exception):
    """Stands for kill -9 at a crash point."""


def crash_at(point: CrashPoint):  # type: ignore[no-untyped-def]
    def hook(reached: CrashPoint) -> None:
        if reached == point:
            raise Crash(point)

    return hook


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "ca"


@pytest.fixture
def ca(state: Path, clock: FakeClock) -> CertificateAuthority:
    return CertificateAuthority.init(state, SHORT, clock)


def certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def slot_ids(ca: CertificateAuthority, kind: str, state: str) -> list[str]:
    return [s.id for s in ca.status().slots if s.kind == kind and s.state == state]


def root_fingerprints(ca: CertificateAuthority) -> list[str]:
    return [b.fingerprint_sha256 for b in ca.status().bundle]


def chain_intermediate_fingerprint(leaf: IssuedCertificate) -> str:
    return certs(leaf.chain_pem)[1].fingerprint(hashes.SHA256()).hex()


def records(ca: CertificateAuthority) -> list[SlotRecord]:
    return [
        SlotRecord(s.kind, s.id, s.state, s.issuer_id, s.not_before, s.not_after, s.since, s.retire_after)
        for s in ca.status().slots
    ]


def point(not_before: datetime, not_after: datetime, fraction: float) -> datetime:
    """`fraction` of a lifetime, rounded up to the whole second (tick truncates its clock to seconds)."""
    return not_before + timedelta(seconds=math.ceil(((not_after - not_before) * fraction).total_seconds()))


def fingerprint_of(ca: CertificateAuthority, slot: str) -> str:
    (found,) = [s.fingerprint_sha256 for s in ca.status().slots if s.id == slot]
    return found


def files_in(state: Path) -> set[str]:
    return set(os.listdir(state))


def expected_files(ca: CertificateAuthority) -> set[str]:
    names = {METADATA_FILE, JOURNAL_FILE, LOCK_FILE}
    for s in ca.status().slots:
        names |= set(slot_files(s.kind, s.id))
    return names


def verifies(bundle_pem: bytes, leaf: IssuedCertificate, at: datetime) -> bool:
    try:
        verify_client_chain(bundle_pem, leaf.chain_pem, at)
    except VerificationError:
        return False
    return True


# --- intermediate slots ---------------------------------------------------------------------------


def test_prepared_intermediate_does_not_sign_and_bundle_is_unchanged(ca: CertificateAuthority, clock: FakeClock) -> None:
    bundle = ca.trust_bundle_pem()
    active = ca.active_intermediate_id

    events = ca.prepare_intermediate()

    assert [(e.kind, e.event, e.generation) for e in events] == [("intermediate", "prepared", 2)]
    prepared = events[0].id
    assert slot_ids(ca, "intermediate", "prepared") == [prepared] and ca.generation == 2
    assert ca.trust_bundle_pem() == bundle  # intermediates travel in chains, not in the bundle
    leaf = ca.issue_workload(WORKLOAD)
    assert ca.active_intermediate_id == active
    assert chain_intermediate_fingerprint(leaf) == fingerprint_of(ca, active) != fingerprint_of(ca, prepared)
    assert ca.prepare_intermediate() == [] and ca.generation == 2  # idempotent: never a duplicate


def test_activation_switches_signer_and_old_leaves_still_verify(ca: CertificateAuthority, clock: FakeClock) -> None:
    old_leaf = ca.issue_workload(WORKLOAD, ttl=SHORT.leaf_ttl_max)
    old = ca.active_intermediate_id
    (prepared,) = [e.id for e in ca.prepare_intermediate()]
    clock.now = T0 + timedelta(hours=1)

    events = ca.activate_intermediate()

    assert [(e.kind, e.event, e.id) for e in events] == [
        ("intermediate", "activated", prepared), ("intermediate", "retired", old)
    ]
    assert events[1].retire_after == T0 + timedelta(hours=1) + SHORT.reload_grace + SHORT.leaf_ttl_max
    assert ca.active_intermediate_id == prepared and slot_ids(ca, "intermediate", "old") == [old]
    new_leaf = ca.issue_workload(WORKLOAD)
    assert chain_intermediate_fingerprint(new_leaf) == fingerprint_of(ca, prepared)
    assert new_leaf.chain_pem.endswith(ca.intermediate_certificate_pem)
    for leaf in (old_leaf, new_leaf):
        assert verifies(ca.trust_bundle_pem(), leaf, clock.now)
    assert old_leaf.not_after <= events[1].retire_after


def test_activation_without_a_prepared_intermediate_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(RotationRefused, match="prepare one first"):
        ca.activate_intermediate()
    assert ca.generation == 1


def test_rotate_intermediate_now_prepares_and_activates(ca: CertificateAuthority) -> None:
    before = ca.active_intermediate_id

    events = ca.rotate_intermediate(now=True)

    assert [(e.event, e.generation) for e in events] == [("prepared", 2), ("activated", 3), ("retired", 3)]
    assert ca.active_intermediate_id == events[0].id != before
    assert ca.rotate_intermediate(now=False)[0].event == "prepared"


def test_pruned_exactly_when_the_last_leaf_of_the_old_intermediate_expires(
    ca: CertificateAuthority, clock: FakeClock, state: Path
) -> None:
    clock.now = T0 + timedelta(hours=2)
    last_old_leaf = ca.issue_workload(WORKLOAD, ttl=timedelta(days=30))  # clamped to leaf_ttl_max
    events = ca.rotate_intermediate(now=True)
    (retired,) = [e for e in events if e.event == "retired"]
    assert retired.retire_after is not None and last_old_leaf.not_after <= retired.retire_after
    old_files = set(slot_files("intermediate", retired.id))

    assert ca.tick(retired.retire_after - timedelta(seconds=1)) == []
    assert slot_ids(ca, "intermediate", "old") == [retired.id] and old_files <= files_in(state)

    pruned = ca.tick(retired.retire_after)

    assert [(e.event, e.kind, e.id) for e in pruned] == [("pruned", "intermediate", retired.id)]
    assert slot_ids(ca, "intermediate", "old") == [] and not old_files & files_in(state)
    last = ca.journal()[-1]
    assert (last.event, last.kind, last.id, last.generation) == ("pruned", "intermediate", retired.id, ca.generation)
    assert files_in(state) == expected_files(ca)


# --- root slots -----------------------------------------------------------------------------------


def test_root_rotation_end_to_end(ca: CertificateAuthority, clock: FakeClock, state: Path) -> None:
    old_root = slot_ids(ca, "root", "active")[0]
    old_leaf = ca.issue_workload(WORKLOAD, ttl=SHORT.leaf_ttl_max)

    prepared = ca.prepare_root()

    new_root = [e.id for e in prepared if e.kind == "root"][0]
    assert [(e.kind, e.event) for e in prepared] == [("root", "prepared"), ("intermediate", "prepared")]
    # Published at once, before it signs anything: the bundle has both roots, active first.
    assert root_fingerprints(ca) == [fingerprint_of(ca, old_root), fingerprint_of(ca, new_root)]
    assert [b.state for b in ca.status().bundle] == ["active", "prepared"]
    assert len(certs(ca.trust_bundle_pem())) == 2
    still_old = ca.issue_workload(WORKLOAD)
    assert certs(still_old.chain_pem)[0].issuer == certs(old_leaf.chain_pem)[0].issuer

    clock.now = T0 + timedelta(hours=1)
    activated = ca.activate_root()

    assert {(e.kind, e.event) for e in activated} == {
        ("root", "activated"), ("intermediate", "activated"), ("root", "retired"), ("intermediate", "retired")
    }
    assert len({e.generation for e in activated}) == 1  # one transition
    assert slot_ids(ca, "root", "active") == [new_root] and slot_ids(ca, "root", "old") == [old_root]
    new_leaf = ca.issue_workload(WORKLOAD)
    bundle = ca.trust_bundle_pem()
    for leaf in (old_leaf, still_old, new_leaf):  # overlap: every live leaf verifies against one bundle
        assert verifies(bundle, leaf, clock.now)
    only_new, only_old = (c.public_bytes(Encoding.PEM) for c in certs(bundle))  # active (new) root first
    assert verifies(only_new, new_leaf, clock.now) and not verifies(only_new, old_leaf, clock.now)
    assert verifies(only_old, old_leaf, clock.now) and not verifies(only_old, new_leaf, clock.now)

    (root_retired,) = [e for e in activated if e.event == "retired" and e.kind == "root"]
    assert root_retired.retire_after is not None and old_leaf.not_after <= root_retired.retire_after
    assert ca.tick(root_retired.retire_after - timedelta(seconds=1)) == []
    assert len(ca.status().bundle) == 2

    pruned = ca.tick(root_retired.retire_after)

    assert {(e.kind, e.event) for e in pruned} == {("intermediate", "pruned"), ("root", "pruned")}
    assert root_fingerprints(ca) == [fingerprint_of(ca, new_root)]
    assert verifies(ca.trust_bundle_pem(), ca.issue_workload(WORKLOAD), clock.now)
    assert files_in(state) == expected_files(ca)


def test_activating_a_root_replaces_a_stale_prepared_intermediate(ca: CertificateAuthority, clock: FakeClock) -> None:
    ca.prepare_intermediate()  # next intermediate under the OLD root: never signs, dropped on the switch
    prepared = ca.prepare_root()
    stale = [e.id for e in prepared if e.kind == "intermediate"][0]
    clock.now = T0 + SHORT.intermediate_ttl * 0.6  # past the prepared intermediate's own prepare point

    events = ca.activate_root()

    fresh = [e.id for e in events if e.kind == "intermediate" and e.event == "activated"][0]
    assert fresh != stale and ca.active_intermediate_id == fresh
    assert {e.id for e in events if e.event == "pruned"} >= {stale}
    assert slot_ids(ca, "intermediate", "prepared") == []
    leaf = ca.issue_workload(WORKLOAD)
    assert leaf.not_after == clock.now.replace(microsecond=0) + SHORT.leaf_ttl_default
    assert verifies(ca.trust_bundle_pem(), leaf, clock.now)


def test_activate_root_without_a_prepared_root_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(RotationRefused, match="no root is prepared"):
        ca.activate_root()


# --- the schedule ---------------------------------------------------------------------------------


def test_schedule_is_a_pure_function_of_slots_and_time(ca: CertificateAuthority) -> None:
    slots = records(ca)
    intermediate = [s for s in slots if s.kind == "intermediate"][0]

    def at(fraction: float) -> datetime:
        return point(intermediate.not_before, intermediate.not_after, fraction)

    assert scheduled_step(slots, SHORT, at(0.49)) is None
    assert scheduled_step(slots, SHORT, at(0.5)) == ScheduledStep("prepare", "intermediate")
    assert scheduled_step(slots, SHORT, at(0.7)) == ScheduledStep("prepare", "intermediate")
    assert due_prunes(slots, at(0.7)) == ()


def test_tick_follows_the_fractions(ca: CertificateAuthority, clock: FakeClock) -> None:
    first = ca.active_intermediate_id
    (record,) = [s for s in ca.status().slots if s.id == first]

    def at(fraction: float) -> datetime:
        return point(record.not_before, record.not_after, fraction)

    assert ca.tick(at(0.49)) == []
    assert ca.tick(at(0.5) - timedelta(seconds=1)) == []
    prepared = ca.tick(at(0.5))
    assert [(e.kind, e.event) for e in prepared] == [("intermediate", "prepared")]
    assert ca.tick(at(0.66) - timedelta(seconds=1)) == []
    activated = ca.tick(at(0.66))
    assert [(e.event, e.id) for e in activated] == [("activated", prepared[0].id), ("retired", first)]


def test_tick_after_a_long_outage_prepares_and_activates_in_one_call(ca: CertificateAuthority) -> None:
    (record,) = [s for s in ca.status().slots if s.id == ca.active_intermediate_id]

    events = ca.tick(record.not_after - timedelta(minutes=1))

    assert [e.event for e in events] == ["prepared", "activated", "retired"]


def test_a_prepared_root_is_never_activated_in_the_tick_that_prepared_it(ca: CertificateAuthority) -> None:
    (root,) = [s for s in ca.status().slots if s.kind == "root"]
    late = root.not_before + (root.not_after - root.not_before) * 0.95

    first = ca.tick(late)
    second = ca.tick(late + timedelta(seconds=1))

    assert ("root", "prepared") in {(e.kind, e.event) for e in first}
    assert ("root", "activated") not in {(e.kind, e.event) for e in first}
    assert ("root", "activated") in {(e.kind, e.event) for e in second}


def test_months_of_scheduled_rotation_never_break_a_live_leaf(tmp_path: Path, clock: FakeClock) -> None:
    """Every 6 h: tick, issue a leaf; every leaf still within its validity verifies against the
    current bundle at every step (no outage), through intermediate and root rotations and prunes."""
    ca = CertificateAuthority.init(tmp_path / "ca", SHORT, clock)
    live: list[IssuedCertificate] = []
    seen: dict[tuple[str, str], int] = {}
    max_roots = 0
    for step in range(int(timedelta(days=60) / timedelta(hours=6))):
        clock.now = T0 + timedelta(hours=6) * step
        for event in ca.tick():
            seen[event.kind, event.event] = seen.get((event.kind, event.event), 0) + 1
        live = [leaf for leaf in live if leaf.not_after > clock.now]
        live.append(ca.issue_workload(WORKLOAD, ttl=SHORT.leaf_ttl_max))
        bundle = ca.trust_bundle_pem()
        max_roots = max(max_roots, len(certs(bundle)))
        for leaf in live:
            assert verifies(bundle, leaf, clock.now), f"leaf {leaf.serial_number:x} broken at {clock.now}"
    assert seen["root", "activated"] >= 2 and seen["root", "pruned"] >= 1
    assert seen["intermediate", "activated"] >= 10 and seen["intermediate", "pruned"] >= 10
    assert max_roots == 2  # the next root is prepared only after the previous old one was pruned
    committed = ca.journal()
    assert committed[-1].generation == ca.generation
    assert [e.generation for e in committed] == sorted(e.generation for e in committed)


# --- crash safety ---------------------------------------------------------------------------------


def _prepare(ca: CertificateAuthority) -> None:
    ca.prepare_intermediate()


def _prepare_root(ca: CertificateAuthority) -> None:
    ca.prepare_root()


def _nothing(ca: CertificateAuthority) -> None:
    return None


def _retire_one(ca: CertificateAuthority) -> None:
    ca.rotate_intermediate(now=True)


def _prune(ca: CertificateAuthority) -> None:
    ca.tick(T0 + timedelta(days=1))


TRANSITIONS = {
    "prepare_intermediate": (_nothing, lambda ca: ca.prepare_intermediate()),
    "activate_intermediate": (_prepare, lambda ca: ca.activate_intermediate()),
    "prepare_root": (_nothing, lambda ca: ca.prepare_root()),
    "activate_root": (_prepare_root, lambda ca: ca.activate_root()),
    "prune": (_retire_one, _prune),
}


@pytest.mark.parametrize("point", CRASH_POINTS)
@pytest.mark.parametrize("transition", sorted(TRANSITIONS))
def test_crash_at_every_step_recovers_consistently(
    state: Path, clock: FakeClock, transition: str, point: CrashPoint
) -> None:
    setup, run = TRANSITIONS[transition]
    setup(CertificateAuthority.init(state, SHORT, clock))
    before = CertificateAuthority.load(state, clock)
    before_slots = {(s.id, s.state) for s in before.status().slots}
    crashing = CertificateAuthority.load(state, clock, crash_hook=crash_at(point))

    try:
        run(crashing)
        crashed = False
    except Crash:
        crashed = True

    recovered = CertificateAuthority.load(state, clock)
    committed = not crashed or point == "committed"
    assert recovered.generation == before.generation + (1 if committed else 0)
    if not committed:  # ca.json is the truth: nothing happened
        assert {(s.id, s.state) for s in recovered.status().slots} == before_slots
        assert recovered.trust_bundle_pem() == before.trust_bundle_pem()
        assert recovered.active_intermediate_id == before.active_intermediate_id
    # The journal's committed part ends exactly at ca.json's generation; an intent beyond is ignored.
    assert recovered.journal()[-1].generation == recovered.generation
    leaf = recovered.issue_workload(WORKLOAD)
    assert verifies(recovered.trust_bundle_pem(), leaf, clock.now)
    assert len(slot_ids(recovered, "root", "active")) == len(slot_ids(recovered, "intermediate", "active")) == 1

    # The next rotation succeeds, removes the leftovers, and the journal stays in step with ca.json.
    events = recovered.rotate_intermediate(now=True)
    assert events and recovered.active_intermediate_id == [e.id for e in events if e.event == "activated"][-1]
    assert files_in(state) == expected_files(recovered)
    assert [e.generation for e in read_journal(state)] == [e.generation for e in recovered.journal()]
    if not committed:  # the aborted intent's lines were cut: the journal says exactly what happened
        tail = [(j.generation, j.event, j.kind, j.id) for j in read_journal(state) if j.generation > before.generation]
        assert tail == [(e.generation, e.event, e.kind, e.id) for e in events]
    assert verifies(recovered.trust_bundle_pem(), recovered.issue_workload(WORKLOAD), clock.now)
    assert verifies(recovered.trust_bundle_pem(), leaf, clock.now)


def test_torn_journal_line_and_stray_temp_files_are_cleaned_by_the_next_transition(
    ca: CertificateAuthority, state: Path, clock: FakeClock
) -> None:
    with open(state / JOURNAL_FILE, "ab") as journal:
        journal.write(b'{"at":"2026-11-25T12:00:00+00:00","event":"prep')  # kill -9 mid-write
    (state / ".ca.json.0123456789abcdef.tmp").write_bytes(b"{")
    (state / "intermediate-0123456789abcdef-key.pem").write_bytes(b"half a transition")

    loaded = CertificateAuthority.load(state, clock)
    assert loaded.generation == 1 and [e.generation for e in loaded.journal()] == [1, 1]
    loaded.prepare_intermediate()

    assert files_in(state) == expected_files(loaded)
    assert [e.generation for e in read_journal(state)] == [1, 1, 2]
    assert (state / JOURNAL_FILE).read_bytes().endswith(b"}\n")


# --- two processes on one state directory -------------------------------------------------------


def test_server_sees_a_rotation_committed_by_the_cli(ca: CertificateAuthority, state: Path, clock: FakeClock) -> None:
    server = ca
    assert server.reload_if_changed() is False
    cli = CertificateAuthority.load(state, clock)

    events = cli.rotate_intermediate(now=True)

    new = [e.id for e in events if e.event == "activated"][0]
    assert server.active_intermediate_id != new
    assert server.reload_if_changed() is True
    assert server.reload_if_changed() is False
    assert server.generation == cli.generation and server.active_intermediate_id == new
    leaf = server.issue_workload(WORKLOAD)
    assert chain_intermediate_fingerprint(leaf) == fingerprint_of(server, new)
    assert verifies(server.trust_bundle_pem(), leaf, clock.now)


def test_a_transition_re_reads_the_state_first_so_nothing_is_duplicated(
    ca: CertificateAuthority, state: Path, clock: FakeClock
) -> None:
    other = CertificateAuthority.load(state, clock)
    other.prepare_intermediate()
    other.prepare_root()

    assert ca.prepare_intermediate() == [] and ca.prepare_root() == []  # ca had not reloaded
    assert ca.generation == other.generation == 3
    assert len(slot_ids(ca, "root", "prepared")) == 1
    assert len(slot_ids(ca, "intermediate", "prepared")) == 2  # one under each root


def test_concurrent_writers_are_serialised_by_the_lock(state: Path, clock: FakeClock) -> None:
    CertificateAuthority.init(state, SHORT, clock)
    writers = [CertificateAuthority.load(state, clock) for _ in range(4)]
    barrier = threading.Barrier(len(writers))
    results: list[int] = []

    def run(writer: CertificateAuthority) -> None:
        barrier.wait()
        results.append(len(writer.rotate_intermediate(now=True)))

    threads = [threading.Thread(target=run, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    final = CertificateAuthority.load(state, clock)
    assert final.generation == 1 + 2 * len(writers)
    assert len(slot_ids(final, "intermediate", "old")) == len(writers)
    assert [e.generation for e in final.journal()] == sorted(e.generation for e in final.journal())
    assert sorted(results) == [3] * len(writers)  # prepared, activated, retired: each its own rotation
    assert files_in(state) == expected_files(final)


def test_reload_of_a_damaged_state_raises_and_keeps_issuing(ca: CertificateAuthority, state: Path) -> None:
    (state / METADATA_FILE).write_text("{broken")

    with pytest.raises(CaStateError, match="not valid JSON"):
        ca.reload_if_changed()

    assert verifies(ca.trust_bundle_pem(), ca.issue_workload(WORKLOAD), T0)


# --- format 1 → 2 ---------------------------------------------------------------------------------


def test_v1_state_is_migrated_in_place(state: Path, clock: FakeClock) -> None:
    write_v1_state(state, CaSettings(TD), T0)
    v1_root = (state / "root.pem").read_bytes()
    v1_intermediate = (state / "intermediate.pem").read_bytes()

    ca = CertificateAuthority.load(state, clock)

    assert ca.generation == 1 and ca.settings == CaSettings(TD)
    assert ca.trust_bundle_pem() == v1_root and ca.intermediate_certificate_pem == v1_intermediate
    assert [(e.event, e.kind, e.generation) for e in ca.journal()] == [
        ("migrated", "root", 1), ("migrated", "intermediate", 1)
    ]
    assert not files_in(state) & set(V1_FILES) and files_in(state) == expected_files(ca)
    for s in ca.status().slots:
        assert stat.S_IMODE((state / slot_files(s.kind, s.id)[1]).stat().st_mode) == 0o600
    assert json.loads((state / METADATA_FILE).read_text())["format_version"] == 2
    assert verifies(v1_root, ca.issue_workload(WORKLOAD), T0)  # peers holding the old root.pem keep working
    again = CertificateAuthority.load(state, clock)
    assert again.generation == 1 and again.trust_bundle_pem() == v1_root


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_interrupted_migration_recovers(state: Path, clock: FakeClock, point: CrashPoint) -> None:
    write_v1_state(state, CaSettings(TD), T0)
    v1_root = (state / "root.pem").read_bytes()

    with pytest.raises(Crash):
        CertificateAuthority.load(state, clock, crash_hook=crash_at(point))

    ca = CertificateAuthority.load(state, clock)
    assert ca.generation == 1 and ca.trust_bundle_pem() == v1_root
    assert [e.event for e in ca.journal()] == ["migrated", "migrated"]
    ca.rotate_root(now=True)
    assert files_in(state) == expected_files(ca) and not files_in(state) & set(V1_FILES)


# --- settings and leaves --------------------------------------------------------------------------


def test_short_leaves_down_to_ten_seconds_with_a_quarter_backdate(tmp_path: Path, clock: FakeClock) -> None:
    settings = CaSettings(TD, leaf_ttl_min=timedelta(seconds=10), leaf_ttl_default=timedelta(seconds=20))
    ca = CertificateAuthority.init(tmp_path / "ca", settings, clock)

    leaf = ca.issue_workload(WORKLOAD)
    tiny = ca.issue_workload(WORKLOAD, ttl=timedelta(seconds=10))

    assert (leaf.not_before, leaf.not_after) == (T0 - timedelta(seconds=5), T0 + timedelta(seconds=20))
    assert tiny.not_before == T0 - timedelta(seconds=2)
    with pytest.raises(InvalidTtl):
        ca.issue_workload(WORKLOAD, ttl=timedelta(seconds=9))
    hour = ca.issue_workload(WORKLOAD, ttl=timedelta(hours=1))
    assert hour.not_before == T0 - settings.backdate  # long leaves keep the full backdate


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"leaf_ttl_min": timedelta(seconds=5)}, "at least 10s, got 5s"),
        ({"intermediate_prepare_at": 0.7}, "prepare_at < activate_at"),
        ({"root_activate_at": 1.0}, "root rotation fractions"),
        ({"intermediate_prepare_at": 0.0}, "intermediate rotation fractions"),
        ({"reload_grace": timedelta(hours=2)}, "reload_grace"),
    ],
)
def test_rotation_settings_are_validated(changes: dict, fragment: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidSettings, match=fragment):
        CaSettings(TD, **changes)


def test_rotation_settings_are_persisted(tmp_path: Path, clock: FakeClock) -> None:
    settings = CaSettings(TD, intermediate_prepare_at=0.4, intermediate_activate_at=0.6, root_prepare_at=0.7,
                          root_activate_at=0.75, reload_grace=timedelta(seconds=5))
    CertificateAuthority.init(tmp_path / "ca", settings, clock)
    assert CertificateAuthority.load(tmp_path / "ca", clock).settings == settings


def test_issuance_does_no_io(ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_io(*args: object, **kwargs: object) -> None:
        raise AssertionError("disk I/O on the issuance path")

    for name in ("open", "stat", "read", "write", "listdir"):
        monkeypatch.setattr(os, name, no_io)
    monkeypatch.setattr("builtins.open", no_io)

    leaf = ca.issue_workload(WORKLOAD)

    monkeypatch.undo()
    assert verifies(ca.trust_bundle_pem(), leaf, T0)


# --- status and CLI -------------------------------------------------------------------------------


def test_status_lists_slots_and_bundle(ca: CertificateAuthority, clock: FakeClock) -> None:
    ca.prepare_root()
    clock.now = T0 + timedelta(minutes=5)
    ca.activate_root()

    status = ca.status()

    assert status.trust_domain == TD and status.generation == 3
    assert [(s.kind, s.state) for s in status.slots] == [
        ("root", "active"), ("root", "old"), ("intermediate", "active"), ("intermediate", "old")
    ]
    assert all("meshca" in s.subject and len(s.fingerprint_sha256) == 64 for s in status.slots)
    old = [s for s in status.slots if s.state == "old"]
    assert all(s.retire_after == clock.now + SHORT.reload_grace + SHORT.leaf_ttl_max for s in old)
    assert [b.state for b in status.bundle] == ["active", "old"]
    json.dumps(status.to_json())
    text = cli_ca.format_status(status, clock.now)
    for s in status.slots:
        assert s.id in text
    for b in status.bundle:
        assert b.fingerprint_sha256 in text and b.subject in text


def _cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    cli_ca.add_ca_parsers(parser.add_subparsers(dest="ca_command", required=True))
    args = parser.parse_args(argv)
    out = io.StringIO()
    code = args.handler(args, out=out)
    return code, out.getvalue()


def test_cli_rotate_and_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from meshca.clock import system_clock

    state = tmp_path / "ca"
    server = CertificateAuthority.init(state, CaSettings(TD), system_clock)

    code, out = _cli("rotate", "--state-dir", str(state), "--intermediate")
    assert code == 0 and "prepared intermediate" in out
    code, out = _cli("rotate", "--state-dir", str(state), "--intermediate")
    assert code == 0 and "nothing to do" in out
    code, out = _cli("rotate", "--state-dir", str(state), "--root", "--now")
    assert code == 0 and "activated root" in out and "retired root" in out and "pruned" in out

    assert server.reload_if_changed()
    code, out = _cli("status", "--state-dir", str(state))
    assert code == 0 and f"generation {server.generation}" in out and "2 root(s)" in out
    for b in server.status().bundle:
        assert b.fingerprint_sha256 in out
    code, out = _cli("status", "--state-dir", str(state), "--json")
    assert json.loads(out)["active_intermediate_id"] == server.active_intermediate_id

    code, _ = _cli("rotate", "--state-dir", str(tmp_path / "missing"), "--root")
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_cli_needs_exactly_one_kind(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _cli("rotate", "--state-dir", str(tmp_path), "--intermediate", "--root")
    with pytest.raises(SystemExit):
        _cli("rotate", "--state-dir", str(tmp_path))

