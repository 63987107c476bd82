"""The xDS/SDS gRPC server: ADS and the per-type services, SotW and delta, over grpc.aio, fed by a SnapshotCache."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError

from meshca.clock import Clock, system_clock
from meshca.gcpolicy import CollectorPause
from meshca.logs import RepeatLimiter, client_text
from meshca.v1 import xds_wire_pb2
from meshca.xds.cache import SnapshotCache
from meshca.xds.cancel import cancel_rpc
from meshca.xds.delta import DeltaRequest, DeltaResponse, DeltaStream
from meshca.xds.protocol import Outcome, ProtocolStream
from meshca.xds.snapshot import ResourceType
from meshca.xds.sotw import SotwStream, XdsRequest, XdsResponse
from meshca.xds.status import ProxyRegistry
from meshca.xds.wire import length_delimited

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
PER_TYPE_METHODS: dict[ResourceType, str] = {
    ResourceType.CLUSTER: "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters",
    ResourceType.ENDPOINT: "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints",
    ResourceType.LISTENER: "/envoy.service.listener.v3.ListenerDiscoveryService/StreamListeners",
    ResourceType.ROUTE: "/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes",
    ResourceType.SECRET: "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
}
DELTA_ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
DELTA_PER_TYPE_METHODS: Mapping[ResourceType, str] = MappingProxyType(
    {
        ResourceType.CLUSTER: "/envoy.service.cluster.v3.ClusterDiscoveryService/DeltaClusters",
        ResourceType.ENDPOINT: "/envoy.service.endpoint.v3.EndpointDiscoveryService/DeltaEndpoints",
        ResourceType.LISTENER: "/envoy.service.listener.v3.ListenerDiscoveryService/DeltaListeners",
        ResourceType.ROUTE: "/envoy.service.route.v3.RouteDiscoveryService/DeltaRoutes",
        ResourceType.SECRET: "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets",
    }
)

MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_SEND_TIMEOUT = timedelta(seconds=30)
DEFAULT_FIRST_REQUEST_TIMEOUT = timedelta(seconds=30)
DEFAULT_MAX_STREAM_AGE = timedelta(minutes=30)
MAX_STREAM_AGE_JITTER = 0.1  # each stream's age limit is drawn from ±10% around the setting
SHUTDOWN_MESSAGE = "meshca is shutting down; reconnect"
_CONTROL_PLANE = length_delimited(6, length_delimited(1, b"meshca"))
_DELTA_CONTROL_PLANE = length_delimited(7, length_delimited(1, b"meshca"))


class StreamRefused(Exception):
    """Raised by a StreamGate to close a stream with a gRPC status and a reason."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class NodeInfo:
    id: str
    cluster: str
    metadata: dict[str, Any] = field(default_factory=dict)
    # The first request carried config the proxy already holds (SotW version_info, delta initial_resource_versions):
    # a reconnect, not a first start.
    resumed: bool = False


@dataclass(frozen=True)
class Admission:
    """A stream let in: which snapshot it watches and the identity to show for it."""

    snapshot_key: str
    identity: str
    # When the stream's credentials end (None: never): it is then closed with UNAUTHENTICATED and
    # `deadline_message`, so the proxy reconnects with fresh ones.
    deadline: datetime | None = None
    deadline_message: str = "credentials expired; reconnect with fresh ones"


class StreamGate(Protocol):
    """Decides who may open a stream (go-control-plane's OnStreamOpen, split in two steps)."""

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> object:
        """Check the stream's credentials before any message is read; raise StreamRefused."""
        ...

    async def admit(self, principal: object, node: NodeInfo) -> Admission:
        """Bind the node of the first request to the principal; raise StreamRefused."""
        ...

    def release(self, admission: Admission) -> None:
        """The admitted stream has ended (go-control-plane's OnStreamClosed)."""
        ...


def frame_response(response: XdsResponse) -> bytes:
    """Serialize a DiscoveryResponse by concatenating pre-encoded resources (nothing re-encoded)."""
    parts = [length_delimited(1, response.version.encode())]
    parts.extend(resource.any_field for resource in response.resources)
    parts.append(length_delimited(4, response.type.type_url.encode()))
    parts.append(length_delimited(5, response.nonce.encode()))
    parts.append(_CONTROL_PLANE)
    return b"".join(parts)


