"""Tainting an intermediate: a new one signs at once; the tainted one is revoked once its leaves were re-issued."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from meshca.ca.api import CaError, CaEvent, CaStatus
from meshca.ca.revocation import Revocation, RevocationList, check_reason, intermediate_revocation
from meshca.clock import Clock

# After the herd window: the CA check (1 s), the last renewal's push, a slow replica.
REVOKE_MARGIN = timedelta(seconds=30)

Change = Callable[[RevocationList], RevocationList]


class TaintRefused(CaError):
    """A taint meshca will not do (unknown or prepared intermediate, negative delay, ...)."""


class TaintableCa(Protocol):
    """The internal CA, in a state dir (CertificateAuthority) or in etcd (ReplicatedCa)."""

    @property
    def active_intermediate_id(self) -> str: ...

    def status(self) -> CaStatus: ...

    def rotate_intermediate(self, now: bool = False) -> list[CaEvent]: ...

    def crl_signers(self) -> Sequence[tuple[Any, Any]]: ...


@dataclass(frozen=True)
class TaintOutcome:
    """What `taint_intermediate` did: the audit record of a taint (see meshca.cli.taint.record_taint)."""

    slot: str
    entry: Revocation  # the tainted intermediate's revocation as recorded (the earlier one when `already`)
    events: tuple[CaEvent, ...]  # the rotation that replaced it (none when it was not the active one)
    active_intermediate_id: str
    list_version: int
    already: bool  # tainted (or revoked) before: nothing new was recorded

    @property
    def effective_at(self) -> datetime:
        return self.entry.effective_at or self.entry.revoked_at


def default_revoke_after(reissue_window: timedelta, margin: timedelta = REVOKE_MARGIN) -> timedelta:
    """How long after the taint its revocation takes effect: the serve config's herd window plus a margin."""
    return reissue_window + margin


def taint_intermediate(
    ca: TaintableCa,
    update: Callable[[Change], RevocationList],
    slot: str,
    reason: str,
    revoke_after: timedelta,
    clock: Clock,
) -> TaintOutcome:
    """Taint intermediate `slot` of `ca`, whose revocation list `update` changes (StateDirRevocations.update,
    EtcdRevocations.update).

    The active intermediate is replaced first (prepared → active, or a fresh one): every running server then
    re-issues its leaves. Then the revocation of `slot` is recorded with `effective_at` = now + `revoke_after`:
    the CRLs of every replica list it from then on, and until then each server re-issues the leaves `slot`
    signed (meshca.sds.taint). An old intermediate is only revoked so. Run again after an interruption, it
    records what is missing; tainted before, it changes nothing (`already`)."""
    check_reason(reason)
    if revoke_after < timedelta(0):
        raise TaintRefused(f"--revoke-after {revoke_after}: must not be negative")
    status = ca.status()
    found = next((s for s in status.slots if s.id == slot), None)
    if found is None:
        known = ", ".join(f"{s.id} ({s.state})" for s in status.slots if s.kind == "intermediate")
        raise TaintRefused(f"--intermediate {slot}: no such intermediate in the CA state (there are: {known})")
    if found.kind != "intermediate":
        raise TaintRefused(
            f"--intermediate {slot}: that is a root; rotate it instead (`meshca ca rotate --root --now`)"
        )
    if found.state == "prepared":
        raise TaintRefused(
            f"--intermediate {slot}: it is prepared and has signed nothing yet; taint the active or an old "
            "intermediate (a prepared one becomes active at the next rotation)"
        )
    events: tuple[CaEvent, ...] = ()
    if found.state == "active":
        events = tuple(ca.rotate_intermediate(now=True))
        if ca.active_intermediate_id == slot:
            raise CaError(f"--intermediate {slot}: still the active intermediate after the rotation")
    now = clock()
    recorded: list[tuple[Revocation, bool]] = []

    def add(current: RevocationList) -> RevocationList:
        earlier = current.find("intermediate", slot)
        if earlier is not None:
            recorded.append((earlier, True))
            return current
        entry = intermediate_revocation(ca.crl_signers(), slot, reason, now)
        entry = replace(entry, effective_at=now + revoke_after)
        recorded.append((entry, False))
        return current.with_entries([entry])

    after = update(add)
    entry, already = recorded[-1]
    return TaintOutcome(slot, entry, events, ca.active_intermediate_id, after.version, already)
