"""What the CAs kept in a state directory share: reloading, locked transitions, the journal, and local issuance."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from meshca.ca.api import CaEvent, CaSettings, IssuedCertificate, ScheduledStep
from meshca.ca.crypto import Issuer
from meshca.ca.policy import as_utc, check_csr, check_identity, check_server_names, leaf_validity, new_serial
from meshca.ca.state import JournalEntry, StateRecord, file_signature, read_journal, read_metadata, state_lock
from meshca.clock import Clock
from meshca.identity.spiffe import SpiffeId

_MAX_TICK_STEPS = 8


@dataclass(frozen=True)
class LocalSigner:
    """The active intermediate as local issuance needs it, read with a single attribute load on the hot path."""

    id: str
    issuer: Issuer
    certificate_pem: bytes  # the intermediate alone
    chain_pem: bytes  # what every leaf carries after itself: the intermediate and any non-root CA above it
    not_before: datetime
    not_after: datetime


class _CommittedState(Protocol):
    """What StateDirCa reads of a CA's in-memory state (a frozen dataclass, replaced as a whole)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def settings(self) -> CaSettings: ...

    @property
    def record(self) -> StateRecord: ...

    @property
    def raw(self) -> bytes: ...  # the commit file as read or written

    @property
    def signature(self) -> tuple[int, int, int]: ...

    @property
    def leaf_signer(self) -> LocalSigner: ...

    @property
    def bundle_pem(self) -> bytes: ...


StateT = TypeVar("StateT", bound=_CommittedState)
PlanT = TypeVar("PlanT")


