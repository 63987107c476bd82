"""Tamper-evident audit log: one hash-chained JSON line per issuance, renewal, revocation and CA transition."""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any, Literal, Protocol

from meshca.clock import Clock
from meshca.files import describe_os_error

# The `prev` of the first line: there is no previous line to hash.
GENESIS = "0" * 64

EventKind = Literal[
    "issue",  # a workload certificate issued over SDS (the first for its identity, or one past reuse)
    "renew",  # a workload certificate renewed by the rotation scheduler
    "sign",  # a CSR signed by meshca.v1.CertificateService
    "revoke",
    "unrevoke",
    "taint",
    "ca_prepared",
    "ca_activated",
    "ca_retired",
    "ca_pruned",
    "ca_migrated",
    "ca_reloaded",  # the CA state changed elsewhere (`meshca ca rotate`, another replica, Vault)
    "audit_recovered",  # the writer dropped a partial line an interrupted write left at the end
    "audit_gap",  # records lost while the file could not be written (see `reason`)
]
CERTIFICATE_EVENTS: frozenset[str] = frozenset({"issue", "renew", "sign"})
REVOCATION_EVENTS: frozenset[str] = frozenset({"revoke", "unrevoke", "taint"})
_CA_EVENTS = {"prepared": "ca_prepared", "activated": "ca_activated", "retired": "ca_retired",
              "pruned": "ca_pruned", "migrated": "ca_migrated"}
# Key order of a line; keys whose value is None are left out (seq, time, event, replica and prev never are).
KEYS = ("seq", "time", "event", "spiffe_id", "serial", "node_id", "issuer", "not_before", "not_after", "ca_kind",
        "generation", "reason", "replica", "prev")


class AuditError(Exception):
    """The audit file cannot be opened or continued; the message names the file and the cause."""


class AuditFileBusy(AuditError):
    """Another process holds the audit file (one writer per file)."""


@dataclass(frozen=True)
class AuditEvent:
    """What happened; the writer adds time, seq, replica and prev. Never holds a key or a token."""

    event: EventKind
    spiffe_id: str | None = None
    serial: int | None = None
    node_id: str | None = None
    issuer: str | None = None  # the issuing CA's slot id (an intermediate), or the CA slot a transition moved
    not_before: datetime | None = None
    not_after: datetime | None = None
    ca_kind: str | None = None  # "root" or "intermediate" for ca_* events
    generation: int | None = None
    reason: str | None = None


class AuditSink(Protocol):
    """What issuers call; `record` never blocks on disk and never raises for a write failure."""

    def record(self, event: AuditEvent) -> None: ...


class NoAudit:
    """The sink when the audit log is off."""

    def record(self, event: AuditEvent) -> None:
        pass


def revocation_event(
    kind: Literal["revoke", "unrevoke", "taint"],
    *,
    spiffe_id: str | None = None,
    serial: int | None = None,
    issuer: str | None = None,
    not_after: datetime | None = None,
    reason: str | None = None,
) -> AuditEvent:
    """The event for `meshca revoke/unrevoke` and `meshca ca taint`: give the serial, the identity or the
    intermediate (`issuer`, its slot id) that was revoked or tainted."""
    if spiffe_id is None and serial is None and issuer is None:
        raise ValueError(f"a {kind} event needs a serial, a SPIFFE ID or an intermediate")
    return AuditEvent(kind, spiffe_id=spiffe_id, serial=serial, issuer=issuer, not_after=not_after, reason=reason)


def ca_event(kind: str, event: str, slot: str, generation: int, reason: str | None = None) -> AuditEvent:
    """The audit event of one meshca.ca.api.CaEvent (kind root/intermediate, event prepared/activated/...)."""
    return AuditEvent(_CA_EVENTS.get(event, "ca_reloaded"), issuer=slot, ca_kind=kind,  # type: ignore[arg-type]
                      generation=generation, reason=reason)


def slot_changes(
    before: Iterable[tuple[str, str, str]], after: Iterable[tuple[str, str, str]]
) -> list[tuple[str, str, str]]:
    """(kind, event, id) for what changed between two sets of CA slots given as (kind, id, state): a CA
    transition committed by another process shows only as its result."""
    old = {(kind, ident): state for kind, ident, state in before}
    new = {(kind, ident): state for kind, ident, state in after}
    named = {"prepared": "prepared", "active": "activated", "old": "retired"}
    changes = [(kind, named.get(state, state), ident) for (kind, ident), state in new.items()
               if old.get((kind, ident)) != state]
    changes += [(kind, "pruned", ident) for (kind, ident) in old if (kind, ident) not in new]
    return changes


