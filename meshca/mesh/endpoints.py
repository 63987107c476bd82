"""Endpoints that register themselves (meshca.v1.EndpointService): who may register what, and the merge into EDS."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

import grpc

from meshca.clock import Clock, system_clock
from meshca.identity.jwt import AuthenticationError, VerifiedIdentity
from meshca.identity.spiffe import SpiffeId
from meshca.mesh.model import MeshConfig
from meshca.v1 import endpoints_pb2, endpoints_pb2_grpc

MAX_ENDPOINTS_PER_REQUEST = 256


@dataclass(frozen=True)
class RegistrationTiming:
    """How registrations outlive their stream, and how a restarted meshca waits for them.

    `grace`: a stream's endpoints stay this long after it ends (an agent restarting, or reconnecting with a fresh
    token, registers again meanwhile: callers see no gap); an empty request removes them at once.
    `warmup`: after meshca starts, proxies that come back with config they already had (a reconnect, not a first
    start) are answered only after this, so agents re-register first and no caller is told a service it still
    routes to has no endpoints; only while the mesh has services whose endpoints are all registered."""

    grace: timedelta = timedelta(seconds=3)
    warmup: timedelta = timedelta(seconds=5)


def registered_only_services(config: MeshConfig | None) -> tuple[str, ...]:
    """The services of `config` whose endpoints come only from registrations (`endpoints: []`)."""
    if config is None:
        return ()
    return tuple(s.name for s in config.services if s.inbound is not None and not s.endpoints)


@dataclass(frozen=True)
class RegisteredEndpoint:
    """One endpoint of a workload: `address`:`port` is its sidecar's inbound listener for `service`."""

    service: str
    address: str
    port: int


@dataclass(frozen=True)
class Registration:
    """What one stream registered: endpoints of services whose spiffe_id is `spiffe_id`."""

    spiffe_id: SpiffeId
    endpoints: tuple[RegisteredEndpoint, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "spiffe_id": self.spiffe_id.uri,
            "endpoints": [{"service": e.service, "address": e.address, "port": e.port} for e in self.endpoints],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Registration:
        """Raises ValueError (or KeyError/TypeError) on anything but what to_json wrote."""
        raw = data["endpoints"]
        if not isinstance(raw, list):
            raise ValueError("endpoints must be a list")
        return cls(
            SpiffeId.parse(str(data["spiffe_id"])),
            tuple(RegisteredEndpoint(str(e["service"]), str(e["address"]), int(e["port"])) for e in raw),
        )


class EndpointRefused(Exception):
    """A registration request the mesh does not allow; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_registration(
    config: MeshConfig | None, spiffe_id: SpiffeId, endpoints: Sequence[RegisteredEndpoint]
) -> tuple[str, ...]:
    """The services (sorted, once each) `spiffe_id` registers `endpoints` for; raises EndpointRefused naming the
    first endpoint that is malformed (INVALID_ARGUMENT) or of a service this identity may not serve
    (PERMISSION_DENIED: not in the mesh, no inbound, or another identity's)."""
    if len(endpoints) > MAX_ENDPOINTS_PER_REQUEST:
        raise EndpointRefused(
            grpc.StatusCode.INVALID_ARGUMENT, f"endpoints: {len(endpoints)} given, at most {MAX_ENDPOINTS_PER_REQUEST}"
        )
    for i, endpoint in enumerate(endpoints):
        where = f"endpoints[{i}]"
        try:
            ipaddress.ip_address(endpoint.address)
        except ValueError:
            raise EndpointRefused(
                grpc.StatusCode.INVALID_ARGUMENT, f"{where}.address: {endpoint.address[:64]!r} is not an IP address"
            ) from None
        if not 1 <= endpoint.port <= 65535:
            raise EndpointRefused(grpc.StatusCode.INVALID_ARGUMENT, f"{where}.port: {endpoint.port} is not 1-65535")
        service = None if config is None else config.service(endpoint.service)
        name = endpoint.service[:64]
        if service is None:
            raise EndpointRefused(grpc.StatusCode.PERMISSION_DENIED, f"{where}: service {name!r} is not in the mesh")
        if service.inbound is None:
            raise EndpointRefused(
                grpc.StatusCode.PERMISSION_DENIED, f"{where}: service {name!r} has no 'inbound': nothing to call"
            )
        if service.spiffe_id != spiffe_id:
            raise EndpointRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{where}: service {name!r} is served by {service.spiffe_id.uri}, not by {spiffe_id.uri}",
            )
    return tuple(sorted({e.service for e in endpoints}))


def with_registered(config: MeshConfig, registrations: Iterable[Registration]) -> MeshConfig:
    """`config` with each service's registered endpoints after its static ones (once each, in a stable order).

    A registration counts only while the mesh still gives its service to its identity (the mesh file may change
    after it was accepted). Addresses are in canonical form (the servicer and meshca.store.endpoints.parse_stored make them so). Services without registrations are the same objects, so a rebuild's memo re-encodes
    only the EDS (and cluster) of services whose endpoints changed."""
    owner = {s.name: s.spiffe_id for s in config.services if s.inbound is not None}
    added: dict[str, set[tuple[str, int]]] = {}
    for registration in registrations:
        for endpoint in registration.endpoints:
            if owner.get(endpoint.service) == registration.spiffe_id:
                added.setdefault(endpoint.service, set()).add((endpoint.address, endpoint.port))
    if not added:
        return config
    services = []
    for service in config.services:
        extra = added.get(service.name)
        if extra:
            static = set(service.endpoints)
            service = replace(service, endpoints=service.endpoints + tuple(sorted(extra - static)))
        services.append(service)
    return replace(config, services=tuple(services))


class RegisteredEndpoints:
    """The registrations in effect (thread-safe); `on_change` runs after each change, outside the lock. When it
    returns an awaitable (a coalesced rebuild, see CoalescedWork), `put` and `remove` wait for it: a stream's
    answer then means its endpoints are published."""

    def __init__(self, on_change: Callable[[], Awaitable[object] | None]) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, Registration] = {}
        self._on_change = on_change

    def snapshot(self) -> tuple[Registration, ...]:
        with self._lock:
            return tuple(self._by_id.values())

    def count(self) -> int:
        with self._lock:
            return sum(len(r.endpoints) for r in self._by_id.values())

    async def put(self, registration_id: str, registration: Registration) -> None:
        with self._lock:
            unchanged = self._by_id.get(registration_id) == registration
            self._by_id[registration_id] = registration
        if not unchanged:
            await self._changed()

    async def remove(self, registration_id: str) -> None:
        with self._lock:
            found = self._by_id.pop(registration_id, None)
        if found is not None:
            await self._changed()

    def replace_all(self, registrations: Mapping[str, Registration]) -> Awaitable[object] | None:
        """Everything at once (e.g. what the HA store holds under `endpoints/`); returns what `on_change` did (await
        it to wait for the rebuild)."""
        with self._lock:
            unchanged = self._by_id == registrations
            self._by_id = dict(registrations)
        return None if unchanged else self._on_change()

    async def _changed(self) -> None:
        waiting = self._on_change()
        if waiting is not None:
            await waiting


