"""Vault-backed CA backends: vault-intermediate (Vault signs meshca's intermediate) and vault-leaf (every leaf)."""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from meshca.backoff import backoff_delay
from meshca.ca import crypto
from meshca.ca.crypto import CertificateInfo, CryptoError, Issuer
from meshca.ca.internal import (
    CaEvent,
    CaSettings,
    CaStatus,
    CsrRejected,
    IssuedCertificate,
    IssuerExpired,
    RotationRefused,
    ScheduledStep,
    SlotStatus,
    StateDirCa,
    as_utc,
    check_csr,
    check_identity,
    check_server_names,
    due_prunes,
    leaf_validity,
    lifetime_point,
    new_serial,
    retire_after,
)
from meshca.ca.state import (
    FORMAT_VERSION,
    CaError,
    CaStateError,
    JournalEvent,
    SlotKind,
    SlotRecord,
    SlotState,
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
from meshca.ca.vault.session import VaultDenied, VaultError, VaultUnavailable
from meshca.clock import Clock
from meshca.identity.spiffe import SpiffeId

VAULT_METADATA_FILE = "vault-ca.json"  # the commit point of a vault-intermediate state directory
VaultMode = Literal["vault-intermediate", "vault-leaf"]
MODE_INTERMEDIATE: VaultMode = "vault-intermediate"
MODE_LEAF: VaultMode = "vault-leaf"
INTERMEDIATE_COMMON_NAME = "meshca intermediate CA"

_MAX_TICK_STEPS = 8

T = TypeVar("T")


class VaultCaller(Protocol):
    """What the Vault backends need from meshca.ca.vault.session.VaultSession: one call, errors mapped to VaultError."""

    def call(self, operation: Callable[[Any], T], what: str) -> T: ...


class VaultCaError(CaError):
    """A problem of a Vault-backed CA that is not an error answer from Vault itself."""


class VaultNotConfigured(VaultCaError):
    """A transition needs Vault but the CA was loaded without a Vault session (e.g. for `ca status`)."""


class VaultAnswerInvalid(VaultCaError):
    """Vault answered, but with something meshca cannot use (wrong SAN, not a CA, no root); names the path."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class RateLimited(VaultCaError):
    """vault-leaf: more signing requests than `max_rate`/`burst` allow; retryable (try again shortly)."""


class ServerCertificateUnsupported(VaultCaError):
    """vault-leaf mode does not issue meshca's own TLS server certificate."""


# Vault's answers, as raised by these backends: still the meshca.ca.vault.session classes (path, reason, status), and also
# CaErrors, so that callers that handle CA failures (stream open → UNAVAILABLE) handle them too.


class CaVaultError(VaultError, CaError):
    """Vault refused the request (e.g. 400: the role does not allow the SAN); `path` and `reason` say why."""


class CaVaultUnavailable(VaultUnavailable, CaError):
    """Vault down, sealed, timing out or failing (5xx): retryable; the CA keeps what it has."""


class CaVaultDenied(VaultDenied, CaError):
    """Vault refused meshca's token (403/401) even after logging in again."""


class VaultRefused(VaultCaError, CsrRejected):
    """vault-leaf: Vault refused, for good, a signing request that meshca's own checks allowed (e.g. its role
    forbids the key type or the identity, or the role is missing): FAILED_PRECONDITION at the CSR API, not
    retried. str() is meshca's words for the caller, without Vault's path or address; `path`, `status` and
    `vault_reason` are for the log."""

    def __init__(self, reason: str, path: str, status: int | None, vault_reason: str) -> None:
        super().__init__(reason, "failed_precondition")
        self.path = path
        self.status = status
        self.vault_reason = vault_reason


_URL = re.compile(r"https?://\S+")


def _as_ca_error(error: VaultError) -> VaultError:
    if isinstance(error, CaError):
        return error
    kind = CaVaultUnavailable if isinstance(error, VaultUnavailable) else (
        CaVaultDenied if isinstance(error, VaultDenied) else CaVaultError)
    return kind(error.method, error.path, error.reason, error.status)


def _vault_call(session: VaultCaller, operation: Callable[[Any], T], path: str) -> T:
    """session.call with Vault's errors raised as the CaError-flavoured classes above (no stack of hvac)."""
    try:
        return session.call(operation, path)
    except VaultError as error:
        raise _as_ca_error(error) from None


def _response_data(response: Any, path: str) -> Mapping[str, Any]:
    """The `data` object of an hvac answer (a dict with the JSON adapter, a requests.Response otherwise)."""
    body = response.json() if hasattr(response, "json") and not isinstance(response, dict) else response
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise VaultAnswerInvalid(path, "the answer has no `data` object")
    return data


@dataclass(frozen=True)
class VaultChain:
    """Vault's issuing chain as meshca uses it: what leaves carry, and the roots peers trust."""

    issuing_pem: bytes  # the CA that signs (first of ca_chain)
    issuing: CertificateInfo
    carry_pem: bytes  # non-root CAs of the chain, issuing first: appended to every leaf (empty for a root mount)
    roots: tuple[tuple[bytes, CertificateInfo], ...]  # the self-signed certificates of the chain


def parse_vault_chain(blocks: Sequence[bytes], path: str, *, issued_pem: bytes = b"") -> VaultChain:
    """Split a ca_chain (issuing CA first, root last) into carried CAs and roots; checks every link.
    `issued_pem`, the certificate the answer is about, is left out (sign-intermediate lists it first)."""
    own = {b.strip() for b in crypto.split_pem_certificates(issued_pem)}
    pems = [b for block in blocks for b in crypto.split_pem_certificates(block) if b.strip() not in own]
    if not pems:
        raise VaultAnswerInvalid(path, "no CA certificate in the answer (is the PKI mount configured?)")
    try:
        infos = [crypto.parse_certificate_pem(p) for p in pems]
    except CryptoError as e:
        raise VaultAnswerInvalid(path, f"unparsable CA certificate: {e}") from None
    roots = tuple((p, i) for p, i in zip(pems, infos, strict=True) if crypto.is_self_signed(p))
    carried = [p for p in pems if not crypto.is_self_signed(p)]
    if not roots:
        raise VaultAnswerInvalid(
            path, "the CA chain holds no self-signed root; import the full chain (with the root) into the mount's issuer"
        )
    for child, parent in zip(carried, carried[1:] + [roots[0][0]]):  # nothing to check for a root mount
        if not crypto.certificate_issued_by(child, parent):
            raise VaultAnswerInvalid(path, "the CA chain is not in order (each certificate signed by the next)")
    if not all(i.is_ca for i in infos):
        raise VaultAnswerInvalid(path, "a certificate of the CA chain is not a CA certificate")
    return VaultChain(pems[0], infos[0], b"".join(carried), roots)


# --- vault-intermediate: state ----------------------------------------------------------------------


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
    bundle_pem: bytes

    def inter(self, state: str) -> _Inter | None:
        return next((i for i in self.intermediates if i.record.state == state), None)

    @property
    def slot_records(self) -> tuple[SlotRecord, ...]:
        return tuple(r.record for r in self.roots) + tuple(i.record for i in self.intermediates)


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
    return _State(settings, mount, replace(record, slots=slots), raw, signature, inters, ordered_roots, signer, bundle)


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
        self._dir = state_dir
        self._session = session
        self._clock = clock
        self._log = logger
        self._state = state
        self._mutex = threading.RLock()
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
        log = logger or logging.getLogger("meshca.ca.vault.modes")
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
        return cls(state_dir, session, clock, logger or logging.getLogger("meshca.ca.vault.modes"), state, retry_cap)

    def _reread(self, current: _State, raw: bytes, data: dict[str, Any]) -> _State:
        return _read_state(self._dir, raw, data, current.settings, current.mount)

    # --- accessors (and StateDirCa's) ------------------------------------------------------------

    mode: VaultMode = MODE_INTERMEDIATE

    @property
    def mount(self) -> str:
        return self._state.mount

    @property
    def active_intermediate_id(self) -> str:
        return self._state.signer.record.id

    @property
    def intermediate_certificate_pem(self) -> bytes:
        return self._state.signer.issuer.certificate_pem

    @property
    def intermediate_not_after(self) -> datetime:
        return self._state.signer.record.not_after

    def trust_bundle_pem(self) -> bytes:
        """Vault's root(s) that signed a prepared, active or old intermediate: active first."""
        return self._state.bundle_pem

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

    def tick(self, now: datetime | None = None) -> list[CaEvent]:
        """The schedule (`vault_scheduled_step`), every due step committed. Only preparing (or replacing a
        useless prepared intermediate) needs Vault: when Vault is down that step raises VaultUnavailable, the
        active intermediate keeps signing and the next tick tries again. A step that needs Vault is left to
        the next tick when this one already committed something, so the caller always sees those events
        (and pushes a changed bundle) before a Vault failure can hide them. Nothing due: no lock, no write."""
        self.reload_if_changed()
        due_at = as_utc(now if now is not None else self._clock())
        if vault_scheduled_step(self._state.record.slots, self._state.settings, due_at) is None:
            return []
        with self._mutex, state_lock(self._dir, exclusive=True):
            self._refresh_locked()
            at = as_utc(now if now is not None else self._clock())
            events: list[CaEvent] = []
            for _ in range(_MAX_TICK_STEPS):
                current = self._state
                step = vault_scheduled_step(current.record.slots, current.settings, at)
                if step is None:
                    break
                needs_vault = self._needs_vault(step, current, at)
                if needs_vault and (events or (self._vault_retry_at is not None and at < self._vault_retry_at)):
                    break  # left to a later tick: after these events are seen, or after the backoff
                try:
                    if step.action == "prune":
                        plan = self._plan_prune(current, at)
                    elif step.action == "prepare":
                        plan = self._plan_prepare(current, at)
                    else:
                        plan = self._plan_activate(current, at, force=False)
                except (VaultError, VaultCaError) as error:
                    if needs_vault:
                        self._note_vault_failure(error, at)
                    raise
                if needs_vault:
                    self._note_vault_success()
                if plan is None:
                    break
                events += self._apply_locked(plan, at)
            return events

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

    def _apply_locked(self, plan: _Plan, now: datetime) -> list[CaEvent]:
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
        self._state = _build_state(current.settings, current.mount, record, raw, signature, plan.intermediates, roots)
        by_id = {r.id: r for r in slots}
        result = [
            CaEvent(kind, event, ident, generation, by_id[ident].retire_after if event == "retired" else None)
            for event, kind, ident in events
        ]
        for event in result:
            self._log.info("CA %s %s %s (generation %d)", event.event, event.kind, event.id, generation)
        return result

    # --- issuance (local, no I/O) ---------------------------------------------------------------

    def issue_workload(self, spiffe_id: SpiffeId, ttl: timedelta | None = None) -> IssuedCertificate:
        """A new key pair and an X.509-SVID signed locally by the active intermediate (TTL policy: CaSettings).
        Raises IdentityRejected, InvalidTtl, IssuerExpired."""
        state = self._state
        check_identity(spiffe_id, state.settings.trust_domain)
        signer = state.signer
        not_before, not_after = leaf_validity(
            state.settings, as_utc(self._clock()), signer.record.not_before, signer.record.not_after, ttl
        )
        serial = new_serial()
        cert_pem, key_pem = signer.issuer.issue_leaf(
            uri=spiffe_id.uri, not_before=not_before, not_after=not_after, serial_number=serial,
            key_algorithm=state.settings.leaf_key_algorithm,
        )
        return IssuedCertificate(spiffe_id, cert_pem, cert_pem + signer.chain_pem, key_pem, serial, not_before, not_after)

    def sign_csr(self, csr_pem: bytes, spiffe_id: SpiffeId, ttl: timedelta | None = None) -> IssuedCertificate:
        """Sign a PEM CSR for `spiffe_id` (the verified caller) locally; same policy as meshca.ca.internal."""
        state = self._state
        check_identity(spiffe_id, state.settings.trust_domain)
        public_key = check_csr(csr_pem, spiffe_id)
        signer = state.signer
        not_before, not_after = leaf_validity(
            state.settings, as_utc(self._clock()), signer.record.not_before, signer.record.not_after, ttl
        )
        serial = new_serial()
        cert_pem = signer.issuer.sign_leaf(
            public_key, uri=spiffe_id.uri, not_before=not_before, not_after=not_after, serial_number=serial
        )
        return IssuedCertificate(spiffe_id, cert_pem, cert_pem + signer.chain_pem, None, serial, not_before, not_after)

    def issue_server_certificate(
        self, dns_names: Sequence[str], ip_addresses: Sequence[str], ttl: timedelta | None = None
    ) -> IssuedCertificate:
        """A key pair and a TLS server certificate for meshca's own endpoint, signed locally."""
        check_server_names(dns_names, ip_addresses)
        state = self._state
        signer = state.signer
        not_before, not_after = leaf_validity(
            state.settings, as_utc(self._clock()), signer.record.not_before, signer.record.not_after, ttl
        )
        serial = new_serial()
        cert_pem, key_pem = signer.issuer.issue_server_certificate(
            dns_names=dns_names, ip_addresses=ip_addresses, not_before=not_before, not_after=not_after,
            serial_number=serial, key_algorithm=state.settings.leaf_key_algorithm,
        )
        return IssuedCertificate(None, cert_pem, cert_pem + signer.chain_pem, key_pem, serial, not_before, not_after)


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

    data = _response_data(_vault_call(session, operation, path), path)
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
    """meshca.ca.internal's write path (commit_transition) to vault-ca.json: each new intermediate's key and chain, and
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


# --- vault-leaf -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VaultLeafOptions:
    """How vault-leaf talks to Vault: the PKI mount and role, the rate limit, retries and chain refresh."""

    mount: str = "pki"
    role: str = "meshca"
    max_rate: float = 50.0  # signing requests per second (token bucket)
    burst: int = 20
    max_wait: timedelta = timedelta(milliseconds=500)  # longest wait for a token before RateLimited
    retry_initial: timedelta = timedelta(milliseconds=100)
    retry_cap: timedelta = timedelta(seconds=1)
    retry_deadline: timedelta = timedelta(seconds=3)  # then VaultUnavailable: the rotation scheduler retries later
    chain_refresh: timedelta = timedelta(seconds=30)  # reload_if_changed reads Vault's CA chain at most this often

    def __post_init__(self) -> None:
        if not self.mount or not self.role or "/" in self.role:
            raise ValueError(f"mount and role must be non-empty (role without '/'), got {self.mount!r}, {self.role!r}")
        if not self.max_rate > 0 or self.burst < 1:
            raise ValueError(f"max_rate must be > 0 and burst >= 1, got {self.max_rate}, {self.burst}")
        for name in ("max_wait", "retry_initial", "retry_cap", "retry_deadline", "chain_refresh"):
            if getattr(self, name) < timedelta(0):
                raise ValueError(f"{name} must not be negative")
        if self.retry_initial > self.retry_cap:
            raise ValueError("retry_initial must not exceed retry_cap")


class TokenBucket:
    """`rate` tokens per second up to `burst`; `acquire` waits at most `max_wait` seconds, else RateLimited."""

    def __init__(self, rate: float, burst: int, max_wait: float, monotonic: Callable[[], float],
                 sleep: Callable[[float], None]) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_wait = max_wait
        self._monotonic = monotonic
        self._sleep = sleep
        self._tokens = float(burst)
        self._at = monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token (reserving a future one if none is left); returns the seconds waited."""
        with self._lock:
            now = self._monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            wait = max(0.0, (1.0 - self._tokens) / self._rate)
            if wait > self._max_wait:
                raise RateLimited(
                    f"more than {self._rate:g} Vault signing requests per second (burst {self._burst:g}); "
                    f"try again in {wait:.2f} s"
                )
            self._tokens -= 1.0
        if wait > 0:
            self._sleep(wait)
        return wait


@dataclass(frozen=True)
class _KnownRoot:
    pem: bytes
    info: CertificateInfo
    since: datetime
    retired_at: datetime | None = None


@dataclass(frozen=True)
class _LeafView:
    """What vault-leaf knows of Vault's CA, swapped as a whole."""

    chain: VaultChain
    since: datetime
    roots: tuple[_KnownRoot, ...]  # current first, then retired ones still trusted
    bundle_pem: bytes
    generation: int

    @property
    def issuing_id(self) -> str:
        return slot_id(self.chain.issuing.fingerprint_sha256)


@dataclass(frozen=True)
class VaultLeafStats:
    """Counters for metrics: leaves Vault signed, retried and failed calls, rate-limit refusals."""

    signed: int
    retries: int
    failures: int
    rate_limited: int


class VaultLeafCa:
    """`vault-leaf`: every leaf is signed by Vault's `<mount>/sign/<role>` (the role restricts URI SANs to
    the trust domain and sets no_store). Keys are generated here; only CSRs travel. Rate-limited, retried
    with capped backoff up to a short deadline; the trust bundle is Vault's root (cached, refreshed)."""

    mode: VaultMode = MODE_LEAF

    @property
    def signs_remotely(self) -> bool:
        """True: every leaf is a Vault call, which may wait seconds (callers keep it off the event loop)."""
        return True

    def __init__(self, settings: CaSettings, session: VaultCaller, clock: Clock, logger: logging.Logger,
                 options: VaultLeafOptions = VaultLeafOptions(), *, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """Reads Vault's CA chain (needs Vault: raises VaultError when it cannot)."""
        self._settings = settings
        self._session = session
        self._clock = clock
        self._log = logger
        self._options = options
        self._monotonic = monotonic
        self._sleep = sleep
        self._bucket = TokenBucket(options.max_rate, options.burst, options.max_wait.total_seconds(), monotonic, sleep)
        self._lock = threading.Lock()
        self._counts = {"signed": 0, "retries": 0, "failures": 0, "rate_limited": 0}
        self._sign_path = f"{options.mount}/sign/{options.role}"
        self._chain_path = f"{options.mount}/ca_chain"
        chain = self._parse_chain_text(self._with_retries(self._read_chain_operation, self._chain_path),
                                       self._chain_path)
        now = as_utc(clock())
        roots = tuple(_KnownRoot(p, i, now) for p, i in chain.roots)
        self._view = _LeafView(chain, now, roots, b"".join(r.pem for r in roots), 1)
        self._last_refresh = monotonic()

    def __repr__(self) -> str:
        return f"VaultLeafCa(trust_domain={self.trust_domain!r}, path={self._sign_path!r}, issuer={self._view.issuing_id})"

    # --- accessors ---------------------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self._settings.trust_domain

    @property
    def settings(self) -> CaSettings:
        return self._settings

    @property
    def options(self) -> VaultLeafOptions:
        return self._options

    @property
    def generation(self) -> int:
        """1 at start, +1 whenever Vault's issuing CA is seen to change."""
        return self._view.generation

    @property
    def active_intermediate_id(self) -> str:
        """Slot id (fingerprint prefix) of Vault's issuing CA."""
        return self._view.issuing_id

    @property
    def intermediate_certificate_pem(self) -> bytes:
        return self._view.chain.issuing_pem

    @property
    def intermediate_not_after(self) -> datetime:
        return self._view.chain.issuing.not_after

    def trust_bundle_pem(self) -> bytes:
        """Vault's current root, then roots it used before while leaves they signed may live."""
        return self._view.bundle_pem

    def stats(self) -> VaultLeafStats:
        with self._lock:
            return VaultLeafStats(**self._counts)

    def status(self) -> CaStatus:
        view = self._view
        chain = view.chain
        slots: list[SlotStatus] = []
        for known in view.roots:
            state: SlotState = "active" if known.retired_at is None else "old"
            retire = None if known.retired_at is None else self._root_retire_after(known)
            slots.append(SlotStatus("root", slot_id(known.info.fingerprint_sha256), state, known.info.subject, None,
                                    known.info.not_before, known.info.not_after, known.retired_at or known.since,
                                    retire, known.info.fingerprint_sha256))
        top = slot_id(chain.roots[0][1].fingerprint_sha256)
        for pem in crypto.split_pem_certificates(chain.carry_pem):
            info = crypto.parse_certificate_pem(pem)
            slots.append(SlotStatus("intermediate", slot_id(info.fingerprint_sha256), "active", info.subject, top,
                                    info.not_before, info.not_after, view.since, None, info.fingerprint_sha256))
        return CaStatus.from_slots(self.trust_domain, view.generation, view.issuing_id, slots)

    # --- Vault's chain -----------------------------------------------------------------------

    def _read_chain_operation(self, client: Any) -> Any:
        return client.secrets.pki.read_ca_certificate_chain(mount_point=self._options.mount)

    def reload_if_changed(self) -> bool:
        """Read Vault's CA chain (at most every `chain_refresh`); True when the issuing CA changed. When Vault
        is unreachable this raises VaultError (the caller logs and counts it) and keeps the cached chain."""
        now_m = self._monotonic()
        with self._lock:
            if now_m - self._last_refresh < self._options.chain_refresh.total_seconds():
                return False
            self._last_refresh = now_m
        return self.refresh()

    def refresh(self) -> bool:
        """Read Vault's CA chain now (one attempt); True when the issuing CA changed."""
        text = _vault_call(self._session, self._read_chain_operation, self._chain_path)
        return self._observe(self._parse_chain_text(text, self._chain_path), as_utc(self._clock()))

    def _parse_chain_text(self, text: Any, path: str) -> VaultChain:
        if not isinstance(text, str):
            text = getattr(text, "text", "")
        return parse_vault_chain([str(text).encode()], path)

    def _observe(self, chain: VaultChain, now: datetime) -> bool:
        """Adopt `chain`: a new issuing CA bumps the generation; roots Vault no longer uses stay in the bundle
        (old) until the leaves they may have signed expire. True when the issuing CA changed."""
        with self._lock:
            view = self._view
            changed = chain.issuing.fingerprint_sha256 != view.chain.issuing.fingerprint_sha256
            previous = {r.info.fingerprint_sha256: r for r in view.roots}
            current_fps = [i.fingerprint_sha256 for _, i in chain.roots]
            current = [
                replace(previous[i.fingerprint_sha256], retired_at=None) if i.fingerprint_sha256 in previous
                else _KnownRoot(p, i, now)
                for p, i in chain.roots
            ]
            retired = []
            for r in view.roots:
                if r.info.fingerprint_sha256 in current_fps:
                    continue
                r = r if r.retired_at is not None else replace(r, retired_at=now)
                if now < self._root_retire_after(r):
                    retired.append(r)
            roots = tuple(current + retired)
            if not changed and roots == view.roots:
                return False
            self._view = _LeafView(chain, now if changed else view.since, roots, b"".join(r.pem for r in roots),
                                   view.generation + 1)
        if changed:
            self._log.info("Vault's issuing CA changed: %s -> %s", slot_id(view.chain.issuing.fingerprint_sha256),
                           slot_id(chain.issuing.fingerprint_sha256))
        return changed

    def _root_retire_after(self, root: _KnownRoot) -> datetime:
        stopped = root.retired_at or root.info.not_after
        return min(stopped + self._settings.reload_grace + self._settings.leaf_ttl_max, root.info.not_after)

    # --- issuance ------------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _with_retries(self, operation: Callable[[Any], Any], path: str) -> Any:
        """session.call, retried on VaultUnavailable with capped exponential backoff until `retry_deadline`."""
        options = self._options
        start = self._monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return _vault_call(self._session, operation, path)
            except VaultUnavailable as error:
                elapsed = self._monotonic() - start
                delay = backoff_delay(attempt, options.retry_initial, options.retry_cap).total_seconds()
                if elapsed + delay > options.retry_deadline.total_seconds():
                    self._count("failures")
                    self._log.warning("%s: Vault unavailable, giving up after %d attempts in %.1f s: %s",
                                      path, attempt, elapsed, error)
                    raise
                self._count("retries")
                self._log.warning("%s: Vault unavailable (attempt %d), retrying in %.2f s: %s", path, attempt, delay, error)
                self._sleep(delay)
            except Exception:
                self._count("failures")
                raise

    def vault_sign(self, csr_pem: bytes, uri: str, ttl: timedelta) -> tuple[bytes, VaultChain]:
        """Low level, no local checks: POST `<mount>/sign/<role>` with the CSR, `uri_sans`=`uri` and `ttl`,
        rate-limited and retried. Returns (leaf PEM, the chain Vault signed it with). Vault's refusals
        (role's allowed_uri_sans, ...) raise VaultError with the path and Vault's reason."""
        self._bucket_acquire()
        csr = csr_pem.decode("ascii")
        seconds = max(1, int(ttl.total_seconds()))

        def operation(client: Any) -> Any:
            return client.secrets.pki.sign_certificate(
                name=self._options.role, csr=csr, common_name="",
                extra_params={"uri_sans": uri, "ttl": f"{seconds}s", "exclude_cn_from_sans": True, "format": "pem"},
                mount_point=self._options.mount,
            )

        data = _response_data(self._with_retries(operation, self._sign_path), self._sign_path)
        certificate = data.get("certificate")
        chain = data.get("ca_chain") or [data.get("issuing_ca") or ""]
        if not isinstance(certificate, str) or not isinstance(chain, list):
            raise VaultAnswerInvalid(self._sign_path, "the answer has no certificate / ca_chain")
        vault_chain = parse_vault_chain([str(c).encode() for c in chain], self._sign_path, issued_pem=certificate.encode())
        self._count("signed")
        self._observe(vault_chain, as_utc(self._clock()))
        return certificate.encode() + (b"" if certificate.endswith("\n") else b"\n"), vault_chain

    def _bucket_acquire(self) -> None:
        try:
            self._bucket.acquire()
        except RateLimited:
            self._count("rate_limited")
            raise

    def _not_after(self, now: datetime, ttl: timedelta | None) -> datetime:
        issuing = self._view.chain.issuing
        return leaf_validity(self._settings, now, issuing.not_before, issuing.not_after, ttl)[1]

    def _issue(self, spiffe_id: SpiffeId, csr_pem: bytes, spki_der: bytes, key_pem: bytes | None,
               ttl: timedelta | None) -> IssuedCertificate:
        now = as_utc(self._clock())
        try:
            not_after = self._not_after(now, ttl)
        except IssuerExpired:  # the cached issuing CA expired: Vault may have a new one
            self.refresh()
            not_after = self._not_after(now, ttl)
        try:
            cert_pem, chain = self.vault_sign(csr_pem, spiffe_id.uri, not_after - now)
        except CaVaultError as error:  # not VaultUnavailable (retryable) nor VaultDenied (token/policy)
            raise self._refused(error, spiffe_id) from None
        try:
            info = crypto.parse_certificate_pem(cert_pem)
        except CryptoError as e:
            raise VaultAnswerInvalid(self._sign_path, f"unparsable certificate: {e}") from None
        if info.uris != (spiffe_id.uri,) or info.dns_names or info.ip_addresses or info.is_ca:
            raise VaultAnswerInvalid(
                self._sign_path,
                f"the certificate names URIs {list(info.uris)}, DNS {list(info.dns_names)}, IPs {list(info.ip_addresses)} "
                f"(CA={info.is_ca}), expected only {spiffe_id.uri}: set use_csr_sans=false and "
                f"use_csr_common_name=false on role {self._options.role!r}",
            )
        if info.public_key.spki_der != spki_der:
            raise VaultAnswerInvalid(self._sign_path, "the certificate is not for the key in the CSR")
        if not crypto.certificate_issued_by(cert_pem, chain.issuing_pem):
            raise VaultAnswerInvalid(self._sign_path, "the certificate is not signed by the first CA of ca_chain")
        return IssuedCertificate(spiffe_id, cert_pem, cert_pem + chain.carry_pem, key_pem, info.serial_number,
                                 info.not_before, info.not_after)

    def _refused(self, error: CaVaultError, spiffe_id: SpiffeId) -> VaultRefused:
        """A refusal from Vault as meshca tells it to a caller; the log keeps Vault's path and status."""
        self._log.warning(
            "%s: Vault refused to sign for %s (HTTP %s): %s; meshca's own checks passed, so the Vault role "
            "and meshca's settings disagree (see docs/vault.md)", error.path, spiffe_id, error.status, error.reason,
        )
        if error.status is None:  # no answer from Vault: the request could not be made (the reason names the URL)
            cause = "the request to Vault could not be made"
        else:
            mount = re.escape(self._options.mount)
            cause = re.sub(rf"[\"']?\b{mount}/[^\s\"']*[\"']?", "its signing path", _URL.sub("Vault", error.reason))
        return VaultRefused(
            f"Vault refused to sign this certificate: {cause} (the CA's Vault role does not allow what meshca "
            f"allowed; retrying will not help)", error.path, error.status, error.reason,
        )

    def issue_workload(self, spiffe_id: SpiffeId, ttl: timedelta | None = None) -> IssuedCertificate:
        """A new local key (settings.leaf_key_algorithm, P-256 by default), a CSR with only the URI SAN, signed
        by Vault. Raises IdentityRejected, InvalidTtl, IssuerExpired, RateLimited, VaultRefused (Vault refused
        for good), VaultUnavailable (after `retry_deadline`), VaultDenied, VaultAnswerInvalid."""
        check_identity(spiffe_id, self._settings.trust_domain)
        key_pem = crypto.generate_private_key_pem(self._settings.leaf_key_algorithm)
        csr_pem = crypto.build_csr_pem(key_pem, uris=[spiffe_id.uri])
        return self._issue(spiffe_id, csr_pem, crypto.private_key_info(key_pem).spki_der, key_pem, ttl)

    def sign_csr(self, csr_pem: bytes, spiffe_id: SpiffeId, ttl: timedelta | None = None) -> IssuedCertificate:
        """The caller's CSR, checked with meshca.ca.internal's policy, sent to Vault with `uri_sans` = the caller's
        identity (the role must allow it and ignore the CSR's own SANs). Raises CsrRejected and as issue_workload."""
        check_identity(spiffe_id, self._settings.trust_domain)
        public_key = check_csr(csr_pem, spiffe_id)
        return self._issue(spiffe_id, csr_pem, public_key.spki_der, None, ttl)

    def issue_server_certificate(
        self, dns_names: Sequence[str], ip_addresses: Sequence[str], ttl: timedelta | None = None
    ) -> IssuedCertificate:
        """Not available in vault-leaf mode: the role only signs SPIFFE URIs."""
        raise ServerCertificateUnsupported(
            "vault-leaf mode does not issue meshca's own server certificate (the Vault role only allows SPIFFE "
            "URI SANs): set tls.certificate_chain and tls.private_key in the serve config"
        )

    def tick(self, now: datetime | None = None) -> list[CaEvent]:
        """Nothing to schedule: Vault rotates its own issuers (noticed by reload_if_changed)."""
        return []
