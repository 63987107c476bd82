"""Unit: client text made fit for a log line, and repeated records counted instead of logged."""

from __future__ import annotations

import logging

import pytest
from fakes import FakeLoopTime, FakeMonotonic

from meshca.logs import RepeatLimiter, client_text


def test_client_text_is_escaped_and_bounded() -> None:
    assert client_text("frontend-1") == "frontend-1"
    assert client_text("a\nb\r\x00\x1b[31m\\") == "a\\nb\\r\\x00\\x1b[31m\\\\"
    assert client_text("héllo ✓") == "héllo ✓"  # printable text stays readable
    huge = "x" * 1_000_000
    assert client_text(huge) == "x" * 200 + "…(1000000 bytes)"
    assert client_text("é" * 300, limit=10) == "é" * 10 + "…(600 bytes)"
    assert len(client_text("\n" * 10**6)) < 1000  # escaping after the cut: at most 4 characters per kept one


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_repeats_within_the_window_are_counted_then_reported(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeMonotonic()
    limiter = RepeatLimiter(logging.getLogger("meshca.test.repeat"), window=10, clock=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(58):
            limiter.log(logging.WARNING, "refused from 10.0.0.1", "refused: %s", "bad token")
            clock.now += 0.1
        limiter.log(logging.WARNING, "refused from 10.0.0.2", "refused: %s", "other peer")
        assert messages(caplog) == ["refused: bad token", "refused: other peer"]
        clock.now += 10
        limiter.log(logging.WARNING, "refused from 10.0.0.1", "refused: %s", "bad token")
    assert messages(caplog)[2:] == [
        "refused from 10.0.0.1: 57 more like it in the last 10 s",
        "refused: bad token",
    ]
    caplog.clear()
    limiter.log(logging.WARNING, "refused from 10.0.0.1", "refused: %s", "bad token")
    limiter.flush()
    assert messages(caplog) == ["refused from 10.0.0.1: 1 more like it in the last 10 s"]


def test_too_many_kinds_are_counted_together(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RepeatLimiter(logging.getLogger("meshca.test.repeat"), window=10, clock=FakeMonotonic(), max_kinds=5)
    with caplog.at_level(logging.WARNING):
        for i in range(1000):
            limiter.log(logging.WARNING, f"refused from 10.0.{i}", "refused from %d", i)
        limiter.flush()
    assert len(caplog.records) == 6
    assert messages(caplog)[-1] == f"{RepeatLimiter.OVERFLOW}: 995 more like it in the last 10 s"


async def test_count_is_logged_when_the_window_ends_on_a_running_loop(
    caplog: pytest.LogCaptureFixture, loop_time: FakeLoopTime
) -> None:
    limiter = RepeatLimiter(logging.getLogger("meshca.test.repeat"), window=10, clock=loop_time)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            limiter.log(logging.WARNING, "refused", "refused once")
        await loop_time.advance(9.9)
        assert messages(caplog) == ["refused once"]
        await loop_time.advance(0.2)
    assert messages(caplog) == ["refused once", "refused: 2 more like it in the last 10 s"]
