"""CA state on disk (format 2): slot files, ca.json as the commit point, the journal and the lock."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

from meshca.ca.api import CaStateError, JournalEvent, SlotKind, SlotState
from meshca.files import fsync_directory, named, write_atomic

FORMAT_VERSION = 2
METADATA_FILE = "ca.json"
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = ".lock"

# Format 1 (one root, one intermediate, fixed names); read once and migrated to slots.
V1_ROOT_CERT_FILE = "root.pem"
V1_ROOT_KEY_FILE = "root-key.pem"
V1_INTERMEDIATE_CERT_FILE = "intermediate.pem"
V1_INTERMEDIATE_KEY_FILE = "intermediate-key.pem"
V1_FILES = (V1_ROOT_CERT_FILE, V1_ROOT_KEY_FILE, V1_INTERMEDIATE_CERT_FILE, V1_INTERMEDIATE_KEY_FILE)

SLOT_KINDS: tuple[SlotKind, ...] = get_args(SlotKind)
SLOT_STATES: tuple[SlotState, ...] = get_args(SlotState)
JOURNAL_EVENTS: tuple[JournalEvent, ...] = get_args(JournalEvent)
SLOT_ID_HEX = 16  # the first 64 bits of the certificate's SHA-256 fingerprint
_STATE_ORDER: Mapping[str, int] = {"active": 0, "prepared": 1, "old": 2}

CrashPoint = Literal["key_written", "files_written", "journal_written", "committed"]
CrashHook = Callable[[CrashPoint], None]  # test hook: raise to simulate a crash at that step
CRASH_POINTS: tuple[CrashPoint, ...] = get_args(CrashPoint)

_SLOT_FILE = re.compile(r"^(root|intermediate)-([0-9a-f]{16})(-key)?\.pem$")
_TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp$")  # meshca.files.write_atomic's temp names


def slot_id(fingerprint_sha256: str) -> str:
    """The slot id of a CA certificate: short lowercase hex of its SHA-256 fingerprint."""
    return fingerprint_sha256[:SLOT_ID_HEX].lower()


def slot_files(kind: SlotKind, slot: str) -> tuple[str, str]:
    """(certificate file, key file) names of a slot, flat in the state directory."""
    return f"{kind}-{slot}.pem", f"{kind}-{slot}-key.pem"


def is_ca_state_file(name: str) -> bool:
    """True for names that belong to a CA (any format); `init` refuses a directory holding one."""
    return name in (METADATA_FILE, JOURNAL_FILE, *V1_FILES) or _SLOT_FILE.match(name) is not None


def parse_time(value: object, where: str) -> datetime:
    if not isinstance(value, str):
        raise TypeError(f"{where} must be an ISO 8601 string, got {value!r}")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"{where} {value!r} has no timezone")
    return parsed


@dataclass(frozen=True)
class SlotRecord:
    """One CA certificate's entry in ca.json."""

    kind: SlotKind
    id: str
    state: SlotState
    issuer_id: str | None  # the root that signed an intermediate; None for roots
    not_before: datetime
    not_after: datetime
    since: datetime  # when it entered `state`
    retire_after: datetime | None = None  # old slots only: no leaf chained to it outlives this

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.id,
            "state": self.state,
            "issuer": self.issuer_id,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "since": self.since.isoformat(),
            "retire_after": self.retire_after.isoformat() if self.retire_after else None,
        }

    @classmethod
    def from_json(cls, data: object, where: str) -> SlotRecord:
        if not isinstance(data, dict):
            raise TypeError(f"{where} must be an object")
        kind, state, ident, issuer = data["kind"], data["state"], data["id"], data["issuer"]
        if kind not in SLOT_KINDS:
            raise ValueError(f"{where}.kind {kind!r} is not one of {list(SLOT_KINDS)}")
        if state not in SLOT_STATES:
            raise ValueError(f"{where}.state {state!r} is not one of {list(SLOT_STATES)}")
        if not isinstance(ident, str) or not re.fullmatch(f"[0-9a-f]{{{SLOT_ID_HEX}}}", ident):
            raise ValueError(f"{where}.id {ident!r} is not {SLOT_ID_HEX} lowercase hex digits")
        if (kind == "root") != (issuer is None) or (issuer is not None and not isinstance(issuer, str)):
            raise ValueError(f"{where}.issuer must be null for a root and a root id for an intermediate")
        retire = data["retire_after"]
        if (state == "old") != (retire is not None):
            raise ValueError(f"{where}.retire_after must be set for old slots and only for them")
        return cls(
            kind=kind,
            id=ident,
            state=state,
            issuer_id=issuer,
            not_before=parse_time(data["not_before"], f"{where}.not_before"),
            not_after=parse_time(data["not_after"], f"{where}.not_after"),
            since=parse_time(data["since"], f"{where}.since"),
            retire_after=None if retire is None else parse_time(retire, f"{where}.retire_after"),
        )


