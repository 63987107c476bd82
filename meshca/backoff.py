"""Capped exponential backoff: the one formula behind every retry delay in meshca."""

from __future__ import annotations

from datetime import timedelta

_ONE_US = timedelta(microseconds=1)


def backoff_delay(attempt: int, initial: timedelta, cap: timedelta) -> timedelta:
    """The wait before retry number `attempt` (1 after the first failure): initial·2^(attempt-1), never above
    `cap`; zero for attempt <= 0. Exact in microseconds and without overflow for any attempt."""
    if attempt <= 0:
        return timedelta(0)
    # 2^64 µs is far beyond timedelta's range, so a larger shift cannot change the capped result
    doubled = (initial // _ONE_US) << min(attempt - 1, 64)
    return timedelta(microseconds=max(0, min(cap // _ONE_US, doubled)))
