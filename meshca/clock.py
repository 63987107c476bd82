"""The injectable clock (every module that reads time takes one of these) and how durations are shown."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    """Aware UTC now."""
    return datetime.now(timezone.utc)


def format_duration(value: timedelta) -> str:
    """A duration the way settings write it: '5m', '1h30m', '90d', '2.5s', '500ms' (not '0:05:00')."""
    if value < timedelta(0):
        return "-" + format_duration(-value)
    if timedelta(0) < value < timedelta(seconds=1):
        return f"{value.total_seconds() * 1000:.6g}ms"
    days, rest = value.days, value.seconds
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    fraction = seconds + value.microseconds / 1e6
    if fraction or not parts:
        parts.append(f"{round(fraction, 3):g}s")
    return "".join(parts)