def slot_order(record: SlotRecord) -> tuple[int, int, datetime, str]:
    """The order of slots in ca.json, status and the bundle: roots first, then active, prepared, old."""
    return (0 if record.kind == "root" else 1, _STATE_ORDER[record.state], record.not_before, record.id)


def check_slot_certificate(
    record: SlotRecord, fingerprint_sha256: str, validity: tuple[datetime, datetime], cert_path: Path, metadata: Path
) -> None:
    """CaStateError unless the certificate in `cert_path` is the one `metadata` records for the slot."""
    if slot_id(fingerprint_sha256) != record.id:
        raise CaStateError(f"{cert_path}: certificate fingerprint {fingerprint_sha256} is not slot {record.id}")
    if validity != (record.not_before, record.not_after):
        raise CaStateError(f"{metadata}: validity recorded for {record.kind} {record.id} does not match {cert_path}")


@dataclass(frozen=True)
class StateRecord:
    """The content of a format-2 ca.json. `settings` is CaSettings.to_json()."""

    trust_domain: str
    key_algorithm: str
    created_at: datetime
    generation: int
    committed_at: datetime
    settings: Mapping[str, Any] = field(repr=False)
    slots: tuple[SlotRecord, ...]

    def to_bytes(self) -> bytes:
        data = {
            "format_version": FORMAT_VERSION,
            "trust_domain": self.trust_domain,
            "key_algorithm": self.key_algorithm,
            "created_at": self.created_at.isoformat(),
            "generation": self.generation,
            "committed_at": self.committed_at.isoformat(),
            "settings": dict(self.settings),
            "slots": [slot.to_json() for slot in self.slots],
        }
        return (json.dumps(data, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StateRecord:
        """Parse a format-2 ca.json object; raises KeyError/TypeError/ValueError."""
        trust_domain, key_algorithm, settings = data["trust_domain"], data["key_algorithm"], data["settings"]
        if not isinstance(trust_domain, str) or not isinstance(key_algorithm, str) or not isinstance(settings, dict):
            raise TypeError("trust_domain and key_algorithm must be strings, settings an object")
        generation = data["generation"]
        if type(generation) is not int or generation < 1:
            raise ValueError(f"generation must be a positive integer, got {generation!r}")
        slots = data["slots"]
        if not isinstance(slots, list):
            raise TypeError("slots must be a list")
        return cls(
            trust_domain=trust_domain,
            key_algorithm=key_algorithm,
            created_at=parse_time(data["created_at"], "created_at"),
            generation=generation,
            committed_at=parse_time(data["committed_at"], "committed_at"),
            settings=settings,
            slots=tuple(SlotRecord.from_json(slot, f"slots[{i}]") for i, slot in enumerate(slots)),
        )


def read_metadata(state_dir: Path, name: str = METADATA_FILE) -> tuple[bytes, dict[str, Any]]:
    """The raw bytes and the JSON object of the commit file (ca.json); CaStateError naming the file otherwise."""
    path = state_dir / name
    raw = read_state_file(path)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CaStateError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CaStateError(f"{path}: must hold a JSON object")
    return raw, data


def read_state_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CaStateError(f"{path}: file is missing (partial or damaged CA state)") from None
    except OSError as e:
        raise CaStateError(f"{path}: cannot be read: {e.strerror or e}") from None


def file_signature(path: Path) -> tuple[int, int, int]:
    """(inode, mtime ns, size): changes whenever ca.json is replaced (atomic rename = new inode)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CaStateError(f"{path}: cannot be read: {e.strerror or e}") from None
    return st.st_ino, st.st_mtime_ns, st.st_size


def refuse_existing(state_dir: Path, error: type[CaStateError], also: Sequence[str] = ()) -> None:
    """Raise `error` if `state_dir` holds any CA state file (or one named in `also`)."""
    if not state_dir.is_dir():
        return
    existing = [name for name in sorted(os.listdir(state_dir)) if is_ca_state_file(name) or name in also]
    if existing:
        raise error(f"{state_dir} already holds CA state ({', '.join(existing)}); refusing to overwrite it")


def create_state_dir(state_dir: Path, error: type[CaStateError], also: Sequence[str] = ()) -> None:
    """Make `state_dir` 0700 (creating it if needed) for a new CA, after refuse_existing."""
    if state_dir.exists() and not state_dir.is_dir():
        raise CaStateError(f"{state_dir}: exists and is not a directory")
    refuse_existing(state_dir, error, also)
    if state_dir.is_dir():
        check_owner(state_dir)
        os.chmod(state_dir, 0o700)  # before any key is written into it
    else:
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(state_dir, 0o700)


@contextmanager
def state_lock(state_dir: Path, *, exclusive: bool) -> Iterator[None]:
    """flock on state_dir/.lock: exclusive for transitions, shared for reads (released on close).

    An exclusive lock is a CA change: refused unless this user owns the state directory (check_owner).
    The lock file is opened read-only (flock needs no write access) and created only when missing, so
    reading works on a read-only state directory; a reader that can neither open nor create it (a
    read-only directory that never had one) reads without the lock.
    """
    path = state_dir / LOCK_FILE
    if exclusive:
        check_owner(state_dir)
    flags = getattr(os, "O_CLOEXEC", 0)
    try:
        try:
            fd = os.open(path, os.O_RDONLY | flags)
        except FileNotFoundError:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o600)
    except OSError as error:
        if not exclusive and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            yield
            return
        raise CaStateError(f"{path}: cannot open the CA state lock: {error.strerror or error}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def check_owner(state_dir: Path) -> None:
    """CaStateError unless this process's user owns `state_dir`: a CA change by anyone else (root
    included) would leave files the owner, the user `meshca serve` runs as, cannot read."""
    try:
        owner = os.stat(state_dir).st_uid
    except OSError as error:
        raise CaStateError(f"{state_dir}: cannot be read: {error.strerror or error}") from None
    if owner == os.geteuid():
        return
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = f"#{owner}"  # sudo's syntax for a numeric uid
    raise CaStateError(
        f"state directory {state_dir} is owned by uid {owner}; run this as that user (e.g. sudo -u {name} meshca ...)"
    )


def check_state_dir_mode(state_dir: Path) -> None:
    """CaStateError if group or others may write into `state_dir` (they could replace ca.json or a key).

    Others may read it (0755): the certificates and ca.json are public, every key is checked by
    read_key_file. A directory on a read-only mount (a Kubernetes Secret volume: 1777 root) is
    writable by nobody, whatever its mode.
    """
    st = os.stat(state_dir)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and not os.statvfs(state_dir).f_flag & os.ST_RDONLY:
        raise CaStateError(
            f"state directory {state_dir} is writable by group or others (mode {mode:04o}); "
            f"run `chmod go-w {state_dir}` (meshca creates it 0700)"
        )


def read_key_file(path: Path) -> bytes:
    """A CA private key's PEM; CaStateError if other users may read or change it (like ssh's
    "UNPROTECTED PRIVATE KEY FILE"). As PostgreSQL allows for its key, a key owned by root may be
    readable by its group (0440/0640 root:meshca: a root-managed key, e.g. a Kubernetes Secret
    volume with fsGroup)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CaStateError(f"{path}: file is missing (partial or damaged CA state)") from None
    except OSError as e:
        raise CaStateError(f"{path}: cannot be read: {e.strerror or e}") from None
    mode = stat.S_IMODE(st.st_mode)
    shared_by_root = st.st_uid == 0 and mode & 0o077 == 0o040
    if mode & 0o077 and not shared_by_root:
        raise CaStateError(
            f"{path}: CA private key has mode {mode:04o}, open to other users; run `chmod 600 {path}`"
        )
    return read_state_file(path)