def frame_delta_response(response: DeltaResponse) -> bytes:
    """Serialize a DeltaDiscoveryResponse from each resource's precomputed Resource framing."""
    parts = [length_delimited(1, response.version.encode())]
    for resource in response.resources:
        parts.append(resource.delta_prefix)
        parts.append(resource.any_field)
    parts.append(length_delimited(4, response.type.type_url.encode()))
    parts.extend(length_delimited(6, name.encode()) for name in response.removed)
    parts.append(length_delimited(5, response.nonce.encode()))
    parts.append(_DELTA_CONTROL_PLANE)
    return b"".join(parts)


class MalformedRequest(ValueError):
    """A (Delta)DiscoveryRequest that cannot be decoded or names another type on a per-type service."""


def _resource_type(type_url: str, fixed_type: ResourceType | None) -> ResourceType | None:
    """The requested type: the per-type service's own, or the type URL's on ADS (None: not served)."""
    if fixed_type is None:
        return ResourceType.from_type_url(type_url)
    if type_url and type_url != fixed_type.type_url:
        raise MalformedRequest(f"type_url '{client_text(type_url)}' sent on the {fixed_type.short_name} service")
    return fixed_type


_Wire = TypeVar("_Wire", xds_wire_pb2.DiscoveryRequest, xds_wire_pb2.DeltaDiscoveryRequest)


@dataclass(frozen=True)
class _Decoded(Generic[_Wire]):
    """What SotW and delta requests have in common, plus the decoded message for the rest."""

    message: _Wire
    node: NodeInfo | None
    type: ResourceType | None
    error_code: int | None
    error_message: str


def _decode(raw: bytes, wire: type[_Wire], fixed_type: ResourceType | None) -> _Decoded[_Wire]:
    """Decoded with protobuf's upb runtime and a wire-compatible subset of Envoy's message (see
    protos/meshca/v1/xds_wire.proto): ~0.5 µs instead of betterproto2's ~25-70 µs, and truncated or
    non-UTF-8 input is rejected instead of silently accepted.
    """
    try:
        message = wire.FromString(raw)
    except DecodeError as error:
        raise MalformedRequest(f"malformed {wire.DESCRIPTOR.name}: {error}") from None
    node = None
    if message.HasField("node"):
        metadata = MessageToDict(message.node.metadata) if message.node.HasField("metadata") else {}
        if isinstance(message, xds_wire_pb2.DeltaDiscoveryRequest):
            resumed = len(message.initial_resource_versions) > 0
        else:
            resumed = message.version_info != ""
        node = NodeInfo(message.node.id, message.node.cluster, metadata, resumed)
    error = message.error_detail if message.HasField("error_detail") else None
    return _Decoded(
        message,
        node,
        _resource_type(message.type_url, fixed_type),
        error.code if error is not None else None,
        error.message if error is not None else "",
    )


def parse_request(raw: bytes, fixed_type: ResourceType | None) -> tuple[XdsRequest | None, NodeInfo | None]:
    """Decode one DiscoveryRequest; returns (None, node) for a type we do not serve on ADS."""
    decoded = _decode(raw, xds_wire_pb2.DiscoveryRequest, fixed_type)
    if decoded.type is None:
        return None, decoded.node
    message = decoded.message
    version_info, response_nonce = message.version_info, message.response_nonce
    # Every ACK repeats the names (an Envoy's EDS request names every cluster): their canonical bytes
    # are compared with the last request's, ~3x cheaper than building the strings, which are only
    # built (from the upb container, lazily) when the names changed.
    for other in ("version_info", "node", "type_url", "response_nonce", "error_detail"):
        message.ClearField(other)
    request = XdsRequest(
        type=decoded.type,
        version_info=version_info,
        resource_names=message.resource_names,
        response_nonce=response_nonce,
        error_code=decoded.error_code,
        error_message=decoded.error_message,
        names_key=message.SerializeToString(),
    )
    return request, decoded.node


