"""How a serving process uses CPython's cyclic garbage collector: its thresholds, and no collection while a push is written."""

from __future__ import annotations

import asyncio
import gc
from typing import Protocol

# Young-generation collections every 10,000 allocations (CPython's default: 700) and whole-heap
# ones 100x rarer (default 10x). A serving process holds a large, long-lived heap (snapshots,
# thousands of streams) and makes little cyclic garbage, yet with the defaults a mesh update's
# allocations triggered a full collection: ~200 ms with 1,000 streams, in the middle of the push
# (docs/performance.md, convergence).
SERVING_GC_THRESHOLDS = (10_000, 50, 100)
DEFAULT_MAX_PAUSE_SECONDS = 10.0


def tune_gc_for_serving() -> None:
    """Set the collector for a long-running server (`meshca serve`; the benchmarks' server does the same)."""
    gc.set_threshold(*SERVING_GC_THRESHOLDS)


class Collector(Protocol):
    """The part of the `gc` module a CollectorPause switches (the module itself, or a test's recorder)."""

    def isenabled(self) -> bool: ...

    def enable(self) -> None: ...

    def disable(self) -> None: ...


class CollectorPause:
    """Keeps automatic collection off while any hold is open, for at most `max_pause_seconds`.

    The xDS server holds it from the moment a snapshot change wakes an idle stream until that
    stream has handed its response to gRPC: the allocations of a push to 10,000 streams otherwise
    trigger young-generation collections in the middle of it, and the first push after a
    reconnect storm pays a ~0.5 s collection of the storm's survivors (docs/performance.md,
    convergence). The collection runs once the push is out. Lives on one event loop's thread.
    If the collector was already off when the first hold came, it is left alone.
    """

    def __init__(self, max_pause_seconds: float = DEFAULT_MAX_PAUSE_SECONDS, collector: Collector = gc) -> None:
        if max_pause_seconds <= 0:
            raise ValueError(f"max_pause_seconds must be positive, not {max_pause_seconds}")
        self._max_pause = max_pause_seconds
        self._collector = collector
        self._holds = 0
        self._disabled_by_us = False
        self._expiry: asyncio.TimerHandle | None = None
        self.pauses = 0
        self.expired = 0

    @property
    def holds(self) -> int:
        return self._holds

    def hold(self) -> None:
        self._holds += 1
        if self._holds == 1 and self._collector.isenabled():
            self._collector.disable()
            self._disabled_by_us = True
            self.pauses += 1
            self._expiry = asyncio.get_running_loop().call_later(self._max_pause, self._expire)

    def release(self) -> None:
        if self._holds <= 0:
            raise RuntimeError("CollectorPause.release without a hold")
        self._holds -= 1
        if self._holds == 0:
            self._resume()

    def _expire(self) -> None:
        """A hold outlived the bound (a stream slow to take its step): collect again, holds or not."""
        self._expiry = None
        if self._disabled_by_us:
            self.expired += 1
        self._resume()

    def _resume(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._disabled_by_us:
            self._disabled_by_us = False
            self._collector.enable()
