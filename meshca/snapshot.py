"""Snapshot engine: immutable, versioned, consistency-checked sets of encoded xDS resources."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import betterproto2


class ResourceType(enum.Enum):
    """The xDS resource types the engine serves, in make-before-break push order."""

    SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
    ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

    @property
    def type_url(self) -> str:
        return self.value

    @property
    def short_name(self) -> str:
        return _SHORT_NAMES[self]

    @classmethod
    def from_type_url(cls, type_url: str) -> ResourceType | None:
        try:
            return cls(type_url)
        except ValueError:
            return None


_SHORT_NAMES = {
    ResourceType.SECRET: "SDS",
    ResourceType.CLUSTER: "CDS",
    ResourceType.ENDPOINT: "EDS",
    ResourceType.LISTENER: "LDS",
    ResourceType.ROUTE: "RDS",
}

# Envoy asks for SotW LDS and CDS as full state; the other types are named explicitly.
FULL_STATE_TYPES = frozenset({ResourceType.CLUSTER, ResourceType.LISTENER})

# Make-before-break: secrets before the clusters and listeners that need them, clusters before
# their endpoints, listeners before their routes.
PUSH_ORDER: tuple[ResourceType, ...] = (
    ResourceType.SECRET,
    ResourceType.CLUSTER,
    ResourceType.ENDPOINT,
    ResourceType.LISTENER,
    ResourceType.ROUTE,
)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One protobuf length-delimited field (wire type 2)."""
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


@dataclass(frozen=True)
class Reference:
    """A by-name dependency of one resource on another (EDS, RDS or SDS)."""

    type: ResourceType
    name: str


@dataclass(frozen=True, eq=False)
class EncodedResource:
    """A resource encoded exactly once; its bytes are shared by every stream that receives it."""

    type: ResourceType
    name: str
    version: str
    payload: bytes = field(repr=False)
    any_field: bytes = field(repr=False)  # google.protobuf.Any, framed as DiscoveryResponse field 2
    references: frozenset[Reference] = frozenset()
    # Delta: `delta_prefix + any_field` is a Resource{name, version, resource=Any} framed as
    # DeltaDiscoveryResponse field 2 (Resource.resource is field 2 too, so any_field is reused as is).
    delta_prefix: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        head = length_delimited(3, self.name.encode()) + length_delimited(1, self.version.encode())
        length = len(head) + len(self.any_field)
        object.__setattr__(self, "delta_prefix", _varint(2 << 3 | 2) + _varint(length) + head)


def encode_resource(
    resource_type: ResourceType,
    name: str,
    message: betterproto2.Message,
    references: Iterable[Reference] = (),
) -> EncodedResource:
    """Serialize `message` once; its version is a hash of the bytes, so equal content means equal version."""
    return encode_payload(resource_type, name, bytes(message), references)


def encode_payload(
    resource_type: ResourceType,
    name: str,
    payload: bytes,
    references: Iterable[Reference] = (),
) -> EncodedResource:
    """Wrap an already serialized resource (e.g. from a faster encoder) exactly as `encode_resource` does."""
    any_bytes = length_delimited(1, resource_type.type_url.encode()) + length_delimited(2, payload)
    return EncodedResource(
        type=resource_type,
        name=name,
        version=hashlib.sha256(payload).hexdigest()[:16],
        payload=payload,
        any_field=length_delimited(2, any_bytes),
        references=frozenset(references),
    )


class InconsistentSnapshot(ValueError):
    """A snapshot references names it does not contain; the message lists every dangling reference."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("inconsistent snapshot: " + "; ".join(problems))


def _type_version(resources: Mapping[str, EncodedResource]) -> str:
    digest = hashlib.sha256()
    for name in sorted(resources):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(resources[name].version.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TypeResources:
    """All resources of one type in a snapshot, with a version that changes iff any of them changes."""

    resources: Mapping[str, EncodedResource]
    version: str

    @classmethod
    def of(cls, resources: Iterable[EncodedResource]) -> TypeResources:
        by_name = {r.name: r for r in resources}
        return cls(MappingProxyType(by_name), _type_version(by_name))


_EMPTY = TypeResources(MappingProxyType({}), _type_version({}))


@dataclass(frozen=True)
class Snapshot:
    """An immutable, consistent set of resources per type; build it with `Snapshot.build`."""

    types: Mapping[ResourceType, TypeResources]

    @classmethod
    def build(cls, resources: Iterable[EncodedResource]) -> Snapshot:
        """Group resources by type, refuse duplicates and dangling references."""
        grouped: dict[ResourceType, list[EncodedResource]] = {t: [] for t in ResourceType}
        seen: set[tuple[ResourceType, str]] = set()
        duplicates: list[str] = []
        for resource in resources:
            key = (resource.type, resource.name)
            if key in seen:
                duplicates.append(f"{resource.type.short_name} resource {resource.name!r} is defined twice")
            seen.add(key)
            grouped[resource.type].append(resource)
        if duplicates:
            raise InconsistentSnapshot(duplicates)
        snapshot = cls(MappingProxyType({t: TypeResources.of(rs) for t, rs in grouped.items()}))
        snapshot.check_consistency()
        return snapshot

    def with_type(self, resource_type: ResourceType, resources: TypeResources) -> Snapshot:
        """A new snapshot sharing every other type's resources (no re-encoding, no copy) and checked again."""
        types = dict(self.types)
        types[resource_type] = resources
        snapshot = Snapshot(MappingProxyType(types))
        snapshot.check_consistency()
        return snapshot

    def check_consistency(self) -> None:
        problems = []
        for type_resources in self.types.values():
            for resource in type_resources.resources.values():
                for ref in sorted(resource.references, key=lambda r: (r.type.value, r.name)):
                    if ref.name not in self.of_type(ref.type).resources:
                        problems.append(
                            f"{resource.type.short_name} {resource.name!r} references "
                            f"{ref.type.short_name} {ref.name!r}, which does not exist"
                        )
        if problems:
            raise InconsistentSnapshot(problems)

    def of_type(self, resource_type: ResourceType) -> TypeResources:
        return self.types.get(resource_type, _EMPTY)

    def version(self, resource_type: ResourceType) -> str:
        return self.of_type(resource_type).version


class SnapshotCache:
    """Holds the latest snapshot per node-group key and wakes the streams watching that key.

    `set_snapshot` may be called from any thread; watchers live on asyncio loops.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def set_snapshot(self, key: str, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshots[key] = snapshot
            watchers = list(self._watchers.get(key, ()))
        for loop, event in watchers:
            if loop.is_closed():
                continue
            loop.call_soon_threadsafe(event.set)

    def get(self, key: str) -> Snapshot | None:
        with self._lock:
            return self._snapshots.get(key)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._snapshots)

    def watch(self, key: str) -> SnapshotWatch:
        """Register an event that is set whenever `key` gets a new snapshot; close it when done."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            self._watchers.setdefault(key, set()).add(entry)
        return SnapshotWatch(self, key, entry)

    def _unwatch(self, key: str, entry: tuple[asyncio.AbstractEventLoop, asyncio.Event]) -> None:
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
    _entry: tuple[asyncio.AbstractEventLoop, asyncio.Event]

    @property
    def event(self) -> asyncio.Event:
        return self._entry[1]

    def close(self) -> None:
        self.cache._unwatch(self.key, self._entry)
