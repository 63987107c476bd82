"""The internal mesh CA: root and intermediate slots (prepared → active → old) and SPIFFE X.509-SVID leaves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from meshca.ca import crypto
from meshca.ca.api import (
    CaAlreadyExists,
    CaEvent,
    CaSettings,
    CaStateError,
    CaStatus,
    JournalEvent,
    MeshCa,
    RotationRefused,
    ScheduledStep,
    SlotKind,
    SlotState,
    SlotStatus,
)
from meshca.ca.crypto import CryptoError, DistinguishedName, Issuer
from meshca.ca.policy import (
    as_utc,
    due_prunes,
    find_slot,
    lifetime_point,
    new_serial,
    only_slot,
    retire_after,
    scheduled_step,
)
from meshca.ca.state import (
    FORMAT_VERSION,
    METADATA_FILE,
    V1_FILES,
    V1_INTERMEDIATE_CERT_FILE,
    V1_INTERMEDIATE_KEY_FILE,
    V1_ROOT_CERT_FILE,
    V1_ROOT_KEY_FILE,
    CrashHook,
    SlotRecord,
    StateRecord,
    check_slot_certificate,
    check_state_dir_mode,
    commit_transition,
    create_state_dir,
    file_signature,
    no_crash,
    parse_time,
    read_key_file,
    read_metadata,
    read_state_file,
    refuse_existing,
    slot_files,
    slot_id,
    slot_order,
    state_lock,
)
from meshca.ca.statedir import LocalSigner, StateDirCa
from meshca.clock import Clock
from meshca.identity.spiffe import SpiffeId


def _check_slots(slots: Sequence[SlotRecord], where: Path) -> None:
    """The invariants every committed state satisfies; CaStateError naming ca.json otherwise."""

    def fail(problem: str) -> CaStateError:
        return CaStateError(f"{where}: inconsistent slots: {problem}")

    ids = [s.id for s in slots]
    if len(set(ids)) != len(ids):
        raise fail("duplicate slot ids")
    count = {(k, st): sum(1 for s in slots if s.kind == k and s.state == st) for k in ("root", "intermediate")
             for st in ("prepared", "active")}
    if count["root", "active"] != 1 or count["intermediate", "active"] != 1:
        raise fail("there must be exactly one active root and one active intermediate")
    if count["root", "prepared"] > 1:
        raise fail("more than one prepared root")
    roots = {s.id: s for s in slots if s.kind == "root"}
    active_root = only_slot(slots, "root", "active")
    prepared_root = find_slot(slots, "root", "prepared")
    allowed_prepared_issuers = {active_root.id} | ({prepared_root.id} if prepared_root else set())
    seen_prepared: set[str | None] = set()
    for s in slots:
        if s.kind != "intermediate":
            continue
        if s.issuer_id not in roots:
            raise fail(f"intermediate {s.id} names issuer {s.issuer_id}, which is not a root slot")
        if s.state == "active" and s.issuer_id != active_root.id:
            raise fail(f"the active intermediate {s.id} is not signed by the active root {active_root.id}")
        if s.state == "prepared":
            if s.issuer_id not in allowed_prepared_issuers or s.issuer_id in seen_prepared:
                raise fail(f"prepared intermediate {s.id} must be the only one under the active or prepared root")
            seen_prepared.add(s.issuer_id)
        if s.state == "old" and roots[_str(s.issuer_id)].state == "prepared":
            raise fail(f"old intermediate {s.id} is signed by a prepared root")


def _str(value: str | None) -> str:
    return value or ""


# --- in-memory state ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    record: SlotRecord
    issuer: Issuer


@dataclass(frozen=True)
class _NewSlot:
    record: SlotRecord
    issuer: Issuer
    certificate_pem: bytes
    key_pem: bytes = field(repr=False)


@dataclass(frozen=True)
class _Loaded:
    settings: CaSettings
    record: StateRecord
    raw: bytes  # ca.json as read or written
    signature: tuple[int, int, int]
    slots: tuple[_Slot, ...]
    leaf_signer: LocalSigner
    bundle_pem: bytes

    @classmethod
    def build(cls, settings: CaSettings, record: StateRecord, raw: bytes, signature: tuple[int, int, int],
              slots: Sequence[_Slot]) -> _Loaded:
        ordered = tuple(sorted(slots, key=_slot_order))
        active = next(s for s in ordered if s.record.kind == "intermediate" and s.record.state == "active")
        roots = [s for s in ordered if s.record.kind == "root"]
        pem = active.issuer.certificate_pem
        signer = LocalSigner(
            active.record.id, active.issuer, pem, pem, active.issuer.info.not_before, active.issuer.info.not_after
        )
        bundle = b"".join(s.issuer.certificate_pem for s in roots)
        return cls(settings, replace(record, slots=tuple(s.record for s in ordered)), raw, signature, ordered,
                   signer, bundle)

    def get(self, kind: SlotKind, state: SlotState, issuer_id: str | None = None) -> _Slot | None:
        for s in self.slots:
            r = s.record
            if r.kind == kind and r.state == state and (issuer_id is None or r.issuer_id == issuer_id):
                return s
        return None

    def one(self, kind: SlotKind, state: SlotState) -> _Slot:
        found = self.get(kind, state)
        if found is None:
            raise CaStateError(f"no {state} {kind} in the CA state")
        return found


def _slot_order(slot: _Slot) -> tuple[int, int, datetime, str]:
    return slot_order(slot.record)


@dataclass(frozen=True)
class _Plan:
    """A transition decided on the current state: the full slot list after it, the files to write
    first, and its journal events."""

    slots: tuple[_Slot, ...]
    new: tuple[_NewSlot, ...]
    events: tuple[tuple[JournalEvent, SlotKind, str], ...]


def _make_root(settings: CaSettings, now: datetime, state: SlotState) -> _NewSlot:
    key = crypto.generate_private_key_pem(settings.key_algorithm)
    serial = new_serial()
    pem = crypto.self_signed_ca_certificate_pem(
        key,
        subject=DistinguishedName("meshca root CA", organization=settings.trust_domain, serial_number=f"{serial:x}"),
        uris=[SpiffeId(settings.trust_domain).uri],
        not_before=now - settings.backdate,
        not_after=now + settings.root_ttl,
        serial_number=serial,
    )
    issuer = Issuer(pem, key)
    info = issuer.info
    record = SlotRecord("root", slot_id(info.fingerprint_sha256), state, None, info.not_before, info.not_after, now)
    return _NewSlot(record, issuer, pem, key)


def _make_intermediate(settings: CaSettings, root: _Slot | _NewSlot, now: datetime, state: SlotState) -> _NewSlot:
    signer = root.issuer
    not_before = max(now - settings.backdate, signer.info.not_before)
    not_after = min(now + settings.intermediate_ttl, signer.info.not_after)
    if not_after <= now or now < signer.info.not_before:
        raise RotationRefused(
            f"root {root.record.id} is valid from {signer.info.not_before.isoformat()} to "
            f"{signer.info.not_after.isoformat()}, not at {now.isoformat()}: it cannot sign an intermediate; "
            "rotate the root"
        )
    key = crypto.generate_private_key_pem(settings.key_algorithm)
    serial = new_serial()
    pem = signer.sign_ca_certificate(
        crypto.public_key_pem(key),
        subject=DistinguishedName(
            "meshca intermediate CA", organization=settings.trust_domain, serial_number=f"{serial:x}"
        ),
        uris=[SpiffeId(settings.trust_domain).uri],
        not_before=not_before,
        not_after=not_after,
        serial_number=serial,
        path_length=0,
    )
    issuer = Issuer(pem, key)
    info = issuer.info
    record = SlotRecord(
        "intermediate", slot_id(info.fingerprint_sha256), state, root.record.id, info.not_before, info.not_after, now
    )
    return _NewSlot(record, issuer, pem, key)


def _load_issuer(state_dir: Path, cert_file: str, key_file: str) -> tuple[Issuer, bytes, bytes]:
    cert_pem = read_state_file(state_dir / cert_file)
    key_pem = read_key_file(state_dir / key_file)
    try:
        crypto.parse_certificate_pem(cert_pem)
    except CryptoError as e:
        raise CaStateError(f"{state_dir / cert_file}: {e}") from None
    try:
        crypto.private_key_info(key_pem)
    except CryptoError as e:
        raise CaStateError(f"{state_dir / key_file}: {e}") from None
    try:
        return Issuer(cert_pem, key_pem), cert_pem, key_pem
    except CryptoError as e:
        raise CaStateError(f"{state_dir / cert_file} / {key_file}: {e}") from None


def _check_ca_certificate(path: Path, issuer: Issuer, settings: CaSettings, metadata: Path) -> None:
    td_uri = SpiffeId(settings.trust_domain).uri
    if issuer.info.uris != (td_uri,):
        raise CaStateError(
            f"{path}: certificate names {list(issuer.info.uris)}, "
            f"not the trust domain {td_uri} recorded in {metadata}"
        )
    if issuer.key_info.algorithm is not settings.key_algorithm:
        raise CaStateError(
            f"{path}: key is {issuer.key_info.kind}-{issuer.key_info.bits}, "
            f"but {metadata.name} records {settings.key_algorithm.value}"
        )


def _settings_from(path: Path, trust_domain: object, key_algorithm: object, data: object) -> CaSettings:
    try:
        if not isinstance(trust_domain, str) or not isinstance(key_algorithm, str) or not isinstance(data, dict):
            raise TypeError("trust_domain and key_algorithm must be strings, settings an object")
        return CaSettings.from_json(trust_domain, key_algorithm, data)
    except KeyError as e:
        raise CaStateError(f"{path}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CaStateError(f"{path}: invalid content: {e}") from None


def _read_v2(state_dir: Path, raw: bytes, data: Mapping[str, Any]) -> _Loaded:
    """Parse and cross-check a format-2 state (ca.json plus every slot's files)."""
    path = state_dir / METADATA_FILE
    for key in ("trust_domain", "key_algorithm", "settings"):
        if key not in data:
            raise CaStateError(f"{path}: missing key {key!r}")
    settings = _settings_from(path, data["trust_domain"], data["key_algorithm"], data["settings"])
    try:
        record = StateRecord.from_json(data)
    except KeyError as e:
        raise CaStateError(f"{path}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CaStateError(f"{path}: invalid content: {e}") from None
    signature = file_signature(path)
    _check_slots(record.slots, path)
    slots: list[_Slot] = []
    contents: set[bytes] = set()
    for r in record.slots:
        cert_name, key_name = slot_files(r.kind, r.id)
        issuer, cert_pem, key_pem = _load_issuer(state_dir, cert_name, key_name)
        contents |= {cert_pem, key_pem}
        info = issuer.info
        cert_path = state_dir / cert_name
        check_slot_certificate(r, info.fingerprint_sha256, (info.not_before, info.not_after), cert_path, path)
        if r.kind == "intermediate" and info.path_length != 0:
            raise CaStateError(f"{cert_path}: an intermediate must have pathLenConstraint 0")
        if r.kind == "root" and not issuer.issued(issuer.certificate_pem):
            raise CaStateError(f"{cert_path}: the root certificate is not self-signed")
        _check_ca_certificate(cert_path, issuer, settings, path)
        slots.append(_Slot(r, issuer))
    roots = {s.record.id: s for s in slots if s.record.kind == "root"}
    for s in slots:
        if s.record.kind == "intermediate" and not roots[_str(s.record.issuer_id)].issuer.issued(s.issuer.certificate_pem):
            cert_name, _ = slot_files("intermediate", s.record.id)
            raise CaStateError(
                f"{state_dir / cert_name}: the intermediate is not signed by root {s.record.issuer_id} "
                f"({state_dir / slot_files('root', _str(s.record.issuer_id))[0]})"
            )
    for name in V1_FILES:
        v1_path = state_dir / name
        if v1_path.exists() and read_state_file(v1_path) not in contents:
            raise CaStateError(
                f"{v1_path}: a format-1 CA file in a format-{FORMAT_VERSION} state directory that matches no slot "
                f"in {path}; it is not used (the CA's files are now <kind>-<id>.pem): remove it"
            )
    return _Loaded.build(settings, record, raw, signature, slots)


def _commit(
    state_dir: Path,
    *,
    base_generation: int,
    referenced: Sequence[tuple[SlotKind, str]],
    v2_committed: bool,
    new: Sequence[_NewSlot],
    events: Sequence[tuple[JournalEvent, SlotKind, str]],
    record: StateRecord,
    remove_after: Sequence[Path],
    crash: CrashHook,
) -> tuple[bytes, tuple[int, int, int]]:
    """commit_transition of `record` to ca.json, writing each new slot's key, then its certificate."""
    files: list[tuple[str, bytes, int]] = []
    for slot in new:
        cert_name, key_name = slot_files(slot.record.kind, slot.record.id)
        files += [(key_name, slot.key_pem, 0o600), (cert_name, slot.certificate_pem, 0o644)]
    raw = record.to_bytes()
    signature = commit_transition(
        state_dir, METADATA_FILE, raw, record=record, base_generation=base_generation, referenced=referenced,
        v2_committed=v2_committed, files=files, events=events, remove_after=remove_after, crash=crash,
    )
    return raw, signature


def _migrate_v1(state_dir: Path, data: Mapping[str, Any], now: datetime, crash: CrashHook) -> _Loaded:
    """Format 1 (root.pem, intermediate.pem, ...) → slots, in place, as one journaled transition.

    The slot files are copies, ca.json is replaced last; only then are the format-1 files removed.
    Interrupted before the commit, the format-1 state is intact and the next load migrates again;
    after it, the left-over format-1 files equal slot files and are removed by the next transition.
    """
    path = state_dir / METADATA_FILE
    for key in ("trust_domain", "key_algorithm", "settings"):
        if key not in data:
            raise CaStateError(f"{path}: missing key {key!r}")
    settings = _settings_from(path, data["trust_domain"], data["key_algorithm"], data["settings"])
    root, root_cert, root_key = _load_issuer(state_dir, V1_ROOT_CERT_FILE, V1_ROOT_KEY_FILE)
    inter, inter_cert, inter_key = _load_issuer(state_dir, V1_INTERMEDIATE_CERT_FILE, V1_INTERMEDIATE_KEY_FILE)
    root_path, inter_path = state_dir / V1_ROOT_CERT_FILE, state_dir / V1_INTERMEDIATE_CERT_FILE
    if not root.issued(root.certificate_pem):
        raise CaStateError(f"{root_path}: the root certificate is not self-signed")
    if not root.issued(inter.certificate_pem):
        raise CaStateError(f"{inter_path}: the intermediate is not signed by the root in {root_path}")
    if inter.info.path_length != 0:
        raise CaStateError(f"{inter_path}: the intermediate must have pathLenConstraint 0")
    for p, issuer in ((root_path, root), (inter_path, inter)):
        _check_ca_certificate(p, issuer, settings, path)
    try:
        created_at = parse_time(data.get("created_at", now.isoformat()), "created_at")
    except (TypeError, ValueError) as e:
        raise CaStateError(f"{path}: invalid content: {e}") from None
    root_id, inter_id = slot_id(root.info.fingerprint_sha256), slot_id(inter.info.fingerprint_sha256)
    root_slot = _NewSlot(
        SlotRecord("root", root_id, "active", None, root.info.not_before, root.info.not_after, created_at),
        root, root_cert, root_key,
    )
    inter_slot = _NewSlot(
        SlotRecord("intermediate", inter_id, "active", root_id, inter.info.not_before, inter.info.not_after, created_at),
        inter, inter_cert, inter_key,
    )
    record = StateRecord(
        settings.trust_domain, settings.key_algorithm.value, created_at, 1, now, settings.to_json(),
        (root_slot.record, inter_slot.record),
    )
    raw, signature = _commit(
        state_dir, base_generation=0, referenced=(), v2_committed=False, new=(root_slot, inter_slot),
        events=(("migrated", "root", root_id), ("migrated", "intermediate", inter_id)), record=record,
        remove_after=[state_dir / name for name in V1_FILES], crash=crash,
    )
    return _Loaded.build(settings, record, raw, signature, [_Slot(root_slot.record, root), _Slot(inter_slot.record, inter)])


class CertificateAuthority(StateDirCa[_Loaded, _Plan]):
    """An internal CA loaded from (or initialised in) a state directory.

    Construct with `init` (new CA) or `load` (existing CA). Issuing methods are thread-safe, do no
    I/O and always sign with the active intermediate. Transitions (prepare/activate/rotate/tick)
    hold an exclusive flock on state_dir/.lock, re-read ca.json first, and commit by replacing
    ca.json; another process on the same directory sees them through `reload_if_changed`.
    """

    _metadata_file = METADATA_FILE

    def __init__(self, state_dir: Path, clock: Clock, loaded: _Loaded, crash_hook: CrashHook | None = None) -> None:
        """Internal: use `init` or `load`."""
        super().__init__(state_dir, clock, loaded)
        self._crash: CrashHook = crash_hook or no_crash

    # --- state -------------------------------------------------------------------------------

    @classmethod
    def init(
        cls, state_dir: Path, settings: CaSettings, clock: Clock, *, crash_hook: CrashHook | None = None
    ) -> CertificateAuthority:
        """Create a new root and intermediate (both active) in `state_dir` (made 0700) and return the CA.

        Raises CaAlreadyExists if any CA state file already exists there; never overwrites.
        ca.json is written last, so an interrupted init leaves a state `load` refuses.
        """
        state_dir = Path(state_dir)
        create_state_dir(state_dir, CaAlreadyExists)
        now = as_utc(clock())
        crash = crash_hook or no_crash
        with state_lock(state_dir, exclusive=True):
            refuse_existing(state_dir, CaAlreadyExists)
            root = _make_root(settings, now, "active")
            inter = _make_intermediate(settings, root, now, "active")
            record = StateRecord(
                settings.trust_domain, settings.key_algorithm.value, now, 1, now, settings.to_json(),
                (root.record, inter.record),
            )
            raw, signature = _commit(
                state_dir, base_generation=0, referenced=(), v2_committed=False, new=(root, inter),
                events=(("activated", "root", root.record.id), ("activated", "intermediate", inter.record.id)),
                record=record, remove_after=(), crash=crash,
            )
        slots = [_Slot(root.record, root.issuer), _Slot(inter.record, inter.issuer)]
        return cls(state_dir, clock, _Loaded.build(settings, record, raw, signature, slots), crash_hook)

    @classmethod
    def load(cls, state_dir: Path, clock: Clock, *, crash_hook: CrashHook | None = None) -> CertificateAuthority:
        """Load and cross-check an existing CA; raises CaStateError (naming the file) on any problem.

        A format-1 directory is migrated in place to format 2 (see docs/ca-rotation.md).
        """
        state_dir = Path(state_dir)
        if not state_dir.is_dir():
            raise CaStateError(f"{state_dir}: CA state directory does not exist (run `meshca ca init` first)")
        check_state_dir_mode(state_dir)
        # a shared lock (reading needs no write access); a format-1 state is migrated under the exclusive one
        for exclusive in (False, True):
            with state_lock(state_dir, exclusive=exclusive):
                raw, data = read_metadata(state_dir)
                version = data.get("format_version")
                if version == FORMAT_VERSION:
                    return cls(state_dir, clock, _read_v2(state_dir, raw, data), crash_hook)
                if version != 1:
                    raise CaStateError(
                        f"{state_dir / METADATA_FILE}: unsupported format_version {version!r} "
                        f"(expected {FORMAT_VERSION}, or 1 which is migrated)"
                    )
                if exclusive:
                    loaded = _migrate_v1(state_dir, data, as_utc(clock()), crash_hook or no_crash)
                    return cls(state_dir, clock, loaded, crash_hook)
        raise AssertionError("unreachable")

    def _reread(self, current: _Loaded, raw: bytes, data: dict[str, Any]) -> _Loaded:
        path = self._dir / METADATA_FILE
        if data.get("format_version") != FORMAT_VERSION:
            raise CaStateError(f"{path}: format_version changed to {data.get('format_version')!r} under a running CA")
        loaded = _read_v2(self._dir, raw, data)
        if loaded.settings.trust_domain != current.settings.trust_domain:
            raise CaStateError(f"{path}: trust domain changed from {current.settings.trust_domain!r}")
        return loaded

    # --- accessors (and StateDirCa's) ------------------------------------------------------------

    @property
    def can_rotate_root(self) -> bool:
        return True

    def crl_signers(self) -> list[tuple[SlotRecord, Issuer]]:
        """Every root and intermediate of the state (any slot state) with its key: each signs a CRL."""
        return [(s.record, s.issuer) for s in self._state.slots]

    def status(self) -> CaStatus:
        state = self._state
        slots = tuple(
            SlotStatus(
                s.record.kind, s.record.id, s.record.state, s.issuer.info.subject, s.record.issuer_id,
                s.record.not_before, s.record.not_after, s.record.since, s.record.retire_after,
                s.issuer.info.fingerprint_sha256,
            )
            for s in state.slots
        )
        return CaStatus.from_slots(state.settings.trust_domain, state.record.generation, state.leaf_signer.id, slots)

    # --- transitions -------------------------------------------------------------------------

    def prepare_intermediate(self) -> list[CaEvent]:
        """Create the next intermediate, signed by the active root, in state prepared (not signing).

        No-op ([]) when one is already prepared under the active root.
        """
        return self._transitions([self._plan_prepare_intermediate])

    def activate_intermediate(self) -> list[CaEvent]:
        """Prepared → active, active → old (with retire_after). Raises RotationRefused if none is prepared."""
        return self._transitions([self._plan_activate_intermediate])

    def rotate_intermediate(self, now: bool = False) -> list[CaEvent]:
        """Prepare the next intermediate if needed; with `now`, activate it at once too."""
        steps = [self._plan_prepare_intermediate] + ([self._plan_activate_intermediate] if now else [])
        return self._transitions(steps)

    def prepare_root(self) -> list[CaEvent]:
        """Create a new self-signed root (prepared: in the trust bundle at once, signing nothing yet)
        and an intermediate signed by it (prepared). No-op ([]) when a root is already prepared."""
        return self._transitions([self._plan_prepare_root])

    def activate_root(self) -> list[CaEvent]:
        """Switch to the prepared root and its intermediate; the old root and intermediate become old
        (the root stays in the bundle until the old intermediate's retire_after). Raises RotationRefused
        if no root is prepared."""
        return self._transitions([self._plan_activate_root])

    def rotate_root(self, now: bool = False) -> list[CaEvent]:
        """Prepare a new root if needed; with `now`, activate it at once too (see docs/ca-rotation.md:
        publish the bundle to every peer before handing out leaves of the new root)."""
        steps = [self._plan_prepare_root] + ([self._plan_activate_root] if now else [])
        return self._transitions(steps)

    # `tick` (StateDirCa's) runs the policy of `scheduled_step`, every due step committed.

    def _scheduled_step(self, current: _Loaded, now: datetime) -> ScheduledStep | None:
        return scheduled_step(current.record.slots, current.settings, now)

    def _plan_scheduled(self, step: ScheduledStep, current: _Loaded, now: datetime, after_events: bool) -> _Plan | None:
        if step.action == "prune":
            return self._plan_prune(current, now)
        if step.kind == "root":
            plan = self._plan_prepare_root if step.action == "prepare" else self._plan_activate_root
        else:
            plan = self._plan_prepare_intermediate if step.action == "prepare" else self._plan_activate_intermediate
        return plan(current, now)

    def _commit_plan(self, plan: _Plan, now: datetime) -> tuple[_Loaded, list[CaEvent]]:
        current = self._state
        generation = current.record.generation + 1
        kept = {s.record.id for s in plan.slots}
        pruned = [s.record for s in current.slots if s.record.id not in kept]
        record = replace(current.record, generation=generation, committed_at=now,
                         slots=tuple(s.record for s in sorted(plan.slots, key=_slot_order)))
        raw, signature = _commit(
            self._dir,
            base_generation=current.record.generation,
            referenced=[(s.record.kind, s.record.id) for s in current.slots],
            v2_committed=True,
            new=plan.new,
            events=plan.events,
            record=record,
            remove_after=[self._dir / name for r in pruned for name in slot_files(r.kind, r.id)],
            crash=self._crash,
        )
        retire = {s.record.id: s.record.retire_after for s in plan.slots}
        return _Loaded.build(current.settings, record, raw, signature, plan.slots), [
            CaEvent(kind, event, ident, generation, retire.get(ident) if event == "retired" else None)
            for event, kind, ident in plan.events
        ]

    # --- decisions (no I/O: they only create keys and certificates in memory) -----------------

    def _fresh(self, slot: _Slot, now: datetime) -> bool:
        """A prepared intermediate is still worth activating: not yet at its own prepare point."""
        return now < lifetime_point(slot.record, self._state.settings.intermediate_prepare_at)

    def _plan_prepare_intermediate(self, current: _Loaded, now: datetime) -> _Plan | None:
        root = current.one("root", "active")
        if current.get("intermediate", "prepared", root.record.id) is not None:
            return None
        new = _make_intermediate(current.settings, root, now, "prepared")
        return _Plan(
            current.slots + (_Slot(new.record, new.issuer),), (new,), (("prepared", "intermediate", new.record.id),)
        )

    def _plan_activate_intermediate(self, current: _Loaded, now: datetime) -> _Plan:
        root = current.one("root", "active")
        following = current.get("intermediate", "prepared", root.record.id)
        if following is None:
            raise RotationRefused("no intermediate is prepared under the active root; prepare one first")
        return self._switch(current, now, root, following, None)

    def _plan_prepare_root(self, current: _Loaded, now: datetime) -> _Plan | None:
        if current.get("root", "prepared") is not None:
            return None
        root = _make_root(current.settings, now, "prepared")
        inter = _make_intermediate(current.settings, root, now, "prepared")
        return _Plan(
            current.slots + (_Slot(root.record, root.issuer), _Slot(inter.record, inter.issuer)),
            (root, inter),
            (("prepared", "root", root.record.id), ("prepared", "intermediate", inter.record.id)),
        )

    def _plan_activate_root(self, current: _Loaded, now: datetime) -> _Plan:
        new_root = current.get("root", "prepared")
        if new_root is None:
            raise RotationRefused("no root is prepared; prepare one first")
        following = current.get("intermediate", "prepared", new_root.record.id)
        return self._switch(current, now, new_root, following, current.one("root", "active"))

    def _switch(
        self, current: _Loaded, now: datetime, root: _Slot, following: _Slot | None, old_root: _Slot | None
    ) -> _Plan:
        """Activate `following` (an intermediate under `root`; a fresh one replaces it if missing or
        stale) and, for a root switch, `root` itself, retiring the active ones."""
        settings = current.settings
        events: list[tuple[JournalEvent, SlotKind, str]] = []
        new: list[_NewSlot] = []
        dropped: set[str] = set()
        if old_root is not None:
            events.append(("activated", "root", root.record.id))
            # The old root's next intermediate never signed anything: drop it.
            stale_next = current.get("intermediate", "prepared", old_root.record.id)
            if stale_next is not None:
                dropped.add(stale_next.record.id)
        if following is None or not self._fresh(following, now):
            if following is not None:
                dropped.add(following.record.id)
            made = _make_intermediate(settings, root, now, "active")
            new.append(made)
            following = _Slot(made.record, made.issuer)
            events.append(("prepared", "intermediate", made.record.id))
        events.append(("activated", "intermediate", following.record.id))
        old_inter = current.one("intermediate", "active")
        old_inter_retire = retire_after(old_inter.record, now, settings)
        events.append(("retired", "intermediate", old_inter.record.id))
        slots: list[_Slot] = []
        for s in current.slots:
            r = s.record
            if r.id in dropped:
                continue
            if r.id == old_inter.record.id:
                r = replace(r, state="old", since=now, retire_after=old_inter_retire)
            elif r.id == following.record.id:
                r = replace(r, state="active", since=now)
            elif old_root is not None and r.id == root.record.id:
                r = replace(r, state="active", since=now)
            elif old_root is not None and r.id == old_root.record.id:
                leaves_end = [old_inter_retire] + [
                    x.record.retire_after for x in current.slots
                    if x.record.issuer_id == r.id and x.record.state == "old" and x.record.retire_after
                ]
                r = replace(r, state="old", since=now, retire_after=max(leaves_end))
                events.append(("retired", "root", r.id))
            slots.append(_Slot(r, s.issuer))
        if new:
            slots.append(following)
        events += [("pruned", "intermediate", ident) for ident in sorted(dropped)]
        return _Plan(tuple(slots), tuple(new), tuple(events))

    def _plan_prune(self, current: _Loaded, now: datetime) -> _Plan | None:
        due = {r.id for r in due_prunes(current.record.slots, now)}
        if not due:
            return None
        gone = [s.record for s in current.slots if s.record.id in due]
        return _Plan(
            tuple(s for s in current.slots if s.record.id not in due),
            (),
            tuple(("pruned", r.kind, r.id) for r in sorted(gone, key=lambda r: (r.kind != "intermediate", r.id))),
        )


def _conforms(ca: CertificateAuthority) -> MeshCa:
    """The internal CA is a MeshCa: tests/test_ca_api.py has mypy check this."""
    return ca
