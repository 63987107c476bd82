"""The watch cache: the latest snapshot per node-group key, and the streams to wake when it changes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshca.xds.snapshot import Snapshot


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_Watcher = tuple[asyncio.AbstractEventLoop, Callable[[], object]]


class SnapshotCache:
    """Holds the latest snapshot per node-group key and wakes the streams watching that key.

    `set_snapshot` may be called from any thread; watchers live on asyncio loops.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # A snapshot, or how to compose it (cannot fail: checked when it was published) on first read.
        self._snapshots: dict[str, Snapshot | Callable[[], Snapshot]] = {}
        self._watchers: dict[str, set[_Watcher]] = {}

    def set_snapshot(self, key: str, snapshot: Snapshot | Callable[[], Snapshot]) -> None:
        self.set_snapshots([(key, snapshot)])

    def set_snapshots(self, entries: Iterable[tuple[str, Snapshot | Callable[[], Snapshot]]]) -> None:
        """Publish several keys at once (one lock), then wake their watchers."""
        watchers: list[_Watcher] = []
        with self._lock:
            for key, snapshot in entries:
                self._snapshots[key] = snapshot
                watchers.extend(self._watchers.get(key, ()))
        if not watchers:
            return
        running = _running_loop()
        for loop, notify in watchers:
            if loop is running:
                loop.call_soon(notify)  # on the loop's own thread: no wake-up pipe write per watcher
            elif not loop.is_closed():
                loop.call_soon_threadsafe(notify)

    def get(self, key: str) -> Snapshot | None:
        with self._lock:
            entry = self._snapshots.get(key)
        if entry is None or isinstance(entry, Snapshot):
            return entry
        snapshot = entry()
        with self._lock:
            if self._snapshots.get(key) is entry:
                self._snapshots[key] = snapshot
        return snapshot

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._snapshots)

    def remove(self, key: str) -> bool:
        """Drop the key's snapshot (its node group is gone); streams still watching it keep what they have."""
        with self._lock:
            return self._snapshots.pop(key, None) is not None

    def watch(self, key: str, on_change: Callable[[], object] | None = None) -> SnapshotWatch:
        """Call `on_change` (default: set the watch's event) on the caller's loop whenever `key` gets a
        new snapshot; close the watch when done."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), on_change if on_change is not None else event.set)
        with self._lock:
            self._watchers.setdefault(key, set()).add(entry)
        return SnapshotWatch(self, key, entry, event)

    def _unwatch(self, key: str, entry: _Watcher) -> None:
        with self._lock:
            watchers = self._watchers.get(key)
            if watchers is not None:
                watchers.discard(entry)
                if not watchers:
                    del self._watchers[key]

    def watcher_count(self, key: str) -> int:
        with self._lock:
            return len(self._watchers.get(key, ()))


@dataclass(frozen=True)
class SnapshotWatch:
    """A registration on one key of a `SnapshotCache`."""

    cache: SnapshotCache
    key: str
    _entry: _Watcher
    event: asyncio.Event  # set on change unless the watch was given its own callback

    def close(self) -> None:
        self.cache._unwatch(self.key, self._entry)
