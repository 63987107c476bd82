"""The injectable clock (every module that reads time takes one of these) and how durations are shown."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    """Aware UTC now."""
    return datetime.now(timezone.utc)


def format_duration(duration: timedelta) -> str:
    """A duration for people: '3m10s', '20s', '1h', '2d3h', '1.5s', '250ms' (not '0:03:10.022016')."""
    seconds = duration.total_seconds()
    if seconds < 0:
        return "-" + format_duration(-duration)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms" if seconds else "0s"
    if seconds < 60:
        return f"{round(seconds, 1):g}s"
    rest = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
