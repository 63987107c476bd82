"""State-of-the-world xDS protocol state machine: pure, no I/O, one instance per stream."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshca.xds.protocol import WILDCARD, Ack, Nack, Outcome, Request
from meshca.xds.snapshot import (
    FULL_STATE_TYPES,
    PUSH_ORDER,
    EncodedResource,
    ResourceType,
    Snapshot,
    TypeResources,
)


@dataclass(frozen=True)
class XdsRequest(Request):
    """The protocol-relevant part of a DiscoveryRequest."""

    type: ResourceType
    version_info: str = ""
    resource_names: Sequence[str] = ()
    response_nonce: str = ""
    error_code: int | None = None
    error_message: str = ""
    names_key: bytes | None = None  # the names in canonical wire form, when decoded from the wire


@dataclass(frozen=True)
class XdsResponse:
    type: ResourceType
    version: str
    resources: tuple[EncodedResource, ...]
    nonce: str


@dataclass
class _TypeState:
    wildcard: bool = False
    requested: Sequence[str] | bytes = ()  # the last request's names_key (or its names when it had none)
    names: frozenset[str] = frozenset()
    last_nonce: str | None = None
    acked_nonce: str | None = None
    awaiting_ack: bool = False
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    nacked_version: str | None = None
    nacked_names: frozenset[str] | None = None
    # What the client holds of a named type after the last response or skip: lets a push send only
    # the subscribed resources that changed since (None after a NACK: send everything again).
    synced_from: TypeResources | None = None
    synced_names: frozenset[str] | None = None


class SotwStream:
    """Decides, for one stream, what to send in answer to requests and to new snapshots.

    Rules (Envoy's xds_protocol): per-stream nonces; a request whose nonce is not the last one sent
    is stale and ignored; a NACK is recorded and the rejected version is not sent again; at most one
    unacknowledged response per type; names requested before they exist are sent when they appear;
    `*` (and the legacy empty first request for LDS/CDS) means wildcard; a request repeating a nonce
    that was already ACKed (Envoy re-requests EDS while a changed cluster warms) is answered.
    """

    def __init__(self, allowed_types: Iterable[ResourceType], nonce_factory: Callable[[], str]) -> None:
        self._allowed = frozenset(allowed_types)
        self._next_nonce = nonce_factory
        self._types: dict[ResourceType, _TypeState] = {}

    def on_request(self, request: XdsRequest, snapshot: Snapshot | None) -> Outcome[XdsResponse]:
        if request.type not in self._allowed:
            raise ValueError(f"type {request.type.type_url} is not served on this stream")
        state = self._types.get(request.type)
        first = state is None
        if state is None:
            state = self._types[request.type] = _TypeState()
        if not first and request.response_nonce != (state.last_nonce or ""):
            return Outcome(stale=True)

        requested = request.names_key if request.names_key is not None else tuple(request.resource_names)
        if first or requested != state.requested:  # every ACK repeats them: skip the set work
            state.requested = requested
            names = frozenset(request.resource_names)
            state.wildcard = WILDCARD in names or (
                request.type in FULL_STATE_TYPES and not names and (first or state.wildcard)
            )
            names -= {WILDCARD}
            if names != state.names:  # keep the held object when equal: `_changed_only` compares by identity
                state.names = names

        ack = nack = None
        force = first  # a new stream (or a type's first request) is always answered
        if request.response_nonce and not first:
            state.awaiting_ack = False
            if request.is_nack:
                state.nacked_version = state.sent_version
                state.nacked_names = state.sent_names
                state.synced_from = None  # it kept what it had before: the next response carries everything
                nack = Nack(
                    request.type,
                    state.sent_version,
                    request.version_info,
                    request.error_code or 0,
                    request.error_message,
                )
            else:
                force = state.acked_nonce == request.response_nonce
                state.acked_nonce = request.response_nonce
                ack = Ack(request.type, request.version_info)
        responses = self._respond(request.type, state, snapshot, force)
        return Outcome(responses=responses, ack=ack, nack=nack)

    def on_snapshot(self, snapshot: Snapshot) -> Outcome[XdsResponse]:
        responses: list[XdsResponse] = []
        for resource_type in PUSH_ORDER:
            state = self._types.get(resource_type)
            if state is not None:
                responses.extend(self._respond(resource_type, state, snapshot, force=False))
        return Outcome(responses=tuple(responses))

    def _respond(
        self, resource_type: ResourceType, state: _TypeState, snapshot: Snapshot | None, force: bool
    ) -> tuple[XdsResponse, ...]:
        if snapshot is None or state.awaiting_ack:
            return ()
        available = snapshot.of_type(resource_type)
        if not force and available.version == state.sent_version and state.synced_names is state.names:
            return ()  # the client holds exactly this (without walking a type of thousands of resources)
        if not force and not state.wildcard and resource_type not in FULL_STATE_TYPES:
            partial = self._changed_only(resource_type, state, available)
            if partial is not None:
                return partial
        if state.wildcard:
            selected = dict(available.resources)
        else:
            selected = {n: available.resources[n] for n in sorted(state.names) if n in available.resources}
            if not selected:
                return ()  # remembered; sent once any of them exists
        selected_names = frozenset(selected)
        if not force:
            if available.version == state.sent_version and selected_names == state.sent_names:
                return ()
            if available.version == state.nacked_version and selected_names == state.nacked_names:
                return ()
        state.sent_names = selected_names
        return self._send(resource_type, state, available, selected)

    def _send(
        self,
        resource_type: ResourceType,
        state: _TypeState,
        available: TypeResources,
        selected: Mapping[str, EncodedResource],
    ) -> tuple[XdsResponse, ...]:
        nonce = self._next_nonce()
        state.last_nonce = nonce
        state.awaiting_ack = True
        state.sent_version = available.version
        state.synced_from = available
        state.synced_names = state.names
        return (XdsResponse(resource_type, available.version, tuple(selected.values()), nonce),)

    def _changed_only(
        self, resource_type: ResourceType, state: _TypeState, available: TypeResources
    ) -> tuple[XdsResponse, ...] | None:
        """For a type Envoy does not treat as full state (EDS, RDS, SDS), a response may carry just the
        resources that changed: the client keeps the others. None: no cheap answer, send them all."""
        if state.synced_from is None or state.synced_names is None:
            return None
        changed = available.changed_since(state.synced_from)
        if changed is None:
            return None
        if state.synced_names is not state.names:
            changed = changed | (state.names - state.synced_names)  # newly subscribed names
        selected = {n: available.resources[n] for n in sorted(changed) if n in state.names and n in available.resources}
        if not selected:
            # Nothing this client subscribes to changed (or only went away, which SotW does not signal
            # for these types): it already holds this version's content.
            state.synced_from = available
            state.synced_names = state.names
            state.sent_version = available.version
            return ()
        return self._send(resource_type, state, available, selected)