def parse_delta_request(raw: bytes, fixed_type: ResourceType | None) -> tuple[DeltaRequest | None, NodeInfo | None]:
    """Decode one DeltaDiscoveryRequest; returns (None, node) for a type we do not serve on ADS."""
    decoded = _decode(raw, xds_wire_pb2.DeltaDiscoveryRequest, fixed_type)
    if decoded.type is None:
        return None, decoded.node
    message = decoded.message
    request = DeltaRequest(
        type=decoded.type,
        subscribe=tuple(message.resource_names_subscribe),
        unsubscribe=tuple(message.resource_names_unsubscribe),
        initial_versions=dict(message.initial_resource_versions),
        response_nonce=message.response_nonce,
        error_code=decoded.error_code,
        error_message=decoded.error_message,
    )
    return request, decoded.node


@dataclass(frozen=True)
class _Variant:
    """What differs between SotW and delta streams: decoding, the state machine, framing."""

    name: str
    parse: Callable[[bytes, ResourceType | None], tuple[object | None, NodeInfo | None]]
    new_stream: Callable[[list[ResourceType], Callable[[], str]], ProtocolStream[Any, Any]]
    frame: Callable[[Any], bytes]


_SOTW = _Variant("sotw", parse_request, SotwStream, frame_response)
_DELTA = _Variant("delta", parse_delta_request, DeltaStream, frame_delta_response)


_END = object()


@dataclass(frozen=True)
class _Close:
    """The server ends the stream: token expired, maximum age reached, or shutting down."""

    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class _PendingWrite:
    """A response write in progress, as the write watchdog sees it."""

    started: float  # loop.time()
    task: asyncio.Task[Any]
    node_id: str
    context: grpc.aio.ServicerContext


class _Inbox:
    """What a stream's loop waits for: the next request (bounded, from the reader task) or a newer
    snapshot, through one future per wait (not a task per source and asyncio.wait, as before)."""

    def __init__(self, limit: int, pause: CollectorPause | None = None) -> None:
        self.requests: asyncio.Queue[object] = asyncio.Queue(maxsize=limit)
        self._snapshot_changed = False
        self._waiter: asyncio.Future[None] | None = None
        self._pause = pause
        self._holding = False
        self._close: _Close | None = None
        self.identity: str | None = None  # set once the stream is admitted

    def close(self, code: grpc.StatusCode, message: str) -> None:
        """End the stream with this status at its next step (before any request or push still waiting)."""
        if self._close is None:
            self._close = _Close(code, message)
            self._wake()

    def snapshot_changed(self) -> None:
        # An idle stream is about to push: no garbage collection until it has handed the response
        # to gRPC (released one loop iteration after it woke, i.e. after its step). A busy stream
        # (e.g. stuck in a write to a slow reader) does not hold the pause.
        waiter = self._waiter
        if self._pause is not None and not self._holding and waiter is not None and not waiter.done():
            self._pause.hold()
            self._holding = True
        self._snapshot_changed = True
        self._wake()

    async def put(self, item: object) -> None:
        await self.requests.put(item)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> object | None:
        """The next request, _Close when the stream is to end, or None when the watched snapshot changed."""
        while True:
            if self._close is not None:
                return self._close
            if not self.requests.empty():
                return self.requests.get_nowait()
            if self._snapshot_changed:
                self._snapshot_changed = False
                return None
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
                if self._holding:
                    self._holding = False
                    loop.call_soon(self._pause.release)  # type: ignore[union-attr]


