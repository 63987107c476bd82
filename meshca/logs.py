"""Structured logging: one JSON object per line on stderr; client text and repeated records kept bounded."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str) -> logging.Logger:
    """Log JSON lines at `level`. Info shows events, not ticks: apscheduler's lines about every job run
    (two a second for the CA check) only show at debug."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    debug = logging.getLevelName(level.upper()) == logging.DEBUG
    logging.getLogger("apscheduler").setLevel(logging.NOTSET if debug else logging.WARNING)
    # the store logs etcd going away and coming back once; etcd3aio's watch warns at every reconnect attempt
    logging.getLogger("etcd3aio").setLevel(logging.NOTSET if debug else logging.ERROR)
    return logging.getLogger("meshca")


CLIENT_TEXT_LIMIT = 200


def client_text(value: object, limit: int = CLIENT_TEXT_LIMIT) -> str:
    """Text a client sent (node id, NACK message, peer), fit for one log line: control characters,
    newlines and backslashes escaped as repr does, at most `limit` characters kept and the full size
    noted when cut. Cut before escaping: a 1 MB value costs no more than a short one."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)[1:-1]
    size = len(text.encode("utf-8", "surrogatepass"))
    return f"{repr(text[:limit])[1:-1]}…({size} bytes)"


@dataclass
class _Burst:
    started: float
    level: int
    repeats: int = 0
    timer: asyncio.TimerHandle | None = None


class RepeatLimiter:
    """Logs the first record of a kind, then only counts that kind's repeats for `window` seconds and
    logs their number when the window ends ("<kind>: 57 more like it in the last 10 s"): a client
    refused many times a second costs two lines per window, not one per refusal.

    The count is logged by a timer on the running event loop (or, without one, with the kind's next
    record). At most `max_kinds` kinds are tracked; beyond, records are counted under one overflow kind.
    """

    OVERFLOW = "log records of other kinds (too many kinds to tell apart)"

    def __init__(
        self,
        logger: logging.Logger,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 256,
    ) -> None:
        self._log = logger
        self._window = window
        self._clock = clock
        self._max_kinds = max_kinds
        self._bursts: dict[str, _Burst] = {}

    def log(self, level: int, kind: str, msg: str, *args: object, **kwargs: Any) -> None:
        """Log `msg % args` unless a record of `kind` was logged less than `window` seconds ago."""
        now = self._clock()
        burst = self._bursts.get(kind)
        if burst is not None and now - burst.started >= self._window:
            self._flush(kind)
            burst = None
        if burst is None and len(self._bursts) >= self._max_kinds:
            self._expire(now)
            if len(self._bursts) >= self._max_kinds:
                kind = self.OVERFLOW
                burst = self._bursts.get(kind)
                if burst is None:
                    self._bursts[kind] = burst = _Burst(now, level)
                    self._schedule(kind, burst)
                burst.repeats += 1
                return
        if burst is not None:
            burst.repeats += 1
            if burst.timer is None:
                self._schedule(kind, burst)
            return
        self._bursts[kind] = _Burst(now, level)
        self._log.log(level, msg, *args, **kwargs)

    def flush(self) -> None:
        """Log every pending count now (e.g. at shutdown)."""
        for kind in list(self._bursts):
            self._flush(kind)

    def _schedule(self, kind: str, burst: _Burst) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        delay = max(0.0, burst.started + self._window - self._clock())
        burst.timer = loop.call_later(delay, self._flush, kind)

    def _expire(self, now: float) -> None:
        for kind, burst in list(self._bursts.items()):
            if now - burst.started >= self._window:
                self._flush(kind)

    def _flush(self, kind: str) -> None:
        burst = self._bursts.pop(kind, None)
        if burst is None:
            return
        if burst.timer is not None:
            burst.timer.cancel()
        if burst.repeats:
            self._log.log(burst.level, "%s: %d more like it in the last %g s", kind, burst.repeats, self._window)
