"""Revocations reaching the proxies: CRLs in every bundle secret, re-signed before expiry; revoked identities denied."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from meshca.audit import AuditSink, NoAudit, revocation_event
from meshca.ca.api import CaError
from meshca.ca.revocation import CrlSettings, Revocation, RevocationList, build_crls
from meshca.ca.signed import SignedLeaves
from meshca.clock import Clock
from meshca.identity.spiffe import SpiffeId
from meshca.sds.workloads import WorkloadSecrets

# How soon a failed write of a revoked identity's serials is tried again (sooner when the list changes meanwhile:
# the store answered). Each try may wait for the store's call timeout on the CA-check job.
UNWRITTEN_RETRY = timedelta(seconds=30)


class RevocationSource(Protocol):
    """Where the revocation list lives (meshca.ca.revocation.StateDirRevocations, meshca.store.revocation)."""

    def read(self) -> RevocationList: ...

    def changed(self) -> RevocationList | None: ...

    def update(self, change: Callable[[RevocationList], RevocationList]) -> RevocationList: ...


class CrlAuthority(Protocol):
    """The internal CA (CertificateAuthority, ReplicatedCa): every CA certificate with its key."""

    @property
    def generation(self) -> int: ...

    def crl_signers(self) -> Sequence[tuple[Any, Any]]: ...


class ExternalCrls(Protocol):
    """CRLs signed elsewhere (Vault's, meshca.ca.vault.crl.VaultCrls) for the CAs whose keys meshca does not hold."""

    def refresh(self) -> bool: ...

    def due(self, now: datetime) -> bool: ...

    def crls(self, now: datetime) -> bytes | None: ...


class BundleRepublisher(Protocol):
    def refresh_all(self) -> None: ...


class RevocationPublisher:
    """Keeps every bundle secret's CRLs current: after a revocation (another process's write, seen by `check`),
    after a CA change (every CA certificate needs a CRL), and when the CRLs reach `settings.refresh` of their
    validity. A newly revoked identity is denied issuance, the serials this replica issued for it are added to
    the list, and `on_denied` hears the new set (the composition root forgets its leaves and rebuilds the mesh).

    `check` runs on the CA-check job, right after the CA's own check: a renewal under a new intermediate never
    runs before that intermediate's CRL is published (the scheduler runs one job at a time).
    """

    def __init__(
        self,
        ca: CrlAuthority,
        source: RevocationSource,
        secrets: WorkloadSecrets,
        publisher: BundleRepublisher,
        clock: Clock,
        logger: logging.Logger,
        settings: CrlSettings = CrlSettings(),
        on_denied: Callable[[frozenset[SpiffeId], frozenset[SpiffeId]], None] | None = None,
        on_leaves_revoked: Callable[[frozenset[SpiffeId]], None] | None = None,
        audit: AuditSink | None = None,
        external: ExternalCrls | None = None,
        signed: SignedLeaves | None = None,
    ) -> None:
        """`signed`: the leaves this replica's CSR service signed (node agents'): a newly revoked identity's are
        listed with those it holds itself.
        `on_denied(denied, newly_denied)`: called with every revoked identity after a change.
        `external`: the CRLs of the CAs whose keys are elsewhere (the Vault modes: Vault's roots and intermediates),
        read again when due and after every change of the list; while it has no complete set, NO CRL is sent (Envoy
        would refuse every chain with a CA that has none).
        `on_leaves_revoked(identities)`: identities (not revoked themselves) whose certificate held here now has a
        revoked serial: the composition root renews them at once, so their sidecars stop presenting it."""
        self._ca = ca
        self._source = source
        self._secrets = secrets
        self._publisher = publisher
        self._clock = clock
        self._log = logger
        self._settings = settings
        self._on_denied = on_denied
        self._on_leaves_revoked = on_leaves_revoked
        self._audit: AuditSink = audit if audit is not None else NoAudit()
        self._lock = threading.Lock()
        self._list = RevocationList()
        self._denied: frozenset[SpiffeId] = frozenset()
        self._generation: int | None = None
        self._refresh_at: datetime | None = None
        self._signed_at: datetime | None = None
        self._crls = b""
        self._updates = 0
        self._failing = False
        self._external = external
        self._signed = signed
        self._external_crls: bytes | None = None
        self._unwritten: tuple[Revocation, ...] = ()  # serials of revoked identities not yet in the source
        self._retry_at: datetime | None = None

    def start(self) -> None:
        """Read the list and sign the first CRLs (before any proxy connects); CaError when unreadable."""
        with self._lock:
            self._adopt(self._source.read(), quiet=True)
            if self._external is not None:
                self._external.refresh()
            self._sign(self._clock(), quiet=True)

    def check(self) -> bool:
        """Adopt a changed list and re-sign when due; True when the bundle secrets were republished."""
        with self._lock:
            try:
                changed = self._source.changed()
                if self._failing:
                    self._log.info("revocation list readable again")
                self._failing = False
            except (CaError, OSError) as error:  # keep the list in force; the CRLs are still re-signed when due
                if not self._failing:
                    self._log.error("cannot read the revocation list; the current one stays in force: %s", error)
                self._failing = True
                changed = None
            now = self._clock()
            if self._unwritten and (changed is not None or self._retry_at is None or now >= self._retry_at):
                changed = self._write_unwritten(now) or changed
            if changed is not None:
                self._adopt(changed)
            external_changed = False
            if self._external is not None and (
                changed is not None or self._ca.generation != self._generation or self._external.due(now)
            ):  # a revocation recorded in Vault by `meshca revoke` is on Vault's CRLs before the list changes
                external_changed = self._external.refresh()
            due = (
                changed is not None
                or external_changed
                or self._ca.generation != self._generation
                or (self._refresh_at is not None and now >= self._refresh_at)
                or (self._external is not None and self._external.crls(now) != self._external_crls)
            )
            if not due:
                return False
            self._sign(now)
        self._publisher.refresh_all()
        return True

    @property
    def revocations(self) -> RevocationList:
        with self._lock:
            return self._list

    @property
    def denied(self) -> frozenset[SpiffeId]:
        with self._lock:
            return self._denied

    @property
    def crls_pem(self) -> bytes:
        with self._lock:
            return self._crls

    @property
    def signed_at(self) -> datetime | None:
        with self._lock:
            return self._signed_at

    def updates(self) -> int:
        with self._lock:
            return self._updates

    def _adopt(self, revocations: RevocationList, quiet: bool = False) -> None:
        denied = frozenset(SpiffeId.parse(uri) for uri in revocations.denied_spiffe_ids)
        previous = self._denied
        newly = denied - previous
        self._secrets.set_denied(denied)
        if newly:
            revocations = self._list_serials_of(revocations, newly)
        revocations = revocations.with_entries(self._unwritten)  # listed here until written
        if not quiet:
            self._record_changes(self._list, revocations)
        self._list, self._denied = revocations, denied
        (self._log.debug if quiet else self._log.info)(
            "revocation list version %d: %d entries, %d revoked identities",
            revocations.version, len(revocations.entries), len(denied),
        )
        if self._on_denied is not None and denied != previous:
            self._on_denied(denied, newly)
        revoked_serials = {e.serial for e in revocations.entries if e.kind != "spiffe_id" and e.serial is not None}
        in_use = frozenset(
            leaf.spiffe_id
            for leaf in self._secrets.certificates()
            if leaf.serial_number in revoked_serials and leaf.spiffe_id not in denied
        )
        if in_use and self._on_leaves_revoked is not None:
            self._on_leaves_revoked(in_use)

    def _record_changes(self, before: RevocationList, after: RevocationList) -> None:
        """Audit every change since the version adopted before (from the list's own history: versions adopted in
        one step are each recorded; `meshca ca taint`'s delayed revocation of an intermediate is a `taint`). A list
        read at start is not: its changes were recorded when they were made."""
        for change in after.changes_since(before.version):
            entry = change.entry
            tainted = change.op == "revoke" and entry.kind == "intermediate" and entry.effective_at is not None
            self._audit.record(revocation_event(
                "taint" if tainted else change.op, spiffe_id=entry.value if entry.kind == "spiffe_id" else None, serial=entry.serial,
                issuer=entry.value if entry.kind == "intermediate" else entry.issuer_id,
                not_after=entry.not_after, reason=entry.reason if change.op == "revoke" else None,
            ))

    def _list_serials_of(self, revocations: RevocationList, identities: frozenset[SpiffeId]) -> RevocationList:
        """The list plus the serials of the certificates this replica holds or signed (CSRs) for newly revoked
        identities, written back so that every replica's CRLs list them (kept here alone if the write fails)."""
        by_uri = {e.value: e for e in revocations.entries if e.kind == "spiffe_id"}
        extra = []
        for leaf in self._secrets.certificates():
            if leaf.spiffe_id in identities:
                cause = by_uri[leaf.spiffe_id.uri]
                extra.append(Revocation("serial", f"{leaf.serial_number:x}", cause.reason, cause.revoked_at,
                                        leaf.not_after, None, leaf.serial_number))
        if self._signed is not None:
            for signed in self._signed.serials_of(identities):
                cause = by_uri[signed.spiffe_id.uri]
                extra.append(Revocation("serial", f"{signed.serial:x}", cause.reason, cause.revoked_at,
                                        signed.not_after, signed.issuer_id, signed.serial))
            for spiffe_id in identities:
                untracked = self._signed.untracked(spiffe_id)
                if untracked is not None:
                    self._log.warning(
                        "%d certificates of revoked %s signed here were not tracked (bound) and are on no CRL; they "
                        "expire by %s (its requests are refused per route meanwhile)",
                        untracked.count, spiffe_id, untracked.until.isoformat())
            if extra:
                self._log.info("listing %d serial(s) of revoked identities on the CRLs", len(extra))
        if not extra:
            return revocations
        try:
            return self._source.update(lambda current: current.with_entries(extra))
        except (CaError, OSError) as error:
            self._log.error("cannot record the serials of revoked identities (this replica's CRLs list them; "
                            "tried again later): %s", error)
            self._unwritten += tuple(extra)
            self._retry_at = self._clock() + UNWRITTEN_RETRY
            return revocations.with_entries(extra)

    def _write_unwritten(self, now: datetime) -> RevocationList | None:
        """Try again to add the serials an earlier write failed to add: the list written, or None (still failing)."""
        pending = self._unwritten
        try:
            written = self._source.update(lambda current: current.with_entries(pending))
        except (CaError, OSError):
            self._retry_at = now + UNWRITTEN_RETRY
            return None
        self._unwritten = ()
        self._log.info("recorded the serials of revoked identities in the revocation list (%d)", len(pending))
        return written

    def _sign(self, now: datetime, quiet: bool = False) -> None:
        generation = self._ca.generation
        signers = self._ca.crl_signers()
        self._crls = build_crls(signers, self._list, now, self._settings)
        if self._external is not None:
            self._external_crls = self._external.crls(now)
            self._crls = b"" if self._external_crls is None else self._crls + self._external_crls
        self._secrets.set_crls(self._crls)
        self._generation = generation
        self._signed_at = now
        self._refresh_at = now + self._settings.validity * self._settings.refresh
        pending = self._list.next_effective(now)
        if pending is not None and pending < self._refresh_at:  # a taint's revocation takes effect then
            self._refresh_at = pending
        self._updates += 1
        (self._log.debug if quiet else self._log.info)(
            "CRLs signed for %d CA certificates (%d revocations in force), next re-sign at %s",
            len(signers), len(self._list.in_force(now)), self._refresh_at.isoformat(),
        )
