"""Revocations of the internal CA (serials, SPIFFE IDs, intermediates): the list, its file next to the CA state."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, get_args

from meshca.ca import crypto
from meshca.ca.api import CaError, CaStateError
from meshca.ca.crypto import CRL_REASONS, Issuer, RevokedSerial
from meshca.ca.state import SlotRecord, file_signature, parse_time, read_state_file, state_lock
from meshca.files import fsync_directory, write_atomic

RevocationKind = Literal["serial", "spiffe_id", "intermediate"]
REVOCATION_KINDS: tuple[RevocationKind, ...] = get_args(RevocationKind)
REVOCATIONS_FILE = "revocations.json"
_FORMAT = 1


class RevocationRefused(CaError):
    """A revocation meshca will not record (unknown serial or intermediate, the signing intermediate, ...)."""


def check_reason(reason: str) -> str:
    if reason not in CRL_REASONS:
        raise RevocationRefused(f"reason {reason!r} is not an RFC 5280 reason: use one of {', '.join(CRL_REASONS)}")
    return reason


@dataclass(frozen=True)
class Revocation:
    """One revocation. `value`: the serial in lowercase hex, the SPIFFE ID URI, or the intermediate's slot id.

    `serial`: the certificate serial a CRL lists (serial and intermediate entries; None for an identity).
    `issuer_id`: the slot whose CRL lists it (the intermediate that signed a leaf, the root that signed an
    intermediate); None for a leaf of unknown issuer: every intermediate's CRL lists it.
    `not_after`: the revoked certificate's own expiry; the entry leaves the CRLs after it (None: an identity,
    revoked until `meshca unrevoke`).
    `effective_at`: the CRLs list it from then on (`meshca ca taint`: after the herd window); None: at once.
    """

    kind: RevocationKind
    value: str
    reason: str
    revoked_at: datetime
    not_after: datetime | None = None
    issuer_id: str | None = None
    serial: int | None = None
    effective_at: datetime | None = None

    def in_force(self, now: datetime) -> bool:
        """Listed on the CRLs at `now`: effective and its certificate not yet expired."""
        return (self.effective_at is None or self.effective_at <= now) and (
            self.not_after is None or self.not_after > now
        )

    def to_json(self) -> dict[str, Any]:
        data = {
            "kind": self.kind,
            "value": self.value,
            "reason": self.reason,
            "revoked_at": self.revoked_at.isoformat(),
            "not_after": self.not_after.isoformat() if self.not_after else None,
            "issuer": self.issuer_id,
            "serial": f"{self.serial:x}" if self.serial is not None else None,
        }
        if self.effective_at is not None:
            data["effective_at"] = self.effective_at.isoformat()
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> Revocation:
        if not isinstance(data, dict):
            raise TypeError(f"{where} must be an object")
        kind, value, reason = data["kind"], data["value"], data["reason"]
        if kind not in REVOCATION_KINDS:
            raise ValueError(f"{where}.kind {kind!r} is not one of {', '.join(REVOCATION_KINDS)}")
        if not isinstance(value, str) or reason not in CRL_REASONS:
            raise ValueError(f"{where}: value must be a string and reason an RFC 5280 reason")
        serial = data.get("serial")
        not_after = data.get("not_after")
        issuer = data.get("issuer")
        effective_at = data.get("effective_at")
        return cls(
            kind,
            value,
            reason,
            parse_time(data["revoked_at"], f"{where}.revoked_at"),
            parse_time(not_after, f"{where}.not_after") if not_after is not None else None,
            issuer if isinstance(issuer, str) else None,
            int(serial, 16) if isinstance(serial, str) else None,
            parse_time(effective_at, f"{where}.effective_at") if effective_at is not None else None,
        )


HISTORY_KEPT = 256


@dataclass(frozen=True)
class RevocationChange:
    """One operator-visible change of the list: `revoke` (an entry added) or `unrevoke` (an identity lifted), at
    list `version`. Kept in the list itself, so a replica that adopts several versions at once still audits each."""

    version: int
    op: Literal["revoke", "unrevoke"]
    entry: Revocation

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "op": self.op, "entry": self.entry.to_json()}

    @classmethod
    def from_json(cls, data: Any, where: str) -> RevocationChange:
        if not isinstance(data, dict) or data.get("op") not in ("revoke", "unrevoke") or type(data.get("version")) is not int:
            raise ValueError(f"{where} must be an object with an integer version and op revoke or unrevoke")
        return cls(data["version"], data["op"], Revocation.from_json(data["entry"], f"{where}.entry"))


@dataclass(frozen=True)
class RevocationList:
    """Every revocation in force; `version` grows with every write (the CRL number follows it). `history`: the
    last HISTORY_KEPT changes (entries leaving because their certificate expired are not changes)."""

    entries: tuple[Revocation, ...] = ()
    version: int = 0
    raw: bytes = field(default=b"", compare=False, repr=False)
    history: tuple[RevocationChange, ...] = ()

    def recorded_after(self, current: RevocationList) -> RevocationList:
        """This list as the next version after `current`, its changes added to the history."""
        version = current.version + 1
        before = {(e.kind, e.value) for e in current.entries}
        after = {(e.kind, e.value) for e in self.entries}
        changes = [RevocationChange(version, "revoke", e) for e in self.entries if (e.kind, e.value) not in before]
        changes += [RevocationChange(version, "unrevoke", e) for e in current.entries
                    if e.kind == "spiffe_id" and (e.kind, e.value) not in after]
        history = (current.history + tuple(changes))[-HISTORY_KEPT:]
        return replace(self, version=version, history=history)

    def changes_since(self, version: int) -> list[RevocationChange]:
        return [change for change in self.history if change.version > version]

    @property
    def denied_spiffe_ids(self) -> frozenset[str]:
        """The revoked identities' URIs: no new certificate, refused per request on every sidecar."""
        return frozenset(e.value for e in self.entries if e.kind == "spiffe_id")

    def find(self, kind: RevocationKind, value: str) -> Revocation | None:
        return next((e for e in self.entries if e.kind == kind and e.value == value), None)

    def with_entries(self, entries: Iterable[Revocation]) -> RevocationList:
        """This list plus `entries` (an entry already there, same kind and value, is kept as first recorded)."""
        added = [e for e in entries if self.find(e.kind, e.value) is None]
        return replace(self, entries=self.entries + tuple(added)) if added else self

    def without(self, kind: RevocationKind, value: str) -> RevocationList:
        kept = tuple(e for e in self.entries if not (e.kind == kind and e.value == value))
        return replace(self, entries=kept) if len(kept) != len(self.entries) else self

    def pruned(self, now: datetime) -> RevocationList:
        """Without the entries whose certificate has expired anyway (a CRL need not list them any more)."""
        kept = tuple(e for e in self.entries if e.not_after is None or e.not_after > now)
        return replace(self, entries=kept) if len(kept) != len(self.entries) else self

    def in_force(self, now: datetime) -> tuple[Revocation, ...]:
        """The entries the CRLs list at `now` (not yet expired, already effective)."""
        return tuple(e for e in self.entries if e.in_force(now))

    def next_effective(self, now: datetime) -> datetime | None:
        """When the next entry recorded with a later `effective_at` takes effect (None: no such entry)."""
        return min((e.effective_at for e in self.entries if e.effective_at is not None and e.effective_at > now),
                   default=None)

    def to_bytes(self) -> bytes:
        data = {"format_version": _FORMAT, "version": self.version, "entries": [e.to_json() for e in self.entries],
                "history": [c.to_json() for c in self.history]}
        return (json.dumps(data, indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> RevocationList:
        """Parse a revocations file; CaStateError naming `where` and the cause."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("format_version") != _FORMAT:
                raise ValueError(f"format_version must be {_FORMAT}")
            version, entries = data["version"], data["entries"]
            if type(version) is not int or not isinstance(entries, list):
                raise TypeError("version must be an integer and entries a list")
            parsed = tuple(Revocation.from_json(e, f"entries[{i}]") for i, e in enumerate(entries))
            history = data.get("history", [])
            if not isinstance(history, list):
                raise TypeError("history must be a list")
            changes = tuple(RevocationChange.from_json(c, f"history[{i}]") for i, c in enumerate(history))
        except KeyError as e:
            raise CaStateError(f"{where}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError, UnicodeDecodeError) as e:
            raise CaStateError(f"{where}: invalid content: {e}") from None
        return cls(parsed, version, raw, changes)


class StateDirRevocations:
    """The revocation list in `<state_dir>/revocations.json` (0600), written atomically under the CA state's
    exclusive lock; a reader notices another process's write by the file's signature (one stat)."""

    def __init__(self, state_dir: Path) -> None:
        self._dir = Path(state_dir)
        self._path = self._dir / REVOCATIONS_FILE
        self._signature: tuple[int, int, int] | None = None
        self._current = RevocationList()

    @property
    def path(self) -> Path:
        return self._path

    def _signature_now(self) -> tuple[int, int, int] | None:
        return file_signature(self._path) if self._path.exists() else None

    def read(self) -> RevocationList:
        """The list as the file holds it now (empty when there is no file)."""
        signature = self._signature_now()
        if signature is None:
            current = RevocationList()
        else:
            current = RevocationList.from_bytes(read_state_file(self._path), str(self._path))
        self._signature, self._current = signature, current
        return current

    def changed(self) -> RevocationList | None:
        """The list if the file changed since the last read (None otherwise: one stat)."""
        if self._signature_now() == self._signature and self._signature is not None:
            return None
        before = self._current
        current = self.read()
        return None if current.raw == before.raw and current.version == before.version else current

    def update(self, change: Callable[[RevocationList], RevocationList]) -> RevocationList:
        """Apply `change` to the list on disk and write the result (version + 1) if it differs."""
        with state_lock(self._dir, exclusive=True):
            current = self.read()
            new = change(current)
            if new.entries == current.entries:
                return current
            new = new.recorded_after(current)
            raw = new.to_bytes()
            write_atomic(self._path, raw, 0o600)
            fsync_directory(self._dir)
            self._signature, self._current = self._signature_now(), replace(new, raw=raw)
            return self._current


# --- CRLs and the entries the CLI records ---------------------------------------------------------


@dataclass(frozen=True)
class CrlSettings:
    """CRLs are valid `validity` from their signing (thisUpdate backdated by `backdate`) and re-signed once
    `refresh` of it has passed, well before nextUpdate: BoringSSL refuses every handshake under an expired CRL."""

    validity: timedelta = timedelta(hours=24)
    refresh: float = 0.5
    backdate: timedelta = timedelta(minutes=1)

    def __post_init__(self) -> None:
        if self.validity <= timedelta(0) or not 0 < self.refresh < 1:
            raise ValueError("CRL validity must be positive and refresh a fraction between 0 and 1")


def build_crls(
    signers: Sequence[tuple[SlotRecord, Issuer]], revocations: RevocationList, now: datetime, settings: CrlSettings
) -> bytes:
    """One CRL per CA certificate in `signers` (every root and intermediate of the CA state), concatenated PEM.

    Envoy checks the CRL of every CA in a chain once any CRL is configured (X509_V_FLAG_CRL_CHECK_ALL), so
    every CA gets one, empty or not. A root's CRL lists its revoked intermediates; an intermediate's, the
    revoked leaves it signed (and those of unknown issuer). Entries past their certificate's expiry are left out,
    and so are those not yet effective (a taint's revocation during its herd window).
    """
    live = revocations.in_force(now)
    crl_number = max(revocations.version, 0) * 1_000_000_000 + int(now.timestamp()) % 1_000_000_000
    pems = []
    for record, issuer in signers:
        if record.kind == "root":
            wanted = [e for e in live if e.kind == "intermediate" and e.issuer_id == record.id]
        else:
            wanted = [e for e in live if e.kind == "serial" and e.issuer_id in (None, record.id)]
        revoked = [RevokedSerial(e.serial, e.revoked_at, e.reason) for e in wanted if e.serial is not None]
        pems.append(issuer.sign_crl(
            sorted(revoked, key=lambda r: r.serial_number),
            this_update=now - settings.backdate,
            next_update=now + settings.validity,
            crl_number=crl_number,
        ))
    return b"".join(pems)


def intermediate_revocation(
    signers: Sequence[tuple[SlotRecord, Issuer]], slot: str, reason: str, now: datetime
) -> Revocation:
    """The entry revoking intermediate `slot` of the CA; RevocationRefused for an unknown slot, or for the
    active or prepared intermediate (every new leaf would be refused: activate another one first)."""
    check_reason(reason)
    found = next(((r, i) for r, i in signers if r.kind == "intermediate" and r.id == slot), None)
    if found is None:
        known = ", ".join(r.id for r, _ in signers if r.kind == "intermediate")
        raise RevocationRefused(f"--intermediate {slot}: no such intermediate in the CA state (there are: {known})")
    record, issuer = found
    if record.state != "old":
        raise RevocationRefused(
            f"--intermediate {slot}: it is the {record.state} intermediate; revoking it would refuse the leaves it "
            "is about to sign: activate another one first (`meshca ca rotate --intermediate --now`)"
        )
    info = issuer.info
    return Revocation("intermediate", slot, reason, now, info.not_after, record.issuer_id, info.serial_number)


def leaf_revocation(
    signers: Sequence[tuple[SlotRecord, Issuer]], certificate_pem: bytes, reason: str, now: datetime, where: str
) -> Revocation:
    """The entry revoking a leaf given as its certificate; RevocationRefused unless one of the CA's
    intermediates signed it."""
    check_reason(reason)
    try:
        info = crypto.parse_certificate_pem(certificate_pem)
    except crypto.CryptoError as error:
        raise RevocationRefused(f"{where}: {error}") from None
    for record, issuer in signers:
        if record.kind == "intermediate" and issuer.issued(certificate_pem):
            return Revocation("serial", f"{info.serial_number:x}", reason, now, info.not_after, record.id,
                              info.serial_number)
    raise RevocationRefused(f"{where}: serial {info.serial_number:x} was not signed by any intermediate of this CA")


def serial_revocation(
    signers: Sequence[tuple[SlotRecord, Issuer]], serial: str, reason: str, now: datetime
) -> Revocation:
    """A bare serial (`--force`: meshca keeps no record of the leaves it issued): listed on every
    intermediate's CRL until the last of them expires."""
    check_reason(reason)
    try:
        number = int(serial.lower().removeprefix("0x").replace(":", ""), 16)
    except ValueError:
        raise RevocationRefused(f"--serial {serial!r}: not a hexadecimal serial number") from None
    if number <= 0:
        raise RevocationRefused(f"--serial {serial!r}: a serial number is positive")
    ends = [issuer.info.not_after for record, issuer in signers if record.kind == "intermediate"]
    return Revocation("serial", f"{number:x}", reason, now, max(ends, default=now), None, number)