class XdsServer:
    """Serves ADS and per-type xDS, SotW and delta, from a SnapshotCache; knows nothing of CAs or config files."""

    def __init__(
        self,
        cache: SnapshotCache,
        gate: StreamGate,
        registry: ProxyRegistry,
        logger: logging.Logger,
        send_timeout: timedelta = DEFAULT_SEND_TIMEOUT,
        collector_pause: CollectorPause | None = None,
        max_stream_age: timedelta | None = DEFAULT_MAX_STREAM_AGE,
        clock: Clock = system_clock,
        rng: random.Random | None = None,
        repeat_window: float = 10.0,
        first_request_timeout: timedelta = DEFAULT_FIRST_REQUEST_TIMEOUT,
    ) -> None:
        """`send_timeout`: how long one response may wait for the proxy to read it (HTTP/2 flow
        control) before the stream is closed with UNAVAILABLE. `collector_pause`: held while a
        snapshot change is being written to the streams it woke (see meshca.gcpolicy).
        `max_stream_age`: a stream is closed with UNAVAILABLE after this (±10% jitter, drawn from
        `rng`), so proxies reconnect and spread over replicas (None: never). `clock` turns an
        Admission's deadline into a delay. `repeat_window`: the same refusal from the same peer is
        logged once per this many seconds, then counted. `first_request_timeout`: a stream whose first
        request (the one that names its node) has not come by then is closed with DEADLINE_EXCEEDED
        (Envoy sends it at once; until then the stream has no identity, deadline or age limit).
        """
        if send_timeout <= timedelta(0):
            raise ValueError(f"send_timeout must be positive, not {send_timeout}")
        if max_stream_age is not None and max_stream_age <= timedelta(0):
            raise ValueError(f"max_stream_age must be positive, not {max_stream_age}")
        self._cache = cache
        self._gate = gate
        self._registry = registry
        self._log = logger
        self._send_timeout = send_timeout
        self._collector_pause = collector_pause
        self._max_stream_age = max_stream_age
        self._first_request_timeout = first_request_timeout.total_seconds()
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._repeats = RepeatLimiter(logger, repeat_window)
        self._streams: set[_Inbox] = set()  # every stream being served, admitted or not
        self._shutting_down = False
        self._nonces = itertools.count(1)
        # One watchdog task checks every write in progress, instead of a timer per write (at 10,000
        # streams the per-write timers cost more than the writes' own Python work).
        self._pending_writes: dict[int, _PendingWrite] = {}
        self._watchdog: asyncio.Task[None] | None = None

    def generic_handlers(self) -> list[grpc.GenericRpcHandler]:
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for variant, ads_method, per_type_methods in (
            (_SOTW, ADS_METHOD, PER_TYPE_METHODS),
            (_DELTA, DELTA_ADS_METHOD, DELTA_PER_TYPE_METHODS),
        ):
            handlers[ads_method] = grpc.stream_stream_rpc_method_handler(self._handler(variant, None))
            for resource_type, method in per_type_methods.items():
                handlers[method] = grpc.stream_stream_rpc_method_handler(self._handler(variant, resource_type))
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for method, handler in handlers.items():
            service, name = method.lstrip("/").rsplit("/", 1)
            by_service.setdefault(service, {})[name] = handler
        return [grpc.method_handlers_generic_handler(s, m) for s, m in by_service.items()]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(self.generic_handlers())

    def _handler(self, variant: _Variant, fixed_type: ResourceType | None):  # type: ignore[no-untyped-def]
        async def handler(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            await self._serve_stream(requests, context, fixed_type, variant)

        return handler

    async def _serve_stream(
        self,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
        fixed_type: ResourceType | None,
        variant: _Variant,
    ) -> None:
        if self._shutting_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTDOWN_MESSAGE)
            return
        try:
            principal = self._gate.authenticate(context.invocation_metadata() or ())
        except StreamRefused as refused:
            self._log_refusal(context, refused)
            await context.abort(refused.code, refused.message)
            return

        inbox = _Inbox(limit=64, pause=self._collector_pause)
        self._streams.add(inbox)
        reader = asyncio.create_task(self._read(requests, inbox, fixed_type, variant))
        stream_id: int | None = None
        admission: Admission | None = None
        watch = None
        timer: asyncio.TimerHandle | None = None
        closed_by: _Close | None = None
        first_timer = asyncio.get_running_loop().call_later(
            self._first_request_timeout,
            inbox.close,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"no first request within {self._first_request_timeout:g} s",
        )
        try:
            first = await inbox.next()
            first_timer.cancel()
            if first is _END:
                return
            if isinstance(first, _Close):
                await context.abort(first.code, first.message)
                return
            if isinstance(first, MalformedRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(first))
                return
            request, node = first  # type: ignore[misc]
            if node is None or not node.id:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id")
                return
            try:
                admission = await self._gate.admit(principal, node)
            except StreamRefused as refused:
                self._log_refusal(context, refused, node.id)
                await context.abort(refused.code, refused.message)
                return
            if admission.deadline is not None and admission.deadline <= self._clock():
                # e.g. the first request came after the token expired: nothing is served on it
                refused = StreamRefused(grpc.StatusCode.UNAUTHENTICATED, admission.deadline_message)
                self._log_refusal(context, refused, node.id)
                await context.abort(refused.code, refused.message)
                return

            allowed = [fixed_type] if fixed_type is not None else list(ResourceType)
            protocol = variant.new_stream(allowed, lambda: str(next(self._nonces)))
            inbox.identity = admission.identity
            stream_id = self._registry.open(node.id, admission.identity, admission.snapshot_key)
            self._log.info(
                "xds stream opened: node=%s identity=%s stream=%d protocol=%s",
                client_text(node.id),
                admission.identity,
                stream_id,
                variant.name,
            )
            timer = self._schedule_end(inbox, admission)
            watch = self._cache.watch(admission.snapshot_key, inbox.snapshot_changed)
            # Requests are answered from the snapshot last handed to the protocol; a newer one is
            # taken through the watch, so that its changes go out in push order for every type.
            snapshot = self._cache.get(admission.snapshot_key)
            pending: object = first
            while True:
                outcome: Outcome[Any] | None = None
                if isinstance(pending, _Close):
                    closed_by = pending
                    await context.abort(pending.code, pending.message)
                    return
                if pending is not None:
                    item, pending = pending, None
                    if item is _END:
                        return
                    if isinstance(item, MalformedRequest):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
                        return
                    request, later_node = item  # type: ignore[misc]
                    if later_node is not None and later_node.id and later_node.id != node.id:
                        await context.abort(
                            grpc.StatusCode.PERMISSION_DENIED,
                            f"node.id changed on an open stream from '{client_text(node.id)}' "
                            f"to '{client_text(later_node.id)}'",
                        )
                        return
                    if request is not None:
                        outcome = protocol.on_request(request, snapshot)
                else:
                    snapshot = self._cache.get(admission.snapshot_key) or snapshot
                    if snapshot is not None:
                        outcome = protocol.on_snapshot(snapshot)
                if outcome is not None:
                    await self._apply(stream_id, node.id, outcome, context, variant.frame)
                pending = await inbox.next()
        finally:
            first_timer.cancel()
            self._streams.discard(inbox)
            reader.cancel()
            if timer is not None:
                timer.cancel()
            if watch is not None:
                watch.close()
            if stream_id is not None:
                self._registry.close(stream_id)
                if closed_by is None:
                    self._log.info("xds stream closed: stream=%d", stream_id)
                else:
                    self._log.info(
                        "xds stream closed: stream=%d by meshca (%s: %s)", stream_id, closed_by.code.name, closed_by.message
                    )
            if admission is not None:
                self._gate.release(admission)

    def _schedule_end(self, inbox: _Inbox, admission: Admission) -> asyncio.TimerHandle | None:
        """One timer per stream, for whichever comes first: its credentials' deadline or its maximum age."""
        ends: list[tuple[float, grpc.StatusCode, str]] = []
        if self._max_stream_age is not None:
            age = self._max_stream_age.total_seconds() * self._rng.uniform(
                1 - MAX_STREAM_AGE_JITTER, 1 + MAX_STREAM_AGE_JITTER
            )
            ends.append((age, grpc.StatusCode.UNAVAILABLE, f"maximum stream age reached ({age:.0f} s); reconnect"))
        if admission.deadline is not None:
            delay = (admission.deadline - self._clock()).total_seconds()
            ends.append((delay, grpc.StatusCode.UNAUTHENTICATED, admission.deadline_message))
        if not ends:
            return None
        delay, code, message = min(ends, key=lambda end: end[0])
        return asyncio.get_running_loop().call_later(max(delay, 0.0), inbox.close, code, message)

    def _log_refusal(self, context: grpc.aio.ServicerContext, refused: StreamRefused, node_id: str | None = None) -> None:
        peer = client_text(context.peer() or "unknown")
        host = peer.rsplit(":", 1)[0]  # one kind per address, whatever the client's port
        node = f" for node {client_text(node_id)}" if node_id is not None else ""
        self._repeats.log(
            logging.WARNING,
            f"xds streams refused with {refused.code.name} from {host}",
            "xds stream refused%s: %s",
            node,
            client_text(refused.message),
            extra={"peer": peer},
        )

    def close_identity(self, identity: str, code: grpc.StatusCode, message: str) -> int:
        """End every admitted stream of this identity with `code` at its next step; how many were ended."""
        inboxes = [inbox for inbox in self._streams if inbox.identity == identity]
        for inbox in inboxes:
            inbox.close(code, message)
        return len(inboxes)

    def shutdown(self) -> None:
        """End every stream now with UNAVAILABLE, so proxies reconnect (to another replica); refuse new ones.

        A stream waiting for a request or a snapshot ends at its next step; one stuck writing to a
        proxy that does not read is cancelled with that status, as the write watchdog does.
        """
        self._shutting_down = True
        for inbox in list(self._streams):
            inbox.close(grpc.StatusCode.UNAVAILABLE, SHUTDOWN_MESSAGE)
        for stream_id, write in list(self._pending_writes.items()):
            del self._pending_writes[stream_id]
            cancel_rpc(write.context, grpc.StatusCode.UNAVAILABLE, SHUTDOWN_MESSAGE)
            write.task.cancel()
        self._repeats.flush()

    def _close_stalled(self, stream_id: int, node_id: str, context: grpc.aio.ServicerContext) -> None:
        seconds = self._send_timeout.total_seconds()
        details = f"xDS stream closed: client did not read a response for {seconds:g} s"
        self._registry.record_send_timeout()
        if cancel_rpc(context, grpc.StatusCode.UNAVAILABLE, details):
            self._log.warning(
                "xds stream closed with UNAVAILABLE: node %s did not read a response for %g s (stream=%d)",
                client_text(node_id),
                seconds,
                stream_id,
            )
        else:
            self._log.warning(
                "xds stream dropped: node %s did not read a response for %g s (stream=%d); this grpcio cannot "
                "cancel the call, so its HTTP/2 stream stays open, without status, until the peer disconnects",
                client_text(node_id),
                seconds,
                stream_id,
            )

    async def _send(self, stream_id: int, node_id: str, context: grpc.aio.ServicerContext, message: bytes) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pending_writes[stream_id] = _PendingWrite(asyncio.get_running_loop().time(), task, node_id, context)
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch_writes())
        try:
            await context.write(message)
        finally:
            self._pending_writes.pop(stream_id, None)

    async def _watch_writes(self) -> None:
        """Close the streams whose write has been pending for the send timeout; ends when none is pending."""
        limit = self._send_timeout.total_seconds()
        loop = asyncio.get_running_loop()
        try:
            while self._pending_writes:
                await asyncio.sleep(min(limit / 4, 1.0))
                now = loop.time()
                for stream_id, write in list(self._pending_writes.items()):
                    if now - write.started >= limit:
                        del self._pending_writes[stream_id]
                        self._close_stalled(stream_id, write.node_id, write.context)
                        # Ends the handler the way a client cancellation does: grpc.aio sends no
                        # status of its own (the call is normally cancelled by now) and logs nothing.
                        write.task.cancel()
        finally:
            self._watchdog = None

    async def _apply(
        self,
        stream_id: int,
        node_id: str,
        outcome: Outcome[Any],
        context: grpc.aio.ServicerContext,
        frame: Callable[[Any], bytes],
    ) -> None:
        if outcome.ack is not None:
            self._registry.record_ack(stream_id, outcome.ack.type, outcome.ack.version)
        if outcome.nack is not None:
            nack = outcome.nack
            self._registry.record_nack(stream_id, nack.type, nack.rejected_version, nack.error_message)
            # A client may NACK the same response again and again: one line per window and kind.
            node = client_text(node_id)
            self._repeats.log(
                logging.WARNING,
                f"NACKs from node {node} for {nack.type.short_name} (stream={stream_id})",
                "NACK from node %s for %s version %s (code %d): %s",
                node,
                nack.type.short_name,
                nack.rejected_version,
                nack.error_code,
                client_text(nack.error_message),
            )
        for response in outcome.responses:
            await self._send(stream_id, node_id, context, frame(response))
            keys = sum(r.private_key for r in response.resources) if response.type is ResourceType.SECRET else 0
            self._registry.record_sent(stream_id, response.type, response.version, keys)

    @staticmethod
    async def _read(
        requests: AsyncIterator[bytes],
        inbox: _Inbox,
        fixed_type: ResourceType | None,
        variant: _Variant,
    ) -> None:
        try:
            async for raw in requests:
                try:
                    await inbox.put(variant.parse(raw, fixed_type))
                except MalformedRequest as error:
                    await inbox.put(error)
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # the client went away; the handler sees _END
            pass
        await inbox.put(_END)
