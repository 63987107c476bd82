"""What each connected proxy has ACKed and NACKed: the data behind `meshca status` and metrics."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType

from meshca.clock import Clock
from meshca.xds.snapshot import ResourceType


@dataclass(frozen=True)
class NackRecord:
    type: ResourceType
    rejected_version: str | None
    message: str
    at: datetime


@dataclass(frozen=True)
class ProxyStatus:
    """One stream's view: who it is and what it accepted per type."""

    stream_id: int
    node_id: str
    identity: str
    snapshot_key: str
    connected_at: datetime
    acked: dict[ResourceType, str] = field(default_factory=dict)
    sent: dict[ResourceType, str] = field(default_factory=dict)
    last_nack: NackRecord | None = None
    nacks: int = 0


@dataclass(frozen=True)
class RegistryTotals:
    """Lifetime counts per type over every stream, closed ones included (for counters)."""

    pushes: Mapping[ResourceType, int]
    nacks: Mapping[ResourceType, int]
    send_timeouts: int = 0  # streams closed because the proxy stopped reading responses
    private_keys_sent: int = 0  # Secret resources holding a private key in responses written (agent mode: none)


class _StreamRecord:
    """A stream's status as the registry updates it in place (every push and ACK): no new objects
    per update, which at thousands of streams is garbage-collector work; read as ProxyStatus."""

    __slots__ = ("status", "acked", "sent", "last_nack", "nacks")

    def __init__(self, status: ProxyStatus) -> None:
        self.status = status
        self.acked: dict[ResourceType, str] = {}
        self.sent: dict[ResourceType, str] = {}
        self.last_nack: NackRecord | None = None
        self.nacks = 0

    def view(self) -> ProxyStatus:
        return replace(self.status, acked=dict(self.acked), sent=dict(self.sent), last_nack=self.last_nack, nacks=self.nacks)


class ProxyRegistry:
    """Thread-safe registry of live streams; values handed out are immutable copies."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._streams: dict[int, _StreamRecord] = {}
        self._pushes: dict[ResourceType, int] = dict.fromkeys(ResourceType, 0)
        self._nacks: dict[ResourceType, int] = dict.fromkeys(ResourceType, 0)
        self._send_timeouts = 0
        self._private_keys_sent = 0
        self._changes = 0  # moves on every change a status reader could see

    def changes(self) -> int:
        """A counter that moves whenever the streams' status may have changed (the store's registry summary
        is not rebuilt while it stands still)."""
        return self._changes

    def open(self, node_id: str, identity: str, snapshot_key: str) -> int:
        with self._lock:
            self._changes += 1
            stream_id = next(self._ids)
            self._streams[stream_id] = _StreamRecord(
                ProxyStatus(stream_id, node_id, identity, snapshot_key, self._clock())
            )
            return stream_id

    def close(self, stream_id: int) -> None:
        with self._lock:
            self._changes += 1
            self._streams.pop(stream_id, None)

    def record_send_timeout(self) -> None:
        with self._lock:
            self._send_timeouts += 1

    def record_sent(self, stream_id: int, resource_type: ResourceType, version: str, private_keys: int = 0) -> None:
        """A response was written; `private_keys`: how many of its resources held a private key."""
        with self._lock:
            self._pushes[resource_type] += 1
            self._private_keys_sent += private_keys
            self._changes += 1
            record = self._streams.get(stream_id)
            if record is not None:
                record.sent[resource_type] = version

    def record_ack(self, stream_id: int, resource_type: ResourceType, version: str) -> None:
        with self._lock:
            self._changes += 1
            record = self._streams.get(stream_id)
            if record is not None:
                record.acked[resource_type] = version

    def record_nack(
        self, stream_id: int, resource_type: ResourceType, rejected_version: str | None, message: str
    ) -> None:
        with self._lock:
            self._nacks[resource_type] += 1
            self._changes += 1
            record = self._streams.get(stream_id)
            if record is not None:
                record.last_nack = NackRecord(resource_type, rejected_version, message, self._clock())
                record.nacks += 1

    def snapshot(self) -> list[ProxyStatus]:
        with self._lock:
            return [record.view() for record in self._streams.values()]

    def totals(self) -> RegistryTotals:
        """Responses sent and NACKs received per type, send timeouts and private keys sent, since start, surviving
        stream close."""
        with self._lock:
            return RegistryTotals(
                MappingProxyType(dict(self._pushes)),
                MappingProxyType(dict(self._nacks)),
                self._send_timeouts,
                self._private_keys_sent,
            )
