"""meshca.backoff: the capped exponential delay every retry loop uses."""

from __future__ import annotations

from datetime import timedelta

from meshca.backoff import backoff_delay


def test_backoff_schedule_doubles_and_is_capped() -> None:
    one, cap = timedelta(seconds=1), timedelta(seconds=30)
    delays = [backoff_delay(n, one, cap).total_seconds() for n in range(0, 9)]
    assert delays == [0, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff_delay(10_000, one, cap) == cap  # no overflow, never above the cap
    assert all(backoff_delay(n, one, timedelta(seconds=3)) <= timedelta(seconds=3) for n in range(200))
    assert backoff_delay(3, timedelta(milliseconds=250), cap) == timedelta(seconds=1)


def test_backoff_is_exact_for_sub_second_steps() -> None:
    delays = [backoff_delay(n, timedelta(milliseconds=100), timedelta(seconds=1)) for n in range(1, 7)]
    assert delays == [timedelta(milliseconds=ms) for ms in (100, 200, 400, 800, 1000, 1000)]


def test_backoff_of_a_zero_or_capped_initial_delay() -> None:
    assert backoff_delay(5, timedelta(0), timedelta(seconds=30)) == timedelta(0)
    assert backoff_delay(1, timedelta(minutes=5), timedelta(seconds=30)) == timedelta(seconds=30)
    assert backoff_delay(-1, timedelta(seconds=1), timedelta(seconds=30)) == timedelta(0)
