"""Snapshot engine: immutable, versioned, consistency-checked sets of encoded xDS resources."""

from __future__ import annotations

import enum
import functools
import hashlib
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from meshca.xds.wire import length_delimited, varint


class ResourceType(enum.Enum):
    """The xDS resource types the engine serves, in make-before-break push order."""

    SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
    ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

    # Members are singletons compared by identity; Enum's own __hash__ is a Python function, and
    # types key the dicts on every hot path (several lookups per stream per push).
    __hash__ = object.__hash__

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
    # A Secret holding a private key (a tls_certificate): known when it is encoded, counted where it is sent
    # (meshca_xds_private_keys_sent), so no response is decoded again to tell.
    private_key: bool = False
    # Delta: `delta_prefix + any_field` is a Resource{name, version, resource=Any} framed as
    # DeltaDiscoveryResponse field 2 (Resource.resource is field 2 too, so any_field is reused as is).
    delta_prefix: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        head = length_delimited(3, self.name.encode()) + length_delimited(1, self.version.encode())
        length = len(head) + len(self.any_field)
        object.__setattr__(self, "delta_prefix", varint(2 << 3 | 2) + varint(length) + head)


def encode_payload(
    resource_type: ResourceType,
    name: str,
    payload: bytes,
    references: Iterable[Reference] = (),
    *,
    private_key: bool = False,
) -> EncodedResource:
    """Wrap a serialized resource once; its version is a hash of the bytes, so equal content means equal version."""
    any_bytes = length_delimited(1, resource_type.type_url.encode()) + length_delimited(2, payload)
    return EncodedResource(
        type=resource_type,
        name=name,
        version=hashlib.sha256(payload).hexdigest()[:16],
        payload=payload,
        any_field=length_delimited(2, any_bytes),
        references=frozenset(references),
        private_key=private_key,
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


def _changed_names(older: Mapping[str, EncodedResource], newer: Mapping[str, EncodedResource]) -> frozenset[str]:
    """Names added, removed or whose version differs between two sets of one type."""
    changed = {
        name for name, resource in newer.items() if (old := older.get(name)) is None or old.version != resource.version
    }
    changed.update(name for name in older if name not in newer)
    return frozenset(changed)


_HISTORY = 8  # versions back a stream can be and still get only what changed (pushes coalesce anyway)


class _Layered(Mapping[str, EncodedResource]):
    """Read-only union of two disjoint name maps (a shared base and one identity's own resources); no copy."""

    __slots__ = ("_base", "_top")

    def __init__(self, base: Mapping[str, EncodedResource], top: Mapping[str, EncodedResource]) -> None:
        self._base = base
        self._top = top

    def __getitem__(self, name: str) -> EncodedResource:
        found = self._top.get(name)
        return self._base[name] if found is None else found

    def __contains__(self, name: object) -> bool:
        return name in self._top or name in self._base

    def __iter__(self) -> Iterator[str]:
        yield from self._base
        yield from self._top

    def __len__(self) -> int:
        return len(self._base) + len(self._top)


@dataclass(frozen=True, slots=True)  # slots: one tracked object per instance, not two (GC cost per push)
class TypeResources:
    """All resources of one type in a snapshot, with a version that changes iff any of them changes.

    `history` names, for each of the last few versions this one replaced, what differs from it, so
    a stream holding one of them looks at only those names instead of every resource.
    """

    resources: Mapping[str, EncodedResource]
    version: str
    history: tuple[tuple[str, frozenset[str]], ...] = field(default=(), repr=False)  # (older version, changed)
    # For a layered set (`layered`): the shared part and the part on top (two fields, not a tuple:
    # one tracked object fewer per composed type).
    base_part: TypeResources | None = field(default=None, repr=False)
    top_part: TypeResources | None = field(default=None, repr=False)

    @classmethod
    def of(cls, resources: Iterable[EncodedResource], previous: TypeResources | None = None) -> TypeResources:
        by_name = {r.name: r for r in resources}
        version = _type_version(by_name)
        if previous is None:
            return cls(MappingProxyType(by_name), version)
        if previous.version == version:
            return previous
        changed = _changed_names(previous.resources, by_name)
        history = ((previous.version, changed),) + tuple(
            (older, older_changes | changed) for older, older_changes in previous.history[: _HISTORY - 1]
        )
        return cls(MappingProxyType(by_name), version, history)

    @classmethod
    def layered(cls, base: TypeResources, top: TypeResources) -> TypeResources:
        """`base` and `top` together (names must be disjoint); the version covers both."""
        if not top.resources:
            return base
        version = f"{base.version}+{top.version}"  # both are content hashes; no need to hash again
        return cls(_Layered(base.resources, top.resources), version, base_part=base, top_part=top)

    def changed_since(self, older: TypeResources) -> frozenset[str] | None:
        """Names that differ from `older`, when that is cheap to know; None means compare everything."""
        if older is self or older.version == self.version:
            return frozenset()
        for version, changed in self.history:
            if version == older.version:
                return changed
        if self.base_part is not None and older.base_part is not None:
            assert self.top_part is not None and older.top_part is not None
            base_changes = self.base_part.changed_since(older.base_part)
            if base_changes is None:
                return None
            new_top, old_top = self.top_part, older.top_part
            top_changes = new_top.changed_since(old_top)
            if top_changes is None:
                top_changes = _changed_names(old_top.resources, new_top.resources)  # one identity's: small
            return base_changes | top_changes
        return None


_EMPTY = TypeResources(MappingProxyType({}), _type_version({}))


_Sources = tuple[tuple[EncodedResource, Reference], ...]


class _Layer:
    """One group of a snapshot's resources whose references are indexed on first use.

    A shared layer is part of every identity's snapshot; indexing it once is what keeps publishing
    an identity O(its own resources).
    """

    def __init__(self, resources: Iterable[EncodedResource], provided: frozenset[Reference] = frozenset()) -> None:
        self.resources = tuple(resources)
        self.provided = provided  # references this layer was allowed to leave to a later layer
        self._index: dict[ResourceType, Mapping[str, _Sources]] = {}

    def references_into(self, target: ResourceType) -> Mapping[str, _Sources]:
        """Referenced names of type `target`, each with the resources referencing it."""
        found = self._index.get(target)
        if found is None:  # a race computes the same value twice; harmless
            index: dict[str, list[tuple[EncodedResource, Reference]]] = {}
            for resource in self.resources:
                for ref in resource.references:
                    if ref.type is target:
                        index.setdefault(ref.name, []).append((resource, ref))
            found = self._index[target] = {name: tuple(sources) for name, sources in index.items()}
        return found

    @functools.cached_property
    def version(self) -> str:
        """A hash of this layer's resources (types, names, versions), independent of their order."""
        entries = sorted(f"{r.type.name}/{r.name}/{r.version}" for r in self.resources)
        return hashlib.sha256(";".join(entries).encode()).hexdigest()[:16]

    def same_resources(self, resources: Sequence[EncodedResource]) -> bool:
        return len(resources) == len(self.resources) and all(a is b for a, b in zip(resources, self.resources))


def _dangling(resource: EncodedResource, ref: Reference) -> str:
    return (
        f"{resource.type.short_name} {resource.name!r} references "
        f"{ref.type.short_name} {ref.name!r}, which does not exist"
    )


def _group(resources: Iterable[EncodedResource]) -> dict[ResourceType, list[EncodedResource]]:
    """By type, refusing a name defined twice within one type."""
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
    return grouped


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise InconsistentSnapshot(problems)


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Snapshot:
    """An immutable, consistent set of resources per type; build it with `Snapshot.build`.

    A snapshot may be layered (`Overlay.compose`): a shared base plus a few resources of its own.
    Each step checks what it changed, so a base shared by every identity is checked once and an
    update that changes a few resources is checked in proportion to them.
    """

    types: Mapping[ResourceType, TypeResources]
    layers: tuple[_Layer, ...] = field(default=(), repr=False)
    base: Snapshot | None = field(default=None, repr=False)  # set by `Overlay.compose`
    _changes_cache: tuple[weakref.ref[Snapshot], dict[ResourceType, frozenset[str]] | None] | None = field(
        default=None, repr=False, compare=False
    )

    @classmethod
    def build(
        cls,
        resources: Iterable[EncodedResource],
        previous: Snapshot | None = None,
        provided: Iterable[Reference] = (),
    ) -> Snapshot:
        """Group resources by type, refuse duplicates and dangling references.

        `previous` (the snapshot this one replaces) lets each type record what changed and limits
        the check to that; `provided` names resources a later layer will supply (e.g. every
        identity's secrets), which references may point to.
        """
        grouped = _group(resources)
        provided = frozenset(provided)
        types = {
            t: TypeResources.of(rs, previous.of_type(t) if previous is not None else None) for t, rs in grouped.items()
        }
        layer = _Layer((r for rs in grouped.values() for r in rs), provided)
        snapshot = cls(MappingProxyType(types), (layer,))
        if previous is None or len(previous.layers) != 1 or previous.layers[0].provided != provided:
            snapshot._check(layer.resources, provided)
            return snapshot
        # Only what changed: the references of new and changed resources, and references of
        # unchanged ones into names that went away.
        previous_layer = previous.layers[0]
        checked: list[EncodedResource] = []
        problems: list[str] = []
        for resource_type, type_resources in types.items():
            changes = type_resources.changed_since(previous.of_type(resource_type))
            assert changes is not None, "TypeResources.of(previous=...) knows its changes"
            for name in changes:
                current = type_resources.resources.get(name)
                if current is not None:
                    checked.append(current)
                    continue
                for source, ref in previous_layer.references_into(resource_type).get(name, ()):
                    still = types[source.type].resources.get(source.name)
                    # a source that changed too was checked above (as itself); one that went away needs nothing
                    if still is not None and still.version == source.version and ref not in provided:
                        problems.append(_dangling(source, ref))
        _raise_if(problems)
        snapshot._check(checked, provided)
        return snapshot

    def changes_since(self, older: Snapshot) -> dict[ResourceType, frozenset[str]] | None:
        """Changed names per type that differs from `older` (None: unknown); remembered for the last
        `older` asked, since every identity's view asks the shared base the same question."""
        cached = self._changes_cache
        if cached is not None and cached[0]() is older:
            return cached[1]
        changes: dict[ResourceType, frozenset[str]] | None = {}
        for resource_type, type_resources in self.types.items():
            old = older.of_type(resource_type)
            if type_resources is old:
                continue
            changed = type_resources.changed_since(old)
            if changed is None:
                changes = None
                break
            changes[resource_type] = changed  # type: ignore[index]
        object.__setattr__(self, "_changes_cache", (weakref.ref(older), changes))  # no chain of old bases
        return changes

    def fill_provided(self, resource_type: ResourceType, resources: TypeResources) -> Snapshot:
        """Supply a type this snapshot's layers left to a later layer (their `provided`), e.g. an
        identity's secrets. Every reference into the type was checked against those promised names
        (the type is empty here), so only the promises are checked: O(promised names), not O(layers).
        """
        if self.of_type(resource_type).resources:
            raise ValueError(f"{resource_type.short_name} is not empty here")
        _raise_if(
            [
                f"{ref.type.short_name} {ref.name!r} was promised to this snapshot's resources but is missing"
                for layer in self.layers
                for ref in layer.provided
                if ref.type is resource_type and ref.name not in resources.resources
            ]
        )
        types = dict(self.types)
        types[resource_type] = resources
        layers = self.layers
        if any(resource.references for resource in resources.resources.values()):
            layers = (*layers, _Layer(resources.resources.values()))
        snapshot = Snapshot(MappingProxyType(types), layers, self.base)
        snapshot._check(resources.resources.values(), frozenset())
        return snapshot

    def _check(self, resources: Iterable[EncodedResource], provided: frozenset[Reference]) -> None:
        _raise_if(
            [
                _dangling(resource, ref)
                for resource in resources
                for ref in sorted(resource.references, key=lambda r: (r.type.value, r.name))
                if ref not in provided and ref.name not in self.of_type(ref.type).resources
            ]
        )

    def of_type(self, resource_type: ResourceType) -> TypeResources:
        return self.types.get(resource_type, _EMPTY)

    def version(self, resource_type: ResourceType) -> str:
        return self.of_type(resource_type).version


@dataclass(frozen=True, eq=False)
class Overlay:
    """Resources layered on a shared base (one identity's own), checked against it and composed with
    it on demand: a base change re-checks an unchanged overlay only where the base changed, and
    composes nothing until a stream reads the result."""

    types: Mapping[ResourceType, TypeResources]  # only the types it has resources of
    layer: _Layer

    @classmethod
    def on(cls, base: Snapshot, resources: Iterable[EncodedResource], provided: frozenset[Reference]) -> Overlay:
        """Check every resource against `base` (plus `provided`); names must not repeat the base's."""
        resources = tuple(resources)
        grouped = _group(resources)
        _raise_if(
            [
                f"{r.type.short_name} resource {r.name!r} is defined twice"
                for rs in grouped.values()
                for r in rs
                if r.name in base.of_type(r.type).resources
            ]
        )
        overlay = cls(
            MappingProxyType({t: TypeResources.of(rs) for t, rs in grouped.items() if rs}), _Layer(resources, provided)
        )
        overlay.compose(base)._check(resources, provided)
        return overlay

    def holds(self, resources: Sequence[EncodedResource], provided: frozenset[Reference]) -> bool:
        """Whether this overlay was made from exactly these resource objects and promises."""
        same_promises = self.layer.provided is provided or self.layer.provided == provided
        return same_promises and self.layer.same_resources(resources)

    def recheck(self, base: Snapshot, checked_base: Snapshot) -> bool:
        """Check this overlay, known good on `checked_base`, on `base` by what changed between them:
        names the base now defines too, names it dropped that this overlay references. False when
        what changed is unknown (check it again with `on`)."""
        changes = base.changes_since(checked_base)
        if changes is None:
            return False
        problems: list[str] = []
        for resource_type, names in changes.items():
            base_resources = base.of_type(resource_type).resources
            own = self.types.get(resource_type, _EMPTY).resources
            sources = self.layer.references_into(resource_type)
            for name in names:
                if name in base_resources:
                    if name in own:
                        problems.append(f"{resource_type.short_name} resource {name!r} is defined twice")
                elif name not in own:
                    problems.extend(
                        _dangling(source, ref) for source, ref in sources.get(name, ()) if ref not in self.layer.provided
                    )
        _raise_if(problems)
        return True

    @property
    def version(self) -> str:
        return self.layer.version

    def compose(self, base: Snapshot) -> Snapshot:
        """The base with this overlay on top (no check: `on` and `recheck` did it)."""
        types = dict(base.types)
        for resource_type, own in self.types.items():
            types[resource_type] = TypeResources.layered(base.of_type(resource_type), own)
        return Snapshot(MappingProxyType(types), (*base.layers, self.layer), base)
