"""The CA's pure policy: the rotation schedule over committed slots, and the leaf rules (TTL, identity, CSR, names)."""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from meshca.ca import crypto
from meshca.ca.api import (
    CaSettings,
    CaStateError,
    CsrRejected,
    IdentityRejected,
    InvalidTtl,
    IssuerExpired,
    ScheduledStep,
    SlotKind,
    SlotState,
)
from meshca.ca.crypto import CryptoError
from meshca.ca.state import SlotRecord
from meshca.clock import format_duration
from meshca.identity.spiffe import SpiffeId

MAX_CSR_BYTES = 64 * 1024

_ALLOWED_CSR_CURVES = ("secp256r1", "secp384r1")
_RSA_MIN_BITS = 2048
_RSA_MAX_BITS = 8192
_DNS_NAME = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


# --- the schedule ---------------------------------------------------------------------------------


def lifetime_point(slot: SlotRecord, fraction: float) -> datetime:
    """The instant at `fraction` of a slot's certificate lifetime."""
    return slot.not_before + (slot.not_after - slot.not_before) * fraction


def retire_after(slot: SlotRecord, stopped_signing: datetime, settings: CaSettings) -> datetime:
    """The latest notAfter of any leaf `slot` may have signed: it stopped signing at `stopped_signing`
    (plus reload_grace for another process still using it), leaves live at most leaf_ttl_max, and
    no leaf outlives its issuer."""
    return min(stopped_signing + settings.reload_grace + settings.leaf_ttl_max, slot.not_after)


def due_prunes(slots: Sequence[SlotRecord], now: datetime) -> tuple[SlotRecord, ...]:
    """Old slots whose retire_after has come; a root only once none of its intermediates remains."""
    gone = {s.id for s in slots if s.state == "old" and s.kind == "intermediate" and now >= _req(s.retire_after)}
    still_issuing = {s.issuer_id for s in slots if s.kind == "intermediate" and s.id not in gone}
    gone |= {
        s.id
        for s in slots
        if s.state == "old" and s.kind == "root" and now >= _req(s.retire_after) and s.id not in still_issuing
    }
    return tuple(s for s in slots if s.id in gone)


def scheduled_step(slots: Sequence[SlotRecord], settings: CaSettings, now: datetime) -> ScheduledStep | None:
    """What `tick` does next, as a pure function of the committed slots, the settings and `now`.

    In order: prune old slots past retire_after; prepare a root at root_prepare_at of the active
    root's life; activate it at root_activate_at (never in the tick that prepared it, so the new
    root is published before it signs); prepare the next intermediate at intermediate_prepare_at
    of the active intermediate's life; activate it at intermediate_activate_at.
    """
    if due_prunes(slots, now):
        return ScheduledStep("prune", None)
    root = only_slot(slots, "root", "active")
    prepared_root = find_slot(slots, "root", "prepared")
    if prepared_root is None and now >= lifetime_point(root, settings.root_prepare_at):
        return ScheduledStep("prepare", "root")
    if (
        prepared_root is not None
        and now >= lifetime_point(root, settings.root_activate_at)
        and now > prepared_root.since
    ):
        return ScheduledStep("activate", "root")
    intermediate = only_slot(slots, "intermediate", "active")
    following = find_slot(slots, "intermediate", "prepared", root.id)
    if following is None and now >= lifetime_point(intermediate, settings.intermediate_prepare_at):
        return ScheduledStep("prepare", "intermediate")
    if following is not None and now >= lifetime_point(intermediate, settings.intermediate_activate_at):
        return ScheduledStep("activate", "intermediate")
    return None


def _req(value: datetime | None) -> datetime:
    if value is None:
        raise ValueError("an old slot without retire_after")
    return value


def find_slot(slots: Sequence[SlotRecord], kind: SlotKind, state: SlotState, issuer_id: str | None = None) -> SlotRecord | None:
    for s in slots:
        if s.kind == kind and s.state == state and (issuer_id is None or s.issuer_id == issuer_id):
            return s
    return None


def only_slot(slots: Sequence[SlotRecord], kind: SlotKind, state: SlotState) -> SlotRecord:
    found = find_slot(slots, kind, state)
    if found is None:
        raise CaStateError(f"no {state} {kind} in the CA state")
    return found


# --- leaf policy (every mode applies it) -------------------------------------------------------


def new_serial() -> int:
    # 126 random bits with the top bit set: positive, non-zero, always 16 DER content bytes.
    return secrets.randbits(127) | (1 << 126)


def as_utc(now: datetime) -> datetime:
    """A clock reading as aware UTC in whole seconds; ValueError for a naive one."""
    if now.tzinfo is None:
        raise ValueError("the clock must return timezone-aware datetimes")
    return now.astimezone(timezone.utc).replace(microsecond=0)