def leftover_files(state_dir: Path, referenced: Iterable[tuple[SlotKind, str]], *, v2_committed: bool) -> list[Path]:
    """Files no committed state refers to: slot files of interrupted transitions or pruned slots,
    write_atomic temp files, and (once format 2 is committed) the format-1 files it was migrated from."""
    keep = {name for kind, ident in referenced for name in slot_files(kind, ident)}
    found = []
    for name in sorted(os.listdir(state_dir)):
        slot = _SLOT_FILE.match(name)
        if (slot and name not in keep) or _TEMP_FILE.match(name) or (v2_committed and name in V1_FILES):
            found.append(state_dir / name)
    return found


def remove_files(state_dir: Path, paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        fsync_directory(state_dir)


# --- the journal ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JournalEntry:
    """One line of journal.jsonl. All lines of one transition share its generation."""

    at: datetime
    event: JournalEvent
    kind: SlotKind
    id: str
    generation: int

    def to_line(self) -> bytes:
        data = {"at": self.at.isoformat(), "event": self.event, "kind": self.kind, "id": self.id,
                "generation": self.generation}
        return (json.dumps(data, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes) -> JournalEntry | None:
        """None for a line that is not a journal entry (e.g. the torn tail of a write cut by a crash)."""
        try:
            data = json.loads(line)
            entry = cls(
                parse_time(data["at"], "at"), data["event"], data["kind"], data["id"], data["generation"]
            )
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            return None
        if entry.event not in JOURNAL_EVENTS or entry.kind not in SLOT_KINDS or type(entry.generation) is not int:
            return None
        return entry


def _journal_lines(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, line without newline) for every line, including an unterminated last one."""
    lines, offset = [], 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        stop = len(data) if end < 0 else end
        lines.append((offset, data[offset:stop]))
        offset = stop + 1
    return lines


def read_journal(state_dir: Path, committed_generation: int | None = None) -> list[JournalEntry]:
    """The journal's entries in order; with `committed_generation`, only the committed ones
    (a line beyond ca.json's generation is the intent of a transition that never committed)."""
    try:
        data = (state_dir / JOURNAL_FILE).read_bytes()
    except FileNotFoundError:
        return []
    entries = [entry for _, line in _journal_lines(data) if (entry := JournalEntry.from_line(line)) is not None]
    if committed_generation is not None:
        entries = [entry for entry in entries if entry.generation <= committed_generation]
    return entries


def append_journal(state_dir: Path, entries: Sequence[JournalEntry], committed_generation: int) -> None:
    """Append `entries` durably, first cutting the uncommitted tail (lines of generations beyond
    `committed_generation`, torn lines) an interrupted transition left, so that every line up to
    ca.json's generation is committed history and the lines beyond it are the intent in flight."""
    path = state_dir / JOURNAL_FILE
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        data = b""
        while chunk := os.read(fd, 1 << 20):
            data += chunk
        cut = len(data)
        for offset, line in reversed(_journal_lines(data)):
            entry = JournalEntry.from_line(line)
            if entry is not None and entry.generation <= committed_generation:
                break
            cut = offset
        if cut < len(data):
            os.ftruncate(fd, cut)
        os.lseek(fd, cut, os.SEEK_SET)
        view = memoryview(b"".join(entry.to_line() for entry in entries))
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as error:  # e.g. a full disk: say which file
        raise named(error, path) from None
    finally:
        os.close(fd)
    if created:
        fsync_directory(state_dir)


# --- the commit ----------------------------------------------------------------------------------


def no_crash(point: CrashPoint) -> None:
    """The CrashHook outside tests: no crash."""
    return None


def commit_transition(
    state_dir: Path,
    metadata_file: str,
    raw: bytes,
    *,
    record: StateRecord,
    base_generation: int,
    referenced: Iterable[tuple[SlotKind, str]],
    v2_committed: bool,
    files: Sequence[tuple[str, bytes, int]],
    events: Sequence[tuple[JournalEvent, SlotKind, str]],
    remove_after: Sequence[Path],
    crash: CrashHook = no_crash,
) -> tuple[int, int, int]:
    """The one write path of every transition (caller holds the exclusive lock); returns the
    commit file's new signature:

    1. remove leftovers of interrupted transitions (files the committed state does not reference);
    2. write `files` ((name, content, mode): new names, never overwriting), fsync the dir;
    3. append the journal lines with the new generation, fsync;
    4. replace the commit file (`metadata_file`: `raw`, `record` serialized) atomically, fsync the dir:
       THE commit point;
    5. remove the files of slots the new commit file no longer references (pruned), fsync the dir.

    `crash` is called at each CrashPoint; "key_written" follows the first file, which callers make a key.
    """
    remove_files(state_dir, leftover_files(state_dir, referenced, v2_committed=v2_committed))
    for i, (name, content, mode) in enumerate(files):
        write_atomic(state_dir / name, content, mode, overwrite=False)
        if i == 0:
            crash("key_written")
    if files:
        fsync_directory(state_dir)
    crash("files_written")
    at = record.committed_at
    append_journal(
        state_dir, [JournalEntry(at, event, kind, ident, record.generation) for event, kind, ident in events],
        base_generation,
    )
    crash("journal_written")
    write_atomic(state_dir / metadata_file, raw, 0o644)
    fsync_directory(state_dir)
    crash("committed")
    remove_files(state_dir, remove_after)
    return file_signature(state_dir / metadata_file)