class CoalescedWork:
    """Runs `work` (blocking: on a worker thread) for each burst of requests: a request while a run is pending or
    running folds into one following run, so N changes arriving at once cost two runs, not N; a lone request runs
    at once (no delay is added). Each run sees every change requested before it started. Runs start at least
    `min_interval` seconds apart, so a long stream of changes (a herd of agents registering over a second or two)
    costs a run per interval, not one per change that arrived during the previous run.

    `request()` from the event loop returns a future (the caller's own) done when a run that started after the
    request has ended; from a thread without a running loop (tests, start-up) `work` runs at once, there."""

    def __init__(self, work: Callable[[], None], logger: logging.Logger, min_interval: float = 0.1) -> None:
        self._work = work
        self._min_interval = min_interval
        self._log = logger
        self._pending = False
        self._next: asyncio.Future[None] | None = None  # done by the next run to start
        self._task: asyncio.Task[None] | None = None
        self.runs = 0  # runs of `work` so far (tests and benchmarks count rebuilds with it)

    def request(self) -> asyncio.Future[None] | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.runs += 1
            self._work()
            return None
        self._pending = True
        if self._next is None or self._next.get_loop() is not loop:
            self._next = loop.create_future()
        waiter = self._next
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run(), name="coalesced-rebuild")
        # each caller its own future: a cancelled waiter (its registration stream ended) cancels no other one
        return asyncio.shield(waiter)

    async def _run(self) -> None:
        done: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        started: float | None = None
        try:
            while self._pending:
                if started is not None:  # changes came during the last run: wait out the interval, folding more
                    await asyncio.sleep(max(0.0, started + self._min_interval - loop.time()))
                started = loop.time()
                self._pending = False
                done, self._next = self._next, None
                self.runs += 1
                try:
                    await asyncio.to_thread(self._work)
                except Exception:
                    self._log.exception("rebuild after an endpoint change failed")
                if done is not None and not done.done():
                    done.set_result(None)
        finally:  # cancelled (the loop is ending): nobody waits forever
            for waiter in (done, self._next):
                if waiter is not None and not waiter.done():
                    waiter.cancel()
            self._task = None


class RegistrationSink(Protocol):
    """Where a stream's registration goes: RegisteredEndpoints, or the HA store (meshca.store.endpoints)."""

    async def put(self, registration_id: str, registration: Registration) -> None: ...

    async def remove(self, registration_id: str) -> None: ...


class Authenticator(Protocol):
    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> VerifiedIdentity: ...