def leaf_validity(
    settings: CaSettings, now: datetime, issuer_not_before: datetime, issuer_not_after: datetime, ttl: timedelta | None,
    *, issuer: str = "issuing CA",
) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) of a leaf, with the TTL policy (see CaSettings): too short → InvalidTtl, too long →
    clamped, capped at the issuer's notAfter; IssuerExpired (naming `issuer`) outside the issuer's validity."""
    if ttl is None:
        ttl = settings.leaf_ttl_default
    elif ttl < settings.leaf_ttl_min:
        raise InvalidTtl(
            f"TTL {format_duration(ttl)} is below the minimum {format_duration(settings.leaf_ttl_min)} "
            f"(allowed {format_duration(settings.leaf_ttl_min)} to {format_duration(settings.leaf_ttl_max)}; "
            "longer TTLs are capped)"
        )
    elif ttl > settings.leaf_ttl_max:
        ttl = settings.leaf_ttl_max
    not_after = min(now + ttl, issuer_not_after)
    if not_after <= now or now < issuer_not_before:
        raise IssuerExpired(
            f"the {issuer} is valid from {issuer_not_before.isoformat()} "
            f"to {issuer_not_after.isoformat()}, not at {now.isoformat()}; rotate it"
        )
    backdate = settings.backdate
    lifetime = not_after - now
    if lifetime < backdate * 4:  # a leaf must not be "due for renewal" at birth
        backdate = timedelta(seconds=int(lifetime.total_seconds()) // 4)
    return max(now - backdate, issuer_not_before), not_after


def check_identity(spiffe_id: SpiffeId, trust_domain: str) -> None:
    """IdentityRejected for an identity outside `trust_domain` or naming the trust domain itself."""
    if spiffe_id.trust_domain != trust_domain:
        raise IdentityRejected(f"SPIFFE ID {spiffe_id} is not in trust domain {trust_domain!r} served by this CA")
    if not spiffe_id.path:
        raise IdentityRejected(f"SPIFFE ID {spiffe_id} names the trust domain itself, not a workload")


def check_csr(csr_pem: bytes, spiffe_id: SpiffeId) -> crypto.PublicKeyInfo:
    """The CSR policy (size, parse, signature, key type, CA:true, other identity, extra SANs): raises
    CsrRejected; returns the CSR's public key."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CsrRejected(f"CSR is larger than {MAX_CSR_BYTES} bytes", "invalid_argument")
    try:
        request = crypto.parse_csr_pem(csr_pem)
    except CryptoError as e:
        raise CsrRejected(f"CSR cannot be parsed: {e}", "invalid_argument") from None
    if not request.signature_valid:
        raise CsrRejected("CSR signature does not verify with its own public key", "invalid_argument")
    key = request.public_key
    if key.kind == "ec":
        if key.curve not in _ALLOWED_CSR_CURVES:
            raise CsrRejected(
                f"CSR key curve {key.curve} is not supported (use P-256 or P-384)", "invalid_argument"
            )
    elif key.kind == "rsa":
        if not _RSA_MIN_BITS <= key.bits <= _RSA_MAX_BITS:
            raise CsrRejected(
                f"CSR RSA key of {key.bits} bits is not allowed ({_RSA_MIN_BITS} to {_RSA_MAX_BITS})",
                "invalid_argument",
            )
    else:
        raise CsrRejected(f"CSR key type {key.kind} is not supported (use EC P-256/P-384 or RSA)", "invalid_argument")
    if request.requests_ca:
        raise CsrRejected(
            "CSR requests basicConstraints CA:true; CA certificates cannot be requested", "invalid_argument"
        )
    others = [uri for uri in request.uris if uri != spiffe_id.uri]
    if others:
        raise CsrRejected(
            f"CSR requests identity {', '.join(others)} but the caller is {spiffe_id}", "permission_denied"
        )
    extra = [*request.dns_names, *request.ip_addresses, *request.emails, *request.other_names]
    if extra:
        raise CsrRejected(
            f"CSR carries DNS/IP/email/other SANs ({', '.join(extra)}); only the caller's SPIFFE ID URI is allowed",
            "invalid_argument",
        )
    return key


def check_server_names(dns_names: Sequence[str], ip_addresses: Sequence[str]) -> None:
    """ValueError for an empty or malformed name list of a server certificate."""
    for name in dns_names:
        if not isinstance(name, str) or len(name) > 253 or not _DNS_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid DNS name")
    for address in ip_addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"{address!r} is not a valid IP address") from None
    if not dns_names and not ip_addresses:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