class StateDirCa(Generic[StateT, PlanT]):
    """The base of the CAs kept in a state directory (meshca.ca.internal.CertificateAuthority,
    meshca.ca.vault.intermediate.VaultIntermediateCa): reloading the commit file, transitions under the
    exclusive lock, the journal, the accessors, and issuance, done here in memory by the active intermediate.
    A subclass names its `_metadata_file` and implements `_reread`, `_commit_plan` and the schedule
    (`_scheduled_step`, `_plan_scheduled`)."""

    _metadata_file: ClassVar[str]  # the commit file

    def __init__(self, state_dir: Path, clock: Clock, state: StateT) -> None:
        self._dir = state_dir
        self._clock = clock
        self._state = state
        self._mutex = threading.RLock()

    @property
    def signs_remotely(self) -> bool:
        """False: leaves are signed here, in memory (CPU only; no reason to leave the event loop)."""
        return False

    @property
    def can_rotate_intermediate(self) -> bool:
        return True

    def reload_if_changed(self) -> bool:
        """Re-read the commit file (ca.json) if another process committed a transition; True when the
        state changed.

        Cheap when nothing changed (one stat). On a damaged state it raises CaStateError and keeps
        the current in-memory state, so a running server goes on issuing.
        """
        if file_signature(self._dir / self._metadata_file) == self._state.signature:
            return False
        with self._mutex, state_lock(self._dir, exclusive=False):
            return self._refresh_locked()

    def _refresh_locked(self) -> bool:
        signature = file_signature(self._dir / self._metadata_file)
        raw, data = read_metadata(self._dir, self._metadata_file)
        current = self._state
        if raw == current.raw:
            if signature != current.signature:
                self._state = replace(current, signature=signature)
            return False
        self._state = self._reread(current, raw, data)
        return True

    def _reread(self, current: StateT, raw: bytes, data: dict[str, Any]) -> StateT:
        """The state another process committed (`raw`, parsed as `data`), checked against `current`."""
        raise NotImplementedError

    def _transitions(self, steps: Sequence[Callable[[StateT, datetime], PlanT | None]]) -> list[CaEvent]:
        with self._mutex, state_lock(self._dir, exclusive=True):
            self._refresh_locked()
            now = as_utc(self._clock())
            events: list[CaEvent] = []
            for step in steps:
                plan = step(self._state, now)
                if plan is not None:
                    events += self._apply_locked(plan, now)
            return events

    def tick(self, now: datetime | None = None) -> list[CaEvent]:
        """The schedule (see the subclass's `_scheduled_step`), every due step committed; call it periodically.

        When nothing is due (almost every call) it takes no lock and writes nothing."""
        self.reload_if_changed()
        if self._scheduled_step(self._state, as_utc(now if now is not None else self._clock())) is None:
            return []
        with self._mutex, state_lock(self._dir, exclusive=True):
            self._refresh_locked()
            at = as_utc(now if now is not None else self._clock())
            events: list[CaEvent] = []
            for _ in range(_MAX_TICK_STEPS):
                step = self._scheduled_step(self._state, at)
                if step is None:
                    break
                plan = self._plan_scheduled(step, self._state, at, bool(events))
                if plan is None:
                    break
                events += self._apply_locked(plan, at)
            return events

    def _scheduled_step(self, current: StateT, now: datetime) -> ScheduledStep | None:
        """What the schedule calls for next (pure)."""
        raise NotImplementedError

    def _plan_scheduled(self, step: ScheduledStep, current: StateT, now: datetime, after_events: bool) -> PlanT | None:
        """The plan of a due `step` (`after_events`: this tick already committed some); None ends the tick."""
        raise NotImplementedError

    def _apply_locked(self, plan: PlanT, now: datetime) -> list[CaEvent]:
        """Commit `plan` (the caller holds the exclusive lock) and adopt the new state."""
        self._state, events = self._commit_plan(plan, now)
        return events

    def _commit_plan(self, plan: PlanT, now: datetime) -> tuple[StateT, list[CaEvent]]:
        """Write `plan` to the state directory; the committed state and its events."""
        raise NotImplementedError

    # --- accessors ---------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self._dir

    @property
    def trust_domain(self) -> str:
        return self._state.settings.trust_domain

    @property
    def settings(self) -> CaSettings:
        return self._state.settings

    @property
    def generation(self) -> int:
        """Increases by one with every committed transition (init and migration commit generation 1)."""
        return self._state.record.generation

    @property
    def active_intermediate_id(self) -> str:
        """The slot id of the intermediate that signs; it changes on every intermediate or root activation."""
        return self._state.leaf_signer.id

    @property
    def intermediate_certificate_pem(self) -> bytes:
        """The active intermediate: the one that signs."""
        return self._state.leaf_signer.certificate_pem

    @property
    def intermediate_not_after(self) -> datetime:
        """Leaves are never valid past this instant."""
        return self._state.leaf_signer.not_after

    def trust_bundle_pem(self) -> bytes:
        """Every root in state prepared, active or old, active first: what peers validate against."""
        return self._state.bundle_pem

    def journal(self) -> list[JournalEntry]:
        """The committed journal entries (an uncommitted intent beyond the commit file's generation is left out)."""
        return read_journal(self._dir, self._state.record.generation)

    # --- issuance (in memory, no I/O) ------------------------------------------------------------

    def issue_workload(self, spiffe_id: SpiffeId, ttl: timedelta | None = None) -> IssuedCertificate:
        """A new key pair (settings.leaf_key_algorithm, P-256 by default) and an X.509-SVID for `spiffe_id`.

        `spiffe_id` must come from a verified identity. TTL policy: see CaSettings.
        Raises IdentityRejected, InvalidTtl, IssuerExpired.
        """
        state = self._state
        check_identity(spiffe_id, state.settings.trust_domain)
        signer = state.leaf_signer
        not_before, not_after = self._validity(state.settings, signer, ttl)
        serial = new_serial()
        cert_pem, key_pem = signer.issuer.issue_leaf(
            uri=spiffe_id.uri,
            not_before=not_before,
            not_after=not_after,
            serial_number=serial,
            key_algorithm=state.settings.leaf_key_algorithm,
        )
        return IssuedCertificate(spiffe_id, cert_pem, cert_pem + signer.chain_pem, key_pem, serial, not_before, not_after)

    def sign_csr(self, csr_pem: bytes, spiffe_id: SpiffeId, ttl: timedelta | None = None) -> IssuedCertificate:
        """Sign a PEM CSR for `spiffe_id` (the verified caller); the SAN comes from `spiffe_id` alone.

        The CSR contributes only its public key; its subject is ignored. Its SANs may be absent or
        exactly `spiffe_id`'s URI. Raises CsrRejected, IdentityRejected, InvalidTtl, IssuerExpired.
        """
        state = self._state
        check_identity(spiffe_id, state.settings.trust_domain)
        public_key = check_csr(csr_pem, spiffe_id)
        signer = state.leaf_signer
        not_before, not_after = self._validity(state.settings, signer, ttl)
        serial = new_serial()
        cert_pem = signer.issuer.sign_leaf(
            public_key, uri=spiffe_id.uri, not_before=not_before, not_after=not_after, serial_number=serial
        )
        return IssuedCertificate(spiffe_id, cert_pem, cert_pem + signer.chain_pem, None, serial, not_before, not_after)

    def issue_server_certificate(
        self, dns_names: Sequence[str], ip_addresses: Sequence[str], ttl: timedelta | None = None
    ) -> IssuedCertificate:
        """A key pair and a TLS server certificate (EKU serverAuth only) for meshca's own endpoint.

        Same TTL policy as leaves. Raises ValueError for an empty or malformed name list.
        """
        check_server_names(dns_names, ip_addresses)
        state = self._state
        signer = state.leaf_signer
        not_before, not_after = self._validity(state.settings, signer, ttl)
        serial = new_serial()
        cert_pem, key_pem = signer.issuer.issue_server_certificate(
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            not_before=not_before,
            not_after=not_after,
            serial_number=serial,
            key_algorithm=state.settings.leaf_key_algorithm,
        )
        return IssuedCertificate(None, cert_pem, cert_pem + signer.chain_pem, key_pem, serial, not_before, not_after)

    def _validity(self, settings: CaSettings, signer: LocalSigner, ttl: timedelta | None) -> tuple[datetime, datetime]:
        return leaf_validity(
            settings, as_utc(self._clock()), signer.not_before, signer.not_after, ttl, issuer="intermediate CA"
        )