class EndpointServicer(endpoints_pb2_grpc.EndpointServiceServicer):
    """meshca.v1.EndpointService/Register: each request replaces the stream's endpoints; the stream's end removes them.
    A stream ends (UNAUTHENTICATED) when its token expires, as xDS streams do: the agent reconnects with a fresh one."""

    def __init__(
        self,
        authenticator: Authenticator,
        sink: RegistrationSink,
        mesh: Callable[[], MeshConfig | None],
        logger: logging.Logger | None = None,
        revoked: Callable[[SpiffeId], bool] | None = None,
        grace: timedelta = RegistrationTiming().grace,
        leeways: Mapping[str, timedelta] | None = None,
        clock: Clock = system_clock,
    ) -> None:
        """`mesh`: the mesh file's model now (None before one applied: everything is refused). `grace`: how long a
        stream's endpoints stay after it ended (RegistrationTiming). `leeways`: per issuer, how long after `exp` a
        token is still accepted (the stream ends then, as JwtStreamGate's do)."""
        self._authenticator = authenticator
        self._sink = sink
        self._mesh = mesh
        self._log = logger or logging.getLogger(__name__)
        self._revoked = revoked
        self._grace = grace
        self._removals: set[asyncio.Task[None]] = set()
        self._leeways = dict(leeways or {})
        self._clock = clock

    async def _remove_after_grace(self, registration_id: str, spiffe_id: SpiffeId) -> None:
        await asyncio.sleep(self._grace.total_seconds())
        await self._sink.remove(registration_id)
        self._log.info("%s: registration %s ended %gs ago, its endpoints are removed",
                       spiffe_id, registration_id[:8], self._grace.total_seconds())

    def pending_removals(self) -> int:
        """Ended streams whose endpoints are still served (within their grace)."""
        return len(self._removals)

    def _deadline(self, identity: VerifiedIdentity) -> datetime:
        try:
            return identity.expires_at + self._leeways.get(identity.issuer, timedelta(0))
        except OverflowError:  # exp near year 9999
            return identity.expires_at

    async def Register(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[endpoints_pb2.RegisterRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[endpoints_pb2.RegisterResponse]:
        metadata = [(m[0], m[1]) for m in (context.invocation_metadata() or ())]
        try:
            identity = self._authenticator.authenticate(metadata)
        except AuthenticationError as e:
            self._log.info("Register refused: unauthenticated: %s", e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        spiffe_id = identity.spiffe_id
        if self._revoked is not None and self._revoked(spiffe_id):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"identity {spiffe_id} is revoked")
        registration_id = uuid.uuid4().hex
        registered = False
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + (self._deadline(identity) - self._clock()).total_seconds()
        requests = aiter(request_iterator)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(ends_at):  # around the read only: never around the yield
                        request = await anext(requests)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    expired = identity.expires_at.isoformat(timespec="seconds")
                    self._log.info("%s: registration %s ended: its token expired at %s", spiffe_id,
                                   registration_id[:8], expired)
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                        f"token expired at {expired}; reconnect with a fresh token")
                endpoints = tuple(RegisteredEndpoint(e.service, e.address, e.port) for e in request.endpoints)
                try:
                    accepted = check_registration(self._mesh(), spiffe_id, endpoints)
                except EndpointRefused as e:
                    self._log.info("Register refused for %s: %s", spiffe_id, e.message)
                    await context.abort(e.code, e.message)
                # in canonical form once here, so that rebuilds (with_registered) compare addresses as they are
                endpoints = tuple(replace(e, address=str(ipaddress.ip_address(e.address))) for e in endpoints)
                first, registered = not registered, True  # stored from here: removed when the stream ends, even
                await self._sink.put(registration_id, Registration(spiffe_id, endpoints))  # if cancelled in the put
                if first:
                    self._log.info("%s registered %d endpoint(s) of %s", spiffe_id, len(endpoints), ", ".join(accepted))
                yield endpoints_pb2.RegisterResponse(spiffe_id=spiffe_id.uri, accepted_services=accepted)
        finally:
            if registered:
                if self._grace <= timedelta(0):
                    await self._sink.remove(registration_id)
                    self._log.info("%s: registration %s ended, its endpoints are removed", spiffe_id, registration_id[:8])
                else:
                    # a task of its own: the stream's handler is being cancelled or is ending now
                    removal = asyncio.get_running_loop().create_task(
                        self._remove_after_grace(registration_id, spiffe_id), name=f"unregister-{registration_id[:8]}"
                    )
                    self._removals.add(removal)
                    removal.add_done_callback(self._removals.discard)


def add_to_server(server: grpc.aio.Server, servicer: EndpointServicer) -> None:
    """Register `servicer` on a grpc.aio server."""
    endpoints_pb2_grpc.add_EndpointServiceServicer_to_server(servicer, server)
