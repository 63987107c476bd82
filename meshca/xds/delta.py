"""Delta (incremental) xDS protocol state machine: pure, no I/O, one instance per stream."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshca.xds.protocol import WILDCARD, Ack, Nack, Outcome, Request
from meshca.xds.snapshot import (
    FULL_STATE_TYPES,
    PUSH_ORDER,
    EncodedResource,
    ResourceType,
    Snapshot,
    TypeResources,
)

# Break order for removals: what refers to a resource goes before it (a listener before its route
# configuration, a route before its clusters, a cluster before its endpoints and secrets).
REMOVAL_ORDER: tuple[ResourceType, ...] = (
    ResourceType.LISTENER,
    ResourceType.ROUTE,
    ResourceType.CLUSTER,
    ResourceType.ENDPOINT,
    ResourceType.SECRET,
)

# Envoy warms a changed Cluster until it receives its ClusterLoadAssignment again (it neither
# re-requests it nor uses the one it holds before initial_fetch_timeout): sending a Cluster makes
# the CLAs it references due again, unchanged or not.
_WARMS_WITH: Mapping[ResourceType, ResourceType] = MappingProxyType({ResourceType.CLUSTER: ResourceType.ENDPOINT})


@dataclass(frozen=True)
class DeltaRequest(Request):
    """The protocol-relevant part of a DeltaDiscoveryRequest."""

    type: ResourceType
    subscribe: tuple[str, ...] = ()
    unsubscribe: tuple[str, ...] = ()
    initial_versions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    response_nonce: str = ""
    error_code: int | None = None
    error_message: str = ""


@dataclass(frozen=True)
class DeltaResponse:
    """Resources added or changed, or names removed (never both), for one type; `version` is for debugging."""

    type: ResourceType
    version: str
    resources: tuple[EncodedResource, ...]
    removed: tuple[str, ...]
    nonce: str


DeltaOutcome = Outcome[DeltaResponse]


@dataclass
class _TypeState:
    wildcard: bool = False
    legacy_wildcard: bool = False  # wildcard by an empty first request; ends at the first explicit name
    names: set[str] = field(default_factory=set)
    # name -> version the client holds, or was sent and rejected: either way not sent again
    known: dict[str, str] = field(default_factory=dict)
    last_nonce: str | None = None
    awaiting_ack: bool = False
    sent_version: str | None = None
    acked_version: str = ""
    answer_first: bool = False
    in_sync_at: str | None = None  # type version at which nothing was left to send
    in_sync_with: TypeResources | None = None  # ...and that version's resources (to ask what changed since)


@dataclass(frozen=True)
class _Diff:
    updates: tuple[EncodedResource, ...]
    removed: tuple[str, ...]


class DeltaStream:
    """Decides, for one delta stream, what to send in answer to requests and to new snapshots.

    Rules (Envoy's xds_protocol, incremental variant):
    - per-resource versions: a resource is sent only when the client does not hold that version
      (`initial_resource_versions` seeds what it holds on a reconnect);
    - subscriptions: `*` is wildcard, and for LDS/CDS a first request without names is the legacy
      wildcard until the client names a resource; names subscribed before they exist are sent when
      they appear; an unsubscribed name is forgotten without a response (in wildcard mode it is
      sent again, as the protocol asks);
    - nonces are per stream; a request with a stale nonce still changes subscriptions but is
      neither an ACK nor a NACK;
    - a NACK is recorded and the rejected versions are not sent again until they change;
    - at most one unacknowledged response per type; what changed meanwhile follows the ACK;
    - a response carries updates or removals, never both: updates go out in make-before-break
      order (PUSH_ORDER), removals after them in REMOVAL_ORDER;
    - the first wildcard request of a type is always answered, if need be with an empty response;
    - a Cluster sent makes its ClusterLoadAssignment due again (Envoy warms the cluster until it
      gets one), even if the client holds that version.
    """

    def __init__(self, allowed_types: Iterable[ResourceType], nonce_factory: Callable[[], str]) -> None:
        self._allowed = frozenset(allowed_types)
        self._next_nonce = nonce_factory
        self._types: dict[ResourceType, _TypeState] = {}
        # per type, names sent again even at the version the client holds
        self._due: dict[ResourceType, set[str]] = {t: set() for t in _WARMS_WITH.values()}

    def on_request(self, request: DeltaRequest, snapshot: Snapshot | None) -> DeltaOutcome:
        if request.type not in self._allowed:
            raise ValueError(f"type {request.type.type_url} is not served on this stream")
        state = self._types.get(request.type)
        if state is None:
            state = self._types[request.type] = _TypeState(known=dict(request.initial_versions))
            state.legacy_wildcard = state.wildcard = request.type in FULL_STATE_TYPES and not request.subscribe
            self._update_subscriptions(state, request)
            state.answer_first = state.wildcard
        else:
            self._update_subscriptions(state, request)

        ack = nack = None
        stale = False
        if request.response_nonce:
            if request.response_nonce != state.last_nonce:
                stale = True  # subscription changes above still apply
            else:
                state.awaiting_ack = False
                if request.is_nack:
                    state.in_sync_at = None
                    nack = Nack(
                        request.type,
                        state.sent_version,
                        state.acked_version,
                        request.error_code or 0,
                        request.error_message,
                    )
                else:
                    state.acked_version = state.sent_version or ""
                    ack = Ack(request.type, state.acked_version)
        responses = [self._respond(request.type, state, snapshot, updates=True, removals=True)]
        warming = _WARMS_WITH.get(request.type)
        warming_state = self._types.get(warming) if warming is not None else None
        if warming is not None and warming_state is not None and responses[0] is not None:
            responses.append(self._respond(warming, warming_state, snapshot, updates=True, removals=False))
        return Outcome(responses=tuple(r for r in responses if r), ack=ack, nack=nack, stale=stale)

    def on_snapshot(self, snapshot: Snapshot) -> DeltaOutcome:
        responses: list[DeltaResponse] = []
        for order, updates in ((PUSH_ORDER, True), (REMOVAL_ORDER, False)):
            for resource_type in order:
                state = self._types.get(resource_type)
                if state is not None:
                    response = self._respond(resource_type, state, snapshot, updates=updates, removals=not updates)
                    if response is not None:
                        responses.append(response)
        return Outcome(responses=tuple(responses))

    @staticmethod
    def _update_subscriptions(state: _TypeState, request: DeltaRequest) -> None:
        subscribe = set(request.subscribe)
        unsubscribe = set(request.unsubscribe)
        if not (subscribe or unsubscribe):
            return
        state.in_sync_at = None
        if subscribe and state.legacy_wildcard:
            state.legacy_wildcard = False
            state.wildcard = False
        if WILDCARD in subscribe:
            state.wildcard = True
        state.names |= subscribe - {WILDCARD}
        for name in unsubscribe - {WILDCARD}:
            state.names.discard(name)
            state.known.pop(name, None)  # the client drops it; in wildcard mode it is sent again
        if WILDCARD in unsubscribe:
            state.wildcard = False
        if not state.wildcard:
            # resources held only through the wildcard are dropped by the client
            for name in [n for n in state.known if n not in state.names]:
                del state.known[name]

    @staticmethod
    def _diff_changed(
        state: _TypeState, available: Mapping[str, EncodedResource], changed: frozenset[str], due: set[str]
    ) -> _Diff:
        """The diff of a stream that was in sync, from the names that changed since (not every name)."""
        wanted = sorted(n for n in changed if n in available and (state.wildcard or n in state.names))
        updates = tuple(available[n] for n in wanted if state.known.get(n) != available[n].version or n in due)
        removed = tuple(sorted(n for n in changed if n in state.known and n not in available))
        return _Diff(updates, removed)

    @staticmethod
    def _diff(state: _TypeState, available: Mapping[str, EncodedResource], due: set[str]) -> _Diff:
        if state.wildcard:
            wanted: Iterable[str] = available  # the snapshot's own (deterministic) order
        else:
            wanted = sorted(n for n in state.names if n in available)
        updates = tuple(
            available[n] for n in wanted if state.known.get(n) != available[n].version or n in due
        )
        removed = tuple(sorted(n for n in state.known if n not in available))
        return _Diff(updates, removed)

    def _make_due(self, resource_type: ResourceType, sent: tuple[EncodedResource, ...]) -> None:
        warming = _WARMS_WITH.get(resource_type)
        if warming is None or not sent:
            return
        self._due[warming].update(ref.name for res in sent for ref in res.references if ref.type is warming)
        warming_state = self._types.get(warming)
        if warming_state is not None:
            warming_state.in_sync_at = None

    def _respond(
        self,
        resource_type: ResourceType,
        state: _TypeState,
        snapshot: Snapshot | None,
        *,
        updates: bool,
        removals: bool,
    ) -> DeltaResponse | None:
        if snapshot is None or state.awaiting_ack:
            return None
        type_resources = snapshot.of_type(resource_type)
        if state.in_sync_at == type_resources.version and not state.answer_first:
            return None
        due = self._due.get(resource_type, set())
        changed = None
        synced = state.in_sync_with
        # In sync at an older version: what a full diff would find is among the names changed since.
        # (Names still due then were not wanted, and wanting others would have ended the sync.)
        if synced is not None and state.in_sync_at == synced.version and not state.answer_first:
            changed = type_resources.changed_since(synced)
        if changed is not None:
            diff = self._diff_changed(state, type_resources.resources, changed, due)
        else:
            diff = self._diff(state, type_resources.resources, due)
        if diff.updates:
            if not updates:
                return None
            resources, removed = diff.updates, ()
        elif diff.removed:
            if not removals:
                return None
            resources, removed = (), diff.removed
        elif state.answer_first:
            resources, removed = (), ()
        else:
            state.in_sync_at, state.in_sync_with = type_resources.version, type_resources
            return None
        for resource in resources:
            state.known[resource.name] = resource.version
            due.discard(resource.name)
        self._make_due(resource_type, resources)
        for name in removed:
            del state.known[name]
        # in sync once this response carries all that was left (removals wait for the next one)
        in_sync = not (resources and diff.removed)
        state.in_sync_at = type_resources.version if in_sync else None
        state.in_sync_with = type_resources if in_sync else None
        nonce = self._next_nonce()
        state.last_nonce = nonce
        state.awaiting_ack = True
        state.answer_first = False
        state.sent_version = type_resources.version
        return DeltaResponse(resource_type, type_resources.version, resources, removed, nonce)
