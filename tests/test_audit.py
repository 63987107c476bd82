"""The audit log's hash chain: edits, drops, reorders and a crash mid-write are found; the writer goes on after one."""

from __future__ import annotations

import json
import logging
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from meshca.audit import (
    GENESIS,
    AuditError,
    AuditEvent,
    AuditLog,
    IssuerIds,
    line_hash,
    revocation_event,
    slot_changes,
    verify_file,
)

T0 = datetime(2026, 12, 6, 12, 0, 0, 123456, tzinfo=timezone.utc)


class Ticks:
    """A clock that moves one second per call."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def issue(n: int, node: str | None = "node-a") -> AuditEvent:
    return AuditEvent("issue", spiffe_id=f"spiffe://example.org/ns/a/sa/w{n}", serial=0xABC0 + n, node_id=node,
                      issuer="0123456789abcdef", not_before=T0, not_after=T0 + timedelta(hours=1))


def write_log(path: Path, count: int) -> None:
    log = AuditLog(path, "host-1", Ticks(), logging.getLogger("test"), flush_interval=60)
    log.open()
    for n in range(count):
        log.record(issue(n))
    log.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_a_clean_log_verifies_and_each_line_chains_the_one_before(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    result = verify_file(path)
    assert result.ok, result.summary()
    assert result.lines == 5
    records = [json.loads(line) for line in lines(path)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    assert all(records[i]["prev"] == line_hash(lines(path)[i - 1]) for i in range(1, 5))
    first = records[0]
    assert first["time"] == "2026-12-06T12:00:01.123Z"
    assert first["event"] == "issue" and first["serial"] == "abc0" and first["node_id"] == "node-a"
    assert first["issuer"] == "0123456789abcdef" and first["not_after"] == "2026-12-06T13:00:00.123Z"
    assert first["replica"] == "host-1"
    assert result.head == line_hash(lines(path)[-1])
    assert "OK, 5 records" in result.summary()


def test_an_edited_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    content = lines(path)
    content[2] = content[2].replace(b"node-a", b"node-b")
    path.write_bytes(b"".join(content))
    result = verify_file(path)
    assert not result.ok
    assert result.bad_line == 3 and "edited" in (result.problem or "")


def test_a_dropped_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    content = lines(path)
    del content[1]
    path.write_bytes(b"".join(content))
    result = verify_file(path)
    assert result.bad_line == 2 and "dropped" in (result.problem or "")
    del content[0]  # and the first line: its successor's prev is not the genesis value
    path.write_bytes(b"".join(content))
    assert verify_file(path).bad_line == 1


def test_reordered_lines_are_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    content = lines(path)
    content[1], content[3] = content[3], content[1]
    path.write_bytes(b"".join(content))
    result = verify_file(path)
    assert result.bad_line == 2 and result.problem == "seq 4 where 2 was expected: lines were reordered: seq 2 is on line 4"


def test_renumbered_lines_still_break_the_chain(tmp_path: Path) -> None:
    """Swapping two lines and fixing their seq: the prev hashes no longer match."""
    path = tmp_path / "audit.jsonl"
    write_log(path, 4)
    records = [json.loads(line) for line in lines(path)]
    records[1], records[2] = records[2], records[1]
    records[1]["seq"], records[2]["seq"] = 2, 3
    path.write_bytes(b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records))
    assert not verify_file(path).ok


def test_a_line_that_is_not_json_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    path.write_bytes(path.read_bytes().replace(b'"seq":2', b'"seq":2,,'))
    result = verify_file(path)
    assert result.bad_line == 2 and "not JSON" in (result.problem or "")


def test_a_crash_mid_write_is_reported_and_the_writer_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    good = path.read_bytes()
    with path.open("ab") as file:
        file.write(b'{"seq":4,"time":"2026-12-06T12:0')  # the process died here
    result = verify_file(path)
    assert result.bad_line == 4 and "truncated mid-line" in (result.problem or "")
    assert result.lines == 3

    write_log(path, 2)  # a restart
    result = verify_file(path)
    assert result.ok, result.summary()
    assert result.lines == 3 + 1 + 2
    assert path.read_bytes().startswith(good)
    records = [json.loads(line) for line in lines(path)]
    assert records[3]["event"] == "audit_recovered" and "partial last line of 32 bytes" in records[3]["reason"]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]


def test_the_writer_continues_a_chain_it_did_not_start_with_lines_longer_than_a_read(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "host-1", Ticks(), logging.getLogger("test"), flush_interval=60)
    log.open()
    for n in range(3):
        log.record(AuditEvent("revoke", spiffe_id="spiffe://example.org/ns/a/sa/x", reason="r" * 70_000 + str(n)))
    log.close()
    write_log(path, 1)
    assert verify_file(path).ok and verify_file(path).lines == 4


def test_two_writers_never_share_a_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path, "a", Ticks(), logging.getLogger("test"))
    first.open()
    try:
        second = AuditLog(path, "b", Ticks(), logging.getLogger("test"))
        with pytest.raises(AuditError, match="another process"):
            second.open()
    finally:
        first.close()


def test_a_damaged_last_line_stops_the_writer_with_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"hello\n")
    with pytest.raises(AuditError, match=r"audit.jsonl: the last line is not JSON.*meshca audit verify"):
        AuditLog(path, "a", Ticks(), logging.getLogger("test")).open()


def test_a_write_failure_is_logged_once_counted_and_the_records_wait(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only file stands in for a full disk: writes fail with an OSError, then work again."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "host-1", Ticks(), logging.getLogger("test.audit"), flush_interval=60, max_pending=3)
    log.open()
    log.record(issue(0))
    assert log.flush()
    fd = log._fd
    assert fd is not None
    read_only = os.open(path, os.O_RDONLY)
    log._fd = read_only  # every write now fails with EBADF, as a full or read-only disk would fail
    with caplog.at_level(logging.INFO, logger="test.audit"):
        for n in range(1, 6):
            log.record(issue(n))  # never raises, never blocks
        assert not log.flush() and not log.flush()
        stats = log.stats()
        assert stats.write_failures == 2 and stats.pending == 3 and stats.dropped == 2
        log._fd = fd
        assert log.flush()
    os.close(read_only)
    log.close()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "write failed" in errors[0].getMessage()
    assert any("work again" in r.getMessage() for r in caplog.records)
    result = verify_file(path)
    assert result.ok and result.lines == 1 + 3 + 1
    assert json.loads(lines(path)[-1])["event"] == "audit_gap"


def test_the_writer_flushes_by_itself(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "h", Ticks(), logging.getLogger("test"), flush_interval=0.01)
    log.open()
    try:
        log.record(issue(1))
        for _ in range(500):
            if path.stat().st_size:
                break
            import time

            time.sleep(0.01)
        assert verify_file(path).lines == 1
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 in (0o040, 0o000)
    finally:
        log.close()


def test_revocation_events_for_the_revocation_commands() -> None:
    event = revocation_event("taint", issuer="0123456789abcdef", reason="key leaked")
    assert event.event == "taint" and event.issuer == "0123456789abcdef"
    with pytest.raises(ValueError):
        revocation_event("revoke")


def test_slot_changes_name_each_transition() -> None:
    before = [("root", "r1", "active"), ("intermediate", "i1", "active"), ("intermediate", "i0", "old")]
    after = [("root", "r1", "active"), ("intermediate", "i1", "old"), ("intermediate", "i2", "active")]
    assert sorted(slot_changes(before, after)) == [
        ("intermediate", "activated", "i2"), ("intermediate", "pruned", "i0"), ("intermediate", "retired", "i1")
    ]


def test_issuer_id_is_the_slot_id_of_the_ca_after_the_leaf(tmp_path: Path) -> None:
    from meshca.ca.api import CaSettings
    from meshca.ca.internal import CertificateAuthority
    from meshca.clock import system_clock
    from meshca.identity.spiffe import SpiffeId

    ca = CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain="example.org"), system_clock)
    leaf = ca.issue_workload(SpiffeId.for_service_account("example.org", "a", "b"))
    ids = IssuerIds()
    assert ids.of_chain(leaf.chain_pem) == ca.active_intermediate_id
    assert ids.of_chain(leaf.chain_pem) == ca.active_intermediate_id  # cached
    assert ids.of_chain(leaf.certificate_pem) is None


def test_a_line_is_the_json_of_its_fields_in_order() -> None:
    from meshca.audit import KEYS, encode_line

    event = AuditEvent("ca_prepared", spiffe_id='spiffe://x/ns/"q"/sa/é\n', serial=255, node_id="n\\1", issuer="ab",
                       not_before=T0, not_after=T0.astimezone(timezone(timedelta(hours=2))), ca_kind="root",
                       generation=3, reason="r\t")
    line = encode_line(9, T0, event, "rep", GENESIS)
    parsed = json.loads(line)
    assert list(parsed) == list(KEYS)
    assert line == json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    assert parsed["not_after"] == "2026-12-06T12:00:00.123Z" and parsed["serial"] == "ff"
    short = json.loads(encode_line(1, T0, AuditEvent("renew"), "rep", GENESIS))
    assert list(short) == ["seq", "time", "event", "replica", "prev"]