class _Slot(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def state(self) -> str: ...


class _Status(Protocol):
    @property
    def generation(self) -> int: ...

    @property
    def slots(self) -> Sequence[_Slot]: ...


class _StatusSource(Protocol):
    @property
    def generation(self) -> int: ...

    def status(self) -> _Status: ...


class _CaEvent(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def event(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def generation(self) -> int: ...


class CaTransitions:
    """Records CA transitions: the events of those this process committed, and for a change committed
    elsewhere (another process, replica or Vault), what changed in the slots, noticed by the generation."""

    def __init__(self, ca: _StatusSource, sink: AuditSink) -> None:
        self._ca = ca
        self._sink = sink
        self._generation, self._slots = self._read()

    def _read(self) -> tuple[int, list[tuple[str, str, str]]]:
        status = self._ca.status()
        return status.generation, [(slot.kind, slot.id, slot.state) for slot in status.slots]

    def observe(self) -> None:
        """Record what changed since the last look (cheap when the generation did not move)."""
        if self._ca.generation != self._generation:
            self._record_changes(explained=set())

    def committed(self, events: Sequence[_CaEvent]) -> None:
        """Record the events of a transition committed here (and anything else that changed meanwhile)."""
        for event in events:
            self._sink.record(ca_event(event.kind, event.event, event.id, event.generation))
        if events:
            self._record_changes({(event.kind, event.event, event.id) for event in events})

    def _record_changes(self, explained: set[tuple[str, str, str]]) -> None:
        generation, slots = self._read()
        for change in slot_changes(self._slots, slots):
            if change not in explained:
                kind, event, ident = change
                self._sink.record(ca_event(kind, event, ident, generation, "committed by another process"))
        self._generation, self._slots = generation, slots


_BEGIN = b"-----BEGIN CERTIFICATE-----"
_END = b"-----END CERTIFICATE-----"


class IssuerIds:
    """The slot id (first 16 hex of the SHA-256 fingerprint) of the CA certificate after the leaf in a chain;
    the tail is the same for every leaf of one intermediate, so it is decoded once."""

    def __init__(self) -> None:
        self._cached: tuple[bytes, str | None] = (b"", None)

    def of_chain(self, chain_pem: bytes) -> str | None:
        start = chain_pem.find(_BEGIN, chain_pem.find(_END) + 1)
        if start < 0:
            return None
        end = chain_pem.find(_END, start)
        tail = chain_pem[start:end]
        cached_tail, ident = self._cached
        if tail == cached_tail:
            return ident
        try:
            der = base64.b64decode(b"".join(tail[len(_BEGIN):].split()), validate=True)
        except (binascii.Error, ValueError):
            return None
        ident = hashlib.sha256(der).hexdigest()[:16]
        self._cached = (tail, ident)
        return ident


def format_time(when: datetime) -> str:
    """RFC 3339 UTC with milliseconds: 2026-12-06T16:44:07.123Z."""
    if when.tzinfo is not timezone.utc:
        when = when.astimezone(timezone.utc)
    return (f"{when.year:04d}-{when.month:02d}-{when.day:02d}T{when.hour:02d}:{when.minute:02d}:{when.second:02d}."
            f"{when.microsecond // 1000:03d}Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def line_hash(line: bytes) -> str:
    """The `prev` the next line carries: SHA-256 of this line's bytes without its newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def encode_line(seq: int, when: datetime, event: AuditEvent, replica: str, prev: str) -> bytes:
    """The line, as json.dumps(separators=(",", ":"), ensure_ascii=False) of the keys in KEYS order would write
    it (None values left out), built by hand: this runs once per issued certificate."""
    text = encode_basestring
    parts = [f'{{"seq":{seq},"time":"{format_time(when)}","event":"{event.event}"']
    if event.spiffe_id is not None:
        parts.append(f',"spiffe_id":{text(event.spiffe_id)}')
    if event.serial is not None:
        parts.append(f',"serial":"{event.serial:x}"')
    if event.node_id is not None:
        parts.append(f',"node_id":{text(event.node_id)}')
    if event.issuer is not None:
        parts.append(f',"issuer":{text(event.issuer)}')
    if event.not_before is not None:
        parts.append(f',"not_before":"{format_time(event.not_before)}"')
    if event.not_after is not None:
        parts.append(f',"not_after":"{format_time(event.not_after)}"')
    if event.ca_kind is not None:
        parts.append(f',"ca_kind":{text(event.ca_kind)}')
    if event.generation is not None:
        parts.append(f',"generation":{int(event.generation)}')
    if event.reason is not None:
        parts.append(f',"reason":{text(event.reason)}')
    parts.append(f',"replica":{text(replica)},"prev":"{prev}"}}\n')
    return "".join(parts).encode()


# --- verification -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """`ok`, or the first bad line (1-based) and why; `lines` good lines before it; `head` the last good line's hash."""

    path: Path
    lines: int
    head: str
    bad_line: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.bad_line is None

    def summary(self) -> str:
        if self.ok:
            return f"{self.path}: OK, {self.lines} records, chain intact, head sha256 {self.head}"
        return f"{self.path}: line {self.bad_line}: {self.problem}"


def _lines(data: bytes) -> Iterator[bytes]:
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            yield data[start:]
            return
        yield data[start:end + 1]
        start = end + 1


def _record(line: bytes) -> dict[str, Any] | str:
    """The line's JSON object, or why it is not an audit record."""
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"not JSON ({error.__class__.__name__}): the line was edited or damaged"
    if not isinstance(value, dict) or type(value.get("seq")) is not int or not isinstance(value.get("prev"), str):
        return "not an audit record (needs an integer seq and a prev hash): the line was edited"
    return value


def verify_bytes(path: Path, data: bytes) -> VerifyResult:
    """Check every line's seq and prev against the lines before it."""
    hashes = [GENESIS, GENESIS]  # the hashes of the two lines before this one (genesis before line 1)
    number = 0
    for number, line in enumerate(_lines(data), start=1):
        good, head = number - 1, hashes[1]
        if not line.endswith(b"\n"):
            return VerifyResult(path, good, head, number, f"truncated mid-line ({len(line)} bytes, no newline): an "
                                "interrupted write, e.g. a crash while writing; the next `meshca serve` cuts it off "
                                "and records audit_recovered")
        record = _record(line)
        if isinstance(record, str):
            return VerifyResult(path, good, head, number, record)
        seq = record["seq"]
        if seq != number:
            return VerifyResult(path, good, head, number, _misplaced(data, seq, number))
        if record["prev"] != head:
            if number == 1:
                return VerifyResult(path, 0, GENESIS, 1, "prev is not the genesis value (64 zeros): "
                                    "lines before it were dropped")
            return VerifyResult(path, good - 1, hashes[0], good, f"edited: its sha256 is not the prev that line "
                                f"{number} carries (this line, or line {number}'s prev, was changed)")
        hashes = [head, line_hash(line)]
    return VerifyResult(path, number, hashes[1])


def _misplaced(data: bytes, seq: int, number: int) -> str:
    """Why line `number` carries `seq`: the expected line further down (reordered), or nowhere (dropped)."""
    found = ""
    for later, line in enumerate(_lines(data), start=1):
        record = _record(line) if later > number else None
        if isinstance(record, dict) and record["seq"] == number:
            found = f"lines were reordered: seq {number} is on line {later}"
            break
    if not found:
        found = (f"{seq - number} line(s) before it were dropped" if seq > number
                 else "lines were reordered or duplicated")
    return f"seq {seq} where {number} was expected: {found}"


def verify_file(path: Path) -> VerifyResult:
    """verify_bytes of a file; OSError when it cannot be read."""
    return verify_bytes(path, path.read_bytes())


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every parseable complete line of an audit file (for listings; `verify_file` judges the chain)."""
    records = []
    for line in _lines(path.read_bytes()):
        if line.endswith(b"\n"):
            record = _record(line)
            if isinstance(record, dict):
                records.append(record)
    return records


# --- the writer ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditStats:
    written: int  # lines written and fsynced by this process
    write_failures: int  # flushes that failed (disk full, read-only, ...)
    dropped: int  # records lost because too many were waiting while writes failed
    pending: int


def worker_path(path: Path, index: int) -> Path:
    """Worker `index`'s own file for `meshca serve --workers N`: audit.jsonl -> audit-worker0.jsonl."""
    return path.with_name(f"{path.stem}-worker{index}{path.suffix}")


def replica_path(path: Path, replica: str) -> Path:
    """The file of a process that found `path` held by another (e.g. a new `meshca serve` started on the same
    state dir before the old one stopped): audit.jsonl -> audit-<replica>.jsonl."""
    return path.with_name(f"{path.stem}-{replica}{path.suffix}")


def chain_files(path: Path) -> list[Path]:
    """`path` and the files beside it of workers (worker_path) and of other processes (replica_path)."""
    found = [path] if path.exists() else []
    found += sorted(path.parent.glob(f"{path.stem}-*{path.suffix}"))
    return found


def _holds_last_line(tail: bytes) -> bool:
    """True when `tail` (the end of a file) holds its last complete line whole, with the newline before it."""
    if not tail.endswith(b"\n"):
        end = tail.rfind(b"\n")
        if end < 0:
            return False
        tail = tail[:end + 1]
    return b"\n" in tail[:-1]


class AuditLog:
    """The file writer: `record` appends to a buffer; a thread writes, chains and fsyncs it every
    `flush_interval` seconds or `batch` records, so issuing never waits on the disk.

    One writer per file: an exclusive flock is held while open. At `open`, the chain continues from the
    last complete line; a partial last line (a crash mid-write) is cut off and an `audit_recovered` line
    says so. A failed write is logged once (and counted) and retried at the next flush; issuance goes on;
    at most `max_pending` records wait, later ones are counted as dropped and an `audit_gap` line says so.
    """

    def __init__(
        self,
        path: Path,
        replica: str,
        clock: Clock,
        logger: logging.Logger,
        flush_interval: float = 0.1,
        batch: int = 512,
        max_pending: int = 100_000,
    ) -> None:
        self.path = path
        self._replica = replica
        self._clock = clock
        self._log = logger
        self._flush_interval = flush_interval
        self._batch = batch
        self._max_pending = max_pending
        self._cond = threading.Condition()
        self._pending: list[tuple[datetime, AuditEvent]] = []
        self._flushing = threading.Lock()  # one flush at a time (the thread, or flush()/close())
        self._fd: int | None = None
        self._size = 0  # bytes of complete, chained lines in the file
        self._seq = 0
        self._prev = GENESIS
        self._dirty = False  # a failed write may have left bytes past _size
        self._failing = False
        self._written = 0
        self._failures = 0
        self._dropped = 0
        self._unreported_drops = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        """Lock the file and find where the chain goes on; AuditError naming the file and the cause."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        except OSError as error:
            raise AuditError(f"cannot open {self.path}: {describe_os_error(error)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AuditFileBusy(f"{self.path} is being written by another process: give each process its own "
                                    "audit path (one hash chain per writer)") from None
            raise AuditError(f"cannot lock {self.path}: {describe_os_error(error)}") from None
        try:
            partial = self._continue_chain(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if partial is not None:
            self.record(AuditEvent("audit_recovered", reason=partial))
        self._thread = threading.Thread(target=self._run, name="meshca-audit", daemon=True)
        self._thread.start()

    def _continue_chain(self, fd: int) -> str | None:
        """Read the last complete line (seq and hash); cut a partial line off. Returns what was cut, if anything."""
        size = os.fstat(fd).st_size
        tail, start = b"", size
        while start > 0 and not _holds_last_line(tail):
            start = max(0, start - 65536)
            tail = os.pread(fd, size - start, start)
        cut = None
        if tail and not tail.endswith(b"\n"):
            last_newline = tail.rfind(b"\n")
            partial = tail[last_newline + 1:]
            good = start + last_newline + 1
            try:
                os.ftruncate(fd, good)
                os.fsync(fd)
            except OSError as error:
                raise AuditError(f"cannot cut the partial last line of {self.path}: {describe_os_error(error)}") from None
            cut = (f"dropped a partial last line of {len(partial)} bytes (sha256 {hashlib.sha256(partial).hexdigest()}) "
                   "left by an interrupted write")
            self._log.warning("audit log %s: %s", self.path, cut)
            tail, size = tail[:last_newline + 1], good
        self._size = size
        if not tail:
            return cut
        last = tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1:]
        record = _record(last)
        if isinstance(record, str):
            raise AuditError(f"{self.path}: the last line is {record}; check it with `meshca audit verify {self.path}`")
        self._seq, self._prev = record["seq"], line_hash(last)
        return cut

    def record(self, event: AuditEvent) -> None:
        when = self._clock()
        with self._cond:
            if len(self._pending) >= self._max_pending:
                self._dropped += 1
                self._unreported_drops += 1
                return
            self._pending.append((when, event))
            if len(self._pending) >= self._batch:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closed and len(self._pending) < self._batch:
                    self._cond.wait(self._flush_interval)
                if self._closed:
                    return
            self.flush()

    def flush(self) -> bool:
        """Write, chain and fsync what is waiting; False when the write failed (it stays waiting)."""
        with self._flushing:
            with self._cond:
                batch = list(self._pending)
                drops = self._unreported_drops
            if not batch and not drops or self._fd is None:
                return True
            if drops:
                batch.append((self._clock(), AuditEvent(
                    "audit_gap", reason=f"{drops} records lost while the audit log could not be written")))
            seq, prev, lines = self._seq, self._prev, []
            for when, event in batch:
                seq += 1
                line = encode_line(seq, when, event, self._replica, prev)
                lines.append(line)
                prev = line_hash(line)
            data = b"".join(lines)
            try:
                if self._dirty:
                    os.ftruncate(self._fd, self._size)
                    self._dirty = False
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
                os.fsync(self._fd)
            except OSError as error:
                self._dirty = True
                self._failures += 1
                if not self._failing:
                    self._failing = True
                    self._log.error("audit log %s: write failed, issuing goes on and the records wait (retried "
                                    "every flush): %s", self.path, describe_os_error(error))
                return False
            self._size += len(data)
            self._seq, self._prev = seq, prev
            self._written += len(lines)
            with self._cond:
                del self._pending[:len(batch) - (1 if drops else 0)]
                self._unreported_drops -= drops
            if self._failing:
                self._failing = False
                self._log.info("audit log %s: writes work again", self.path)
            return True

    def stats(self) -> AuditStats:
        with self._cond:
            return AuditStats(self._written, self._failures, self._dropped, len(self._pending))

    def close(self) -> None:
        """Write what is waiting and release the file."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        self.flush()
        with self._flushing:
            if self._fd is not None:
                os.close(self._fd)  # releases the flock
                self._fd = None


def describe_events(records: Sequence[dict[str, Any]]) -> str:
    """'3 issue, 1 renew' for a summary line."""
    counts: dict[str, int] = {}
    for record in records:
        counts[str(record.get("event"))] = counts.get(str(record.get("event")), 0) + 1
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))


# --- the inventory (`meshca certs list`) ----------------------------------------------------------------

CertificateState = Literal["valid", "expired", "revoked"]


@dataclass(frozen=True)
class CertificateEntry:
    """One issued certificate as the audit log(s) tell it."""

    spiffe_id: str
    serial: str
    issuer: str | None
    not_before: datetime | None
    not_after: datetime
    node_id: str | None
    replica: str
    event: str  # issue, renew or sign
    issued_at: datetime
    state: CertificateState

    def to_json(self) -> dict[str, Any]:
        def when(value: datetime | None) -> str | None:
            return None if value is None else format_time(value)

        return {
            "spiffe_id": self.spiffe_id, "serial": self.serial, "issuer": self.issuer,
            "not_before": when(self.not_before), "not_after": when(self.not_after), "node_id": self.node_id,
            "replica": self.replica, "event": self.event, "issued_at": when(self.issued_at), "state": self.state,
        }


def inventory(records: Iterable[dict[str, Any]], now: datetime) -> list[CertificateEntry]:
    """Every issued certificate in `records` (of one or more logs), oldest first, with its state now.

    Revoked: its serial was revoked, or its issuing intermediate (a revoke with `issuer` only), or its
    identity is revoked now (a revoke with `spiffe_id` only not followed by an unrevoke). Otherwise
    expired past not_after, else valid.
    """
    ordered = sorted(records, key=lambda r: (str(r.get("time", "")), int(r.get("seq", 0))))
    serials: set[str] = set()
    intermediates: set[str] = set()
    identities: dict[str, bool] = {}
    issued: list[dict[str, Any]] = []
    for record in ordered:
        event = record.get("event")
        if event in CERTIFICATE_EVENTS and record.get("serial") and record.get("not_after"):
            issued.append(record)
        elif event == "revoke":
            if record.get("serial"):
                serials.add(str(record["serial"]))
            elif record.get("spiffe_id"):
                identities[str(record["spiffe_id"])] = True
            elif record.get("issuer"):
                intermediates.add(str(record["issuer"]))
        elif event == "unrevoke" and record.get("spiffe_id") and not record.get("serial"):
            identities[str(record["spiffe_id"])] = False
    entries = []
    for record in issued:
        serial, spiffe_id = str(record["serial"]), str(record.get("spiffe_id", ""))
        not_after = parse_time(record["not_after"])
        state: CertificateState
        if serial in serials or record.get("issuer") in intermediates or identities.get(spiffe_id, False):
            state = "revoked"
        elif now >= not_after:
            state = "expired"
        else:
            state = "valid"
        entries.append(CertificateEntry(
            spiffe_id=spiffe_id,
            serial=serial,
            issuer=record.get("issuer"),
            not_before=parse_time(record["not_before"]) if record.get("not_before") else None,
            not_after=not_after,
            node_id=record.get("node_id"),
            replica=str(record.get("replica", "")),
            event=str(record["event"]),
            issued_at=parse_time(record["time"]),
            state=state,
        ))
    return entries
