"""vault-intermediate: Vault's PKI mount holds the root and signs meshca's intermediates, which sign every leaf here."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from meshca.backoff import backoff_delay
from meshca.ca import crypto
from meshca.ca.api import (
    CaEvent,
    CaSettings,
    CaStateError,
    CaStatus,
    JournalEvent,
    MeshCa,
    RotationRefused,
    ScheduledStep,
    SlotKind,
    SlotStatus,
    VaultAnswerInvalid,
    VaultCaError,
    VaultNotConfigured,
)
from meshca.ca.crypto import CertificateInfo, CryptoError, Issuer
from meshca.ca.policy import as_utc, due_prunes, lifetime_point, retire_after
from meshca.ca.state import (
    FORMAT_VERSION,
    SlotRecord,
    StateRecord,
    check_slot_certificate,
    check_state_dir_mode,
    commit_transition,
    create_state_dir,
    file_signature,
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
from meshca.ca.vault.pki import MODE_INTERMEDIATE, VaultCaller, VaultMode, parse_vault_chain, response_data, vault_call
from meshca.ca.vault.session import VaultError
from meshca.clock import Clock
from meshca.identity.spiffe import SpiffeId

VAULT_METADATA_FILE = "vault-ca.json"  # the commit point of a vault-intermediate state directory
INTERMEDIATE_COMMON_NAME = "meshca intermediate CA"


@dataclass(frozen=True)
class _Inter:
    record: SlotRecord
    issuer: Issuer
    chain_pem: bytes  # this intermediate, then Vault's non-root CAs above it: what every leaf chain carries


@dataclass(frozen=True)
class _Root:
    record: SlotRecord
    certificate_pem: bytes
    info: CertificateInfo


@dataclass(frozen=True)
class _NewInter:
    """An intermediate Vault just signed, not yet committed."""

    inter: _Inter
    root_pem: bytes
    root_info: CertificateInfo
    key_pem: bytes = field(repr=False)


@dataclass(frozen=True)
class _State:
    settings: CaSettings
    mount: str
    record: StateRecord
    raw: bytes
    signature: tuple[int, int, int]
    intermediates: tuple[_Inter, ...]
    roots: tuple[_Root, ...]
    signer: _Inter
    leaf_signer: LocalSigner
    bundle_pem: bytes

    def inter(self, state: str) -> _Inter | None:
        return next((i for i in self.intermediates if i.record.state == state), None)


def _derive_roots(
    intermediates: Sequence[SlotRecord], known: Mapping[str, tuple[bytes, CertificateInfo]],
    previous: Mapping[str, SlotRecord], now: datetime,
) -> tuple[SlotRecord, ...]:
    """A root's state follows its intermediates: active if it signed the active one, else prepared if it
    signed the prepared one, else old until the last of its old intermediates is retired; gone with them."""
    out: list[SlotRecord] = []
    for rid, (_, info) in known.items():
        users = [i for i in intermediates if i.issuer_id == rid]
        if not users:
            continue
        states = {u.state for u in users}
        retire: datetime | None = None
        if "active" in states:
            state = "active"
        elif "prepared" in states:
            state = "prepared"
        else:
            state = "old"
            retire = max(u.retire_after or u.not_after for u in users)
        prev = previous.get(rid)
        since = prev.since if prev is not None and prev.state == state else now
        out.append(SlotRecord("root", rid, state, None, info.not_before, info.not_after, since, retire))  # type: ignore[arg-type]
    return tuple(sorted(out, key=slot_order))


def _diff_events(before: Sequence[SlotRecord], after: Sequence[SlotRecord]) -> list[tuple[JournalEvent, SlotKind, str]]:
    old = {r.id: r for r in before}
    new = {r.id: r for r in after}
    events: list[tuple[JournalEvent, SlotKind, str]] = []
    for r in after:
        prev = old.get(r.id)
        if prev is None:
            events.append(("activated" if r.state == "active" else "prepared", r.kind, r.id))
        elif prev.state != r.state:
            events.append(("activated" if r.state == "active" else "retired", r.kind, r.id))
    events += [("pruned", r.kind, r.id) for r in before if r.id not in new]
    return events


def vault_scheduled_step(slots: Sequence[SlotRecord], settings: CaSettings, now: datetime) -> ScheduledStep | None:
    """What a vault-intermediate `tick` does next (pure): prune old intermediates past retire_after;
    prepare the next intermediate at intermediate_prepare_at of the active one's life; activate it at
    intermediate_activate_at. A prepared intermediate under a root not yet in the bundle (Vault's root
    changed) is activated no earlier than the tick after the one that prepared it."""
    if due_prunes(slots, now):
        return ScheduledStep("prune", None)
    active = next(s for s in slots if s.kind == "intermediate" and s.state == "active")
    following = next((s for s in slots if s.kind == "intermediate" and s.state == "prepared"), None)
    if following is None:
        if now >= lifetime_point(active, settings.intermediate_prepare_at):
            return ScheduledStep("prepare", "intermediate")
        return None
    if now >= lifetime_point(active, settings.intermediate_activate_at) and (
        following.issuer_id == active.issuer_id or now > following.since
    ):
        return ScheduledStep("activate", "intermediate")
    return None


def _metadata_bytes(record: StateRecord, mount: str) -> bytes:
    data = json.loads(record.to_bytes())
    data["mode"] = MODE_INTERMEDIATE
    data["vault"] = {"mount": mount}
    return (json.dumps(data, indent=2) + "\n").encode()


def is_vault_state_dir(state_dir: Path) -> bool:
    """True when `state_dir` holds a vault-intermediate CA (its vault-ca.json)."""
    return (Path(state_dir) / VAULT_METADATA_FILE).is_file()


def _build_state(
    settings: CaSettings, mount: str, record: StateRecord, raw: bytes, signature: tuple[int, int, int],
    intermediates: Sequence[_Inter], roots: Sequence[_Root],
) -> _State:
    inters = tuple(sorted(intermediates, key=lambda i: slot_order(i.record)))
    ordered_roots = tuple(sorted(roots, key=lambda r: slot_order(r.record)))
    signer = next(i for i in inters if i.record.state == "active")
    bundle = b"".join(r.certificate_pem for r in ordered_roots)
    slots = tuple(r.record for r in ordered_roots) + tuple(i.record for i in inters)
    leaf_signer = LocalSigner(signer.record.id, signer.issuer, signer.issuer.certificate_pem, signer.chain_pem,
                              signer.record.not_before, signer.record.not_after)
    return _State(settings, mount, replace(record, slots=slots), raw, signature, inters, ordered_roots, signer,
                  leaf_signer, bundle)


def _read_state(state_dir: Path, raw: bytes, data: Mapping[str, Any], settings: CaSettings | None,
                mount: str | None) -> _State:
    """Parse and cross-check vault-ca.json and every slot file."""
    path = state_dir / VAULT_METADATA_FILE
    if data.get("mode") != MODE_INTERMEDIATE or data.get("format_version") != FORMAT_VERSION:
        raise CaStateError(
            f"{path}: not a {MODE_INTERMEDIATE} state (mode {data.get('mode')!r}, "
            f"format_version {data.get('format_version')!r})"
        )
    try:
        record = StateRecord.from_json(data)
        persisted = CaSettings.from_json(record.trust_domain, record.key_algorithm, record.settings)
        vault = data["vault"]
        persisted_mount = vault["mount"]
        if not isinstance(persisted_mount, str):
            raise TypeError("vault.mount must be a string")
    except KeyError as e:
        raise CaStateError(f"{path}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CaStateError(f"{path}: invalid content: {e}") from None
    if settings is not None and settings.trust_domain != persisted.trust_domain:
        raise CaStateError(
            f"{path}: the state is for trust domain {persisted.trust_domain!r}, not {settings.trust_domain!r}"
        )
    effective = settings or persisted
    inter_records = [r for r in record.slots if r.kind == "intermediate"]
    root_records = {r.id: r for r in record.slots if r.kind == "root"}
    states = [r.state for r in inter_records]
    if states.count("active") != 1 or states.count("prepared") > 1:
        raise CaStateError(f"{path}: inconsistent slots: exactly one active and at most one prepared intermediate")
    signature = file_signature(path)
    td_uri = SpiffeId(persisted.trust_domain).uri
    roots: dict[str, _Root] = {}
    for r in root_records.values():
        cert_path = state_dir / slot_files("root", r.id)[0]
        pem = read_state_file(cert_path)
        try:
            info = crypto.parse_certificate_pem(pem)
        except CryptoError as e:
            raise CaStateError(f"{cert_path}: {e}") from None
        if slot_id(info.fingerprint_sha256) != r.id or not crypto.is_self_signed(pem):
            raise CaStateError(f"{cert_path}: not the self-signed root {r.id} recorded in {path}")
        roots[r.id] = _Root(r, pem, info)
    inters: list[_Inter] = []
    for r in inter_records:
        cert_name, key_name = slot_files("intermediate", r.id)
        cert_path = state_dir / cert_name
        chain_pem = read_state_file(cert_path)
        key_pem = read_key_file(state_dir / key_name)
        try:
            issuer = Issuer(chain_pem, key_pem)
        except CryptoError as e:
            raise CaStateError(f"{cert_path} / {key_name}: {e}") from None
        info = issuer.info
        check_slot_certificate(r, info.fingerprint_sha256, (info.not_before, info.not_after), cert_path, path)
        if info.uris != (td_uri,) or info.path_length != 0:
            raise CaStateError(f"{cert_path}: an intermediate must name {td_uri} and have pathLenConstraint 0")
        root = roots.get(r.issuer_id or "")
        blocks = crypto.split_pem_certificates(chain_pem)
        if root is None or not all(
            crypto.certificate_issued_by(c, p) for c, p in zip(blocks, blocks[1:] + [root.certificate_pem], strict=True)
        ):
            raise CaStateError(f"{cert_path}: the intermediate does not chain to root {r.issuer_id} recorded in {path}")
        inters.append(_Inter(r, issuer, chain_pem))
    return _build_state(effective, mount or persisted_mount, record, raw, signature, inters, list(roots.values()))


@dataclass(frozen=True)
class _Plan:
    intermediates: tuple[_Inter, ...]
    new: tuple[_NewInter, ...]


class VaultIntermediateCa(StateDirCa[_State, _Plan]):
    """`vault-intermediate`: Vault's PKI mount holds the root; meshca's intermediates are made locally
    (key never leaves the state directory), signed by Vault's `root/sign-intermediate`, and sign every
    leaf locally, so issuance is as fast as the internal CA's and goes on while Vault is down.

    Intermediates rotate through prepared → active → old (see `vault_scheduled_step`); the roots are
    Vault's, derived from the intermediates they signed. Only preparing an intermediate calls Vault.
    State directory: vault-ca.json (the commit point: format 2 slots plus `mode` and `vault.mount`),
    journal.jsonl, .lock, intermediate-<id>.pem (+ Vault's non-root CAs), intermediate-<id>-key.pem
    (0600), root-<id>.pem (Vault's root, certificate only). Same crash-safety rules as meshca.ca.internal.
    """

    _metadata_file = VAULT_METADATA_FILE

    def __init__(self, state_dir: Path, session: VaultCaller | None, clock: Clock, logger: logging.Logger,
                 state: _State, retry_cap: timedelta = timedelta(seconds=30)) -> None:
        """Internal: use `init` or `load`."""
        super().__init__(state_dir, clock, state)
        self._session = session
        self._log = logger
        self._retry_cap = retry_cap
        self._vault_failures = 0  # consecutive failed scheduled Vault steps
        self._vault_retry_at: datetime | None = None
        self._last_vault_error: str | None = None

    def __repr__(self) -> str:
        s = self._state
        return f"VaultIntermediateCa(trust_domain={s.settings.trust_domain!r}, mount={s.mount!r}, active={s.signer.record.id})"

    @classmethod
    def init(cls, state_dir: Path, settings: CaSettings, session: VaultCaller, clock: Clock, *, mount: str = "pki",
             logger: logging.Logger | None = None, retry_cap: timedelta = timedelta(seconds=30)) -> VaultIntermediateCa:
        """Create the first intermediate (Vault signs it; needs Vault) in `state_dir` (made 0700).

        Raises CaStateError if CA state already exists there, VaultError if Vault refuses or is down.
        """
        state_dir = Path(state_dir)
        log = logger or logging.getLogger(__name__)
        create_state_dir(state_dir, CaStateError, (VAULT_METADATA_FILE,))
        now = as_utc(clock())
        made = _sign_intermediate(session, settings, mount, now, "active", log)
        with state_lock(state_dir, exclusive=True):
            refuse_existing(state_dir, CaStateError, (VAULT_METADATA_FILE,))
            inter = made.inter
            root_id = inter.record.issuer_id or ""
            root_record = _derive_roots([inter.record], {root_id: (made.root_pem, made.root_info)}, {}, now)
            record = StateRecord(settings.trust_domain, settings.key_algorithm.value, now, 1, now, settings.to_json(),
                                 root_record + (inter.record,))
            raw, signature = _commit(state_dir, base_generation=0, referenced=(), new=(made,),
                                     events=_diff_events((), record.slots), record=record, mount=mount, remove_after=())
        roots = [_Root(root_record[0], made.root_pem, made.root_info)]
        log.info("vault-intermediate CA created: intermediate %s signed by Vault root %s (%s)", inter.record.id, root_id,
                 mount)
        return cls(state_dir, session, clock, log, _build_state(settings, mount, record, raw, signature, [inter], roots),
                   retry_cap)

    @classmethod
    def load(cls, state_dir: Path, settings: CaSettings | None, session: VaultCaller | None, clock: Clock, *,
             mount: str | None = None, logger: logging.Logger | None = None,
             retry_cap: timedelta = timedelta(seconds=30)) -> VaultIntermediateCa:
        """Load and cross-check an existing state; needs no Vault. `settings` (same trust domain) replace the
        persisted ones from the next transition on; None keeps them. Raises CaStateError naming the file."""
        state_dir = Path(state_dir)
        if not (state_dir / VAULT_METADATA_FILE).is_file():
            raise CaStateError(
                f"{state_dir}: no {VAULT_METADATA_FILE} (run `meshca ca init` in vault-intermediate mode first)"
            )
        check_state_dir_mode(state_dir)
        with state_lock(state_dir, exclusive=False):
            raw, data = read_metadata(state_dir, VAULT_METADATA_FILE)
            state = _read_state(state_dir, raw, data, settings, mount)
        return cls(state_dir, session, clock, logger or logging.getLogger(__name__), state, retry_cap)

    def _reread(self, current: _State, raw: bytes, data: dict[str, Any]) -> _State:
        return _read_state(self._dir, raw, data, current.settings, current.mount)

    # --- accessors (and StateDirCa's) ------------------------------------------------------------

    mode: VaultMode = MODE_INTERMEDIATE

    @property
    def mount(self) -> str:
        return self._state.mount

    @property
    def can_rotate_root(self) -> bool:
        """False: the root lives in Vault (the bundle holds Vault's roots that signed a kept intermediate)."""
        return False

    def crl_signers(self) -> list[tuple[SlotRecord, Issuer]]:
        """meshca's intermediates (any slot state) with their keys: each signs the CRL of the leaves it signed. The
        roots' CRLs are Vault's (`vault_crl_issuers`)."""
        return [(i.record, i.issuer) for i in self._state.intermediates]

    def vault_crl_issuers(self) -> list[bytes]:
        """The CA certificates whose CRL Vault signs: its roots in the bundle and its CAs carried in the chains."""
        state = self._state
        pems = [r.certificate_pem for r in state.roots]
        for inter in state.intermediates:
            pems += crypto.split_pem_certificates(inter.chain_pem)[1:]
        return list(dict.fromkeys(pems))

    def status(self) -> CaStatus:
        state = self._state
        slots = [
            SlotStatus(r.record.kind, r.record.id, r.record.state, r.info.subject, None, r.record.not_before,
                       r.record.not_after, r.record.since, r.record.retire_after, r.info.fingerprint_sha256)
            for r in state.roots
        ] + [
            SlotStatus(i.record.kind, i.record.id, i.record.state, i.issuer.info.subject, i.record.issuer_id,
                       i.record.not_before, i.record.not_after, i.record.since, i.record.retire_after,
                       i.issuer.info.fingerprint_sha256)
            for i in state.intermediates
        ]
        return CaStatus.from_slots(state.settings.trust_domain, state.record.generation, state.signer.record.id, slots)

    # --- transitions -------------------------------------------------------------------------

    def prepare_intermediate(self) -> list[CaEvent]:
        """Have Vault sign a new intermediate, prepared (not signing). No-op when one is prepared."""
        return self._transitions([self._plan_prepare])

    def activate_intermediate(self) -> list[CaEvent]:
        """Prepared → active, active → old. Raises RotationRefused if none is prepared."""
        return self._transitions([self._plan_activate])

    def rotate_intermediate(self, now: bool = False) -> list[CaEvent]:
        """Prepare the next intermediate if needed (Vault signs it); with `now`, activate it at once too."""
        return self._transitions([self._plan_prepare] + ([self._plan_activate] if now else []))

    def rotate_root(self, now: bool = False) -> list[CaEvent]:
        """Refused (RotationRefused): Vault holds the root; rotate it there and meshca follows."""
        raise RotationRefused("the root of this CA lives in Vault: rotate it there; meshca follows the new root")

    # `tick` (StateDirCa's) runs the schedule of `vault_scheduled_step`, every due step committed.

    def _scheduled_step(self, current: _State, now: datetime) -> ScheduledStep | None:
        return vault_scheduled_step(current.record.slots, current.settings, now)

    def _plan_scheduled(self, step: ScheduledStep, current: _State, now: datetime, after_events: bool) -> _Plan | None:
        """Only preparing (or replacing a useless prepared intermediate) needs Vault: when Vault is down that
        step raises VaultUnavailable, the active intermediate keeps signing and the next tick tries again. A
        step that needs Vault is left to the next tick when this one already committed something, so the caller
        always sees those events (and pushes a changed bundle) before a Vault failure can hide them."""
        needs_vault = self._needs_vault(step, current, now)
        if needs_vault and (after_events or (self._vault_retry_at is not None and now < self._vault_retry_at)):
            return None  # left to a later tick: after these events are seen, or after the backoff
        try:
            if step.action == "prune":
                plan = self._plan_prune(current, now)
            elif step.action == "prepare":
                plan = self._plan_prepare(current, now)
            else:
                plan = self._plan_activate(current, now, force=False)
        except (VaultError, VaultCaError) as error:
            if needs_vault:
                self._note_vault_failure(error, now)
            raise
        if needs_vault:
            self._note_vault_success()
        return plan

    def _note_vault_failure(self, error: Exception, at: datetime) -> None:
        self._vault_failures += 1
        delay = backoff_delay(self._vault_failures, timedelta(seconds=1), self._retry_cap)
        self._vault_retry_at = at + delay
        self._last_vault_error = str(error)
        self._log.warning("scheduled CA step needs Vault and failed (%d in a row); the active intermediate %s keeps "
                          "signing until %s; next attempt in %s: %s", self._vault_failures, self.active_intermediate_id,
                          self.intermediate_not_after.isoformat(), delay, error)

    def _note_vault_success(self) -> None:
        if self._vault_failures:
            self._log.info("Vault reachable again after %d failed scheduled steps", self._vault_failures)
        self._vault_failures, self._vault_retry_at, self._last_vault_error = 0, None, None

    @property
    def vault_failures(self) -> int:
        """Consecutive scheduled steps that failed because of Vault (0 once one succeeds)."""
        return self._vault_failures

    @property
    def last_vault_error(self) -> str | None:
        return self._last_vault_error

    @property
    def next_vault_attempt(self) -> datetime | None:
        """While backing off (1 s doubling, capped at `retry_cap`): when `tick` calls Vault again."""
        return self._vault_retry_at

    @staticmethod
    def _usable(following: _Inter, active: _Inter, now: datetime) -> bool:
        """A prepared intermediate worth activating: valid now and outliving the active one."""
        r = following.record
        return now < r.not_after and r.not_after >= active.record.not_after

    def _needs_vault(self, step: ScheduledStep, current: _State, now: datetime) -> bool:
        if step.action == "prepare":
            return True
        following = current.inter("prepared")
        return step.action == "activate" and following is not None and not self._usable(following, current.signer, now)

    def _vault(self) -> VaultCaller:
        if self._session is None:
            raise VaultNotConfigured("this CA was loaded without a Vault session; transitions that need Vault are off")
        return self._session

    def _plan_prepare(self, current: _State, now: datetime) -> _Plan | None:
        if current.inter("prepared") is not None:
            return None
        made = _sign_intermediate(self._vault(), current.settings, current.mount, now, "prepared", self._log)
        return _Plan(current.intermediates + (made.inter,), (made,))

    def _plan_activate(self, current: _State, now: datetime, *, force: bool = True) -> _Plan:
        """Prepared → active, active → old. Needs no Vault unless the prepared intermediate is useless
        (expired, or expiring no later than the active one): then Vault signs a fresh one. Without `force`
        (the schedule), a fresh one under a root not yet in the bundle stays prepared until the next tick."""
        following = current.inter("prepared")
        if following is None:
            raise RotationRefused("no intermediate is prepared; prepare one first")
        active = current.signer
        new: tuple[_NewInter, ...] = ()
        dropped: str | None = None
        if not self._usable(following, active, now):
            made = _sign_intermediate(self._vault(), current.settings, current.mount, now, "prepared", self._log)
            dropped, following, new = following.record.id, made.inter, (made,)
            if not force and made.inter.record.issuer_id != active.record.issuer_id:
                return _Plan(tuple(i for i in current.intermediates if i.record.id != dropped) + (made.inter,), new)
        if following.record.not_before > now:
            raise RotationRefused(
                f"intermediate {following.record.id} is valid only from {following.record.not_before.isoformat()}, "
                f"after {now.isoformat()}: is meshca's clock behind Vault's? It is activated once valid"
            )
        settings = current.settings
        inters: list[_Inter] = []
        for i in current.intermediates + tuple(m.inter for m in new):
            r = i.record
            if r.id == dropped:
                continue
            if r.id == active.record.id:
                r = replace(r, state="old", since=now, retire_after=retire_after(r, now, settings))
            elif r.id == following.record.id:
                r = replace(r, state="active", since=now)
            inters.append(replace(i, record=r))
        return _Plan(tuple(inters), new)

    def _plan_prune(self, current: _State, now: datetime) -> _Plan | None:
        due = {r.id for r in due_prunes(current.record.slots, now) if r.kind == "intermediate"}
        if not due:
            return None
        return _Plan(tuple(i for i in current.intermediates if i.record.id not in due), ())

    def _commit_plan(self, plan: _Plan, now: datetime) -> tuple[_State, list[CaEvent]]:
        current = self._state
        known = {r.record.id: (r.certificate_pem, r.info) for r in current.roots}
        for made in plan.new:
            known.setdefault(made.inter.record.issuer_id or "", (made.root_pem, made.root_info))
        previous = {r.record.id: r.record for r in current.roots}
        inter_records = tuple(i.record for i in plan.intermediates)
        root_records = _derive_roots(inter_records, known, previous, now)
        slots = root_records + tuple(sorted(inter_records, key=slot_order))
        generation = current.record.generation + 1
        record = replace(current.record, generation=generation, committed_at=now, slots=slots,
                         key_algorithm=current.settings.key_algorithm.value, settings=current.settings.to_json())
        events = _diff_events(current.record.slots, slots)
        kept = {r.id for r in slots}
        gone = [r for r in current.record.slots if r.id not in kept]
        raw, signature = _commit(
            self._dir, base_generation=current.record.generation,
            referenced=[(r.kind, r.id) for r in current.record.slots], new=plan.new, events=events, record=record,
            mount=current.mount,
            remove_after=[self._dir / name for r in gone for name in slot_files(r.kind, r.id)],
        )
        roots = [_Root(r, known[r.id][0], known[r.id][1]) for r in root_records]
        state = _build_state(current.settings, current.mount, record, raw, signature, plan.intermediates, roots)
        by_id = {r.id: r for r in slots}
        result = [
            CaEvent(kind, event, ident, generation, by_id[ident].retire_after if event == "retired" else None)
            for event, kind, ident in events
        ]
        for event in result:
            self._log.info("CA %s %s %s (generation %d)", event.event, event.kind, event.id, generation)
        return state, result


def _sign_intermediate(session: VaultCaller, settings: CaSettings, mount: str, now: datetime, state: Literal["active", "prepared"],
                       log: logging.Logger) -> _NewInter:
    """A new local key, a CA CSR, and Vault's `<mount>/root/sign-intermediate` (uri_sans spiffe://<td>,
    pathlen 0, use_csr_values false). The key never leaves this process. Raises VaultError, VaultAnswerInvalid."""
    td_uri = SpiffeId(settings.trust_domain).uri
    key_pem = crypto.generate_private_key_pem(settings.key_algorithm)
    csr = crypto.build_csr_pem(key_pem, is_ca=True, common_name=INTERMEDIATE_COMMON_NAME).decode("ascii")
    path = f"{mount}/root/sign-intermediate"
    params = {
        "uri_sans": td_uri,
        "ttl": f"{int(settings.intermediate_ttl.total_seconds())}s",
        "use_csr_values": False,
        "max_path_length": 0,
        "exclude_cn_from_sans": True,
        "organization": settings.trust_domain,
        "serial_number": secrets.token_hex(8),  # keeps the names of successive intermediates distinct
        "format": "pem",
    }

    def operation(client: Any) -> Any:
        return client.secrets.pki.sign_intermediate(
            csr=csr, common_name=INTERMEDIATE_COMMON_NAME, extra_params=dict(params), mount_point=mount
        )

    data = response_data(vault_call(session, operation, path), path)
    certificate = data.get("certificate")
    chain = data.get("ca_chain") or [data.get("issuing_ca") or ""]
    if not isinstance(certificate, str) or not isinstance(chain, list):
        raise VaultAnswerInvalid(path, "the answer has no certificate / ca_chain")
    cert_pem = crypto.split_pem_certificates(certificate.encode())
    vault_chain = parse_vault_chain([str(c).encode() for c in chain], path, issued_pem=certificate.encode())
    if len(cert_pem) != 1:
        raise VaultAnswerInvalid(path, "expected one certificate in `certificate`")
    try:
        info = crypto.parse_certificate_pem(cert_pem[0])
        key_info = crypto.private_key_info(key_pem)
    except CryptoError as e:
        raise VaultAnswerInvalid(path, f"unparsable certificate: {e}") from None
    if info.public_key.spki_der != key_info.spki_der:
        raise VaultAnswerInvalid(path, "the signed certificate is not for the key meshca sent")
    if not info.is_ca or info.path_length != 0 or info.uris != (td_uri,):
        raise VaultAnswerInvalid(
            path, f"the signed intermediate must be CA:true, pathlen 0, URI SAN {td_uri}; got CA={info.is_ca}, "
            f"pathlen={info.path_length}, URIs={list(info.uris)}"
        )
    if info.not_after <= now:
        raise VaultAnswerInvalid(path, f"the signed intermediate expires at {info.not_after.isoformat()}, already past")
    first_parent = crypto.split_pem_certificates(vault_chain.carry_pem)[:1] or [vault_chain.roots[0][0]]
    if not crypto.certificate_issued_by(cert_pem[0], first_parent[0]):
        raise VaultAnswerInvalid(path, "the signed intermediate is not signed by the first certificate of ca_chain")
    chain_pem = cert_pem[0] + vault_chain.carry_pem
    root_pem, root_info = vault_chain.roots[-1]
    issuer = Issuer(chain_pem, key_pem)
    record = SlotRecord("intermediate", slot_id(info.fingerprint_sha256), state, slot_id(root_info.fingerprint_sha256),
                        info.not_before, info.not_after, now)
    log.info("Vault signed intermediate %s (%s to %s) under root %s", record.id, info.not_before.isoformat(),
             info.not_after.isoformat(), record.issuer_id)
    return _NewInter(_Inter(record, issuer, chain_pem), root_pem, root_info, key_pem)


def _commit(
    state_dir: Path, *, base_generation: int, referenced: Sequence[tuple[SlotKind, str]], new: Sequence[_NewInter],
    events: Sequence[tuple[JournalEvent, SlotKind, str]], record: StateRecord, mount: str, remove_after: Sequence[Path],
) -> tuple[bytes, tuple[int, int, int]]:
    """meshca.ca.state's write path (commit_transition) to vault-ca.json: each new intermediate's key and chain, and
    Vault's root certificate when no referenced slot holds it yet."""
    files: list[tuple[str, bytes, int]] = []
    present = {ident for kind, ident in referenced if kind == "root"}
    for made in new:
        cert_name, key_name = slot_files("intermediate", made.inter.record.id)
        files += [(key_name, made.key_pem, 0o600), (cert_name, made.inter.chain_pem, 0o644)]
        root_id = made.inter.record.issuer_id or ""
        if root_id not in present:
            files.append((slot_files("root", root_id)[0], made.root_pem, 0o644))
            present.add(root_id)
    raw = _metadata_bytes(record, mount)
    signature = commit_transition(
        state_dir, VAULT_METADATA_FILE, raw, record=record, base_generation=base_generation, referenced=referenced,
        v2_committed=False, files=files, events=events, remove_after=remove_after,
    )
    return raw, signature


def _conforms(ca: VaultIntermediateCa) -> MeshCa:
    """vault-intermediate is a MeshCa: tests/test_ca_api.py has mypy check this."""
    return ca
