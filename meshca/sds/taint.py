"""Tainted intermediates in a running server: the leaves they signed are re-issued before their revocation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

from meshca.ca.revocation import RevocationList
from meshca.clock import Clock, format_duration
from meshca.identity.spiffe import SpiffeId
from meshca.sds.crl import CrlAuthority
from meshca.sds.rotation import RotationSettings
from meshca.sds.workloads import WorkloadCertificate


class HeldCertificates(Protocol):
    """meshca.sds.workloads.WorkloadSecrets."""

    def certificates(self) -> list[WorkloadCertificate]: ...


class Reissuer(Protocol):
    """meshca.sds.rotation.LeafRotator."""

    def reissue(
        self, identities: Sequence[SpiffeId], window: timedelta, max_rate: float, deadline: datetime
    ) -> list[datetime]: ...


class TaintedLeaves:
    """Re-issues each leaf this replica serves that a revoked intermediate signed (`meshca ca taint`, or `meshca
    revoke --intermediate` of an old one), spread over the herd window but all before the revocation takes
    effect (its `effective_at`); one already in force: at once, at the rotation's rate.

    `check` runs on the CA-check job after the CRLs' (one worker: never during a renewal). A held certificate is
    looked at once per version of the list, by a byte comparison of its chain with the intermediate (no crypto)."""

    def __init__(
        self,
        ca: CrlAuthority,
        secrets: HeldCertificates,
        rotator: Reissuer,
        settings: RotationSettings,
        clock: Clock,
        logger: logging.Logger,
    ) -> None:
        self._ca = ca
        self._secrets = secrets
        self._rotator = rotator
        self._settings = settings
        self._clock = clock
        self._log = logger
        self._seen: tuple[int, int] | None = None  # (list version, CA generation) the examined set is for
        self._examined: set[int] = set()  # serials looked at under this list version
        self._reissued = 0

    def check(self, revocations: RevocationList) -> int:
        """Schedule the re-issue of every newly found leaf of a revoked intermediate; how many were scheduled."""
        now = self._clock()
        # A CA change re-issues every leaf over the whole herd window (CaWatcher): look again, so that the
        # leaves of a tainted intermediate are brought back before its revocation.
        seen = (revocations.version, self._ca.generation)
        if seen != self._seen:
            self._seen = seen
            self._examined.clear()
        revoked = {e.value: e for e in revocations.entries
                   if e.kind == "intermediate" and (e.not_after is None or e.not_after > now)}
        if not revoked:
            return 0
        # Not while it still signs here (this replica has not seen the rotation yet: a renewal would get it again).
        pems = {record.id: issuer.certificate_pem for record, issuer in self._ca.crl_signers()
                if record.id in revoked and record.state != "active"}
        if not pems:  # pruned from the CA state (every leaf it signed has expired), or not yet replaced
            return 0
        held = self._secrets.certificates()
        self._examined &= {leaf.serial_number for leaf in held}
        found: dict[str, list[SpiffeId]] = {}
        for leaf in held:
            if leaf.serial_number in self._examined:
                continue
            self._examined.add(leaf.serial_number)
            slot = next((slot for slot, pem in pems.items() if pem in leaf.chain_pem), None)
            if slot is not None:
                found.setdefault(slot, []).append(leaf.spiffe_id)
        scheduled = 0
        rate = self._settings.reissue_rate
        for slot, identities in found.items():
            entry = revoked[slot]
            room = (entry.effective_at or entry.revoked_at) - now
            window = min(self._settings.reissue_window, room) if room > timedelta(0) else timedelta(
                seconds=len(identities) / rate)
            times = self._rotator.reissue(identities, window, rate, now + window)
            scheduled += len(times)
            self._log.info(
                "intermediate %s is tainted (revoked from %s): re-issuing the %d certificates it signed over %s",
                slot, (entry.effective_at or entry.revoked_at).isoformat(timespec="seconds"), len(times),
                format_duration(times[-1] - now if times else timedelta(0)),
            )
        self._reissued += scheduled
        return scheduled

    def reissued(self) -> int:
        return self._reissued
