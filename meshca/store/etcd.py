"""The `store:` settings and the etcd client every store part shares: keys under one prefix, leases kept alive,
whether etcd answers, and how many writes meshca made."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
from etcd3aio import Etcd3Client, EtcdConnectionError, EtcdError, EtcdTransientError, prefix_range_end
from etcd3aio._protobuf import LeaseKeepAliveRequest, WatchCreateRequest, WatchRequest
from etcd3aio.kv import KVService

from meshca.fields import FieldReader, parse_host_port

KEK_ENV = "MESHCA_STORE_KEK"  # base64 of 32 bytes: the key-encryption key, when no kek_file is given
KEK_BYTES = 32
DEFAULT_PREFIX = "/meshca"
DEFAULT_LEASE_TTL = timedelta(seconds=10)
DEFAULT_TIMEOUT = 5.0  # seconds per etcd call: past it etcd counts as unreachable
WATCH_BACKOFF = (0.25, 5.0)  # seconds: first and longest pause before a failed watch stream is created again

T = TypeVar("T")


class StoreUnavailable(RuntimeError):
    """etcd did not answer (every endpoint down, no quorum, or the call timed out)."""


@dataclass(frozen=True)
class EtcdSettings:
    """`store.etcd` in the serve settings."""

    endpoints: tuple[str, ...]  # host:port, IP addresses or DNS names (the client balances over them)
    prefix: str = DEFAULT_PREFIX  # every meshca key lives under it; several meshes may share one etcd
    kek: bytes | None = field(default=None, repr=False)  # 32 bytes; None: no CA private key may be stored
    lease_ttl: timedelta = DEFAULT_LEASE_TTL  # leader and registry leases: a dead replica is gone after this
    timeout: float = DEFAULT_TIMEOUT


def read_kek(path: Path | None, environ: Mapping[str, str], where: str) -> bytes | None:
    """The key-encryption key from `path` (32 raw bytes, or their base64) or the MESHCA_STORE_KEK variable."""
    if path is not None:
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise ValueError(f"{where}: cannot read {path}: {error.strerror or error}") from None
        if len(raw) == KEK_BYTES:
            return raw
        text, source = raw.strip(), f"{where}: {path}"
    elif KEK_ENV in environ:
        text, source = environ[KEK_ENV].strip().encode(), f"environment variable {KEK_ENV}"
    else:
        return None
    try:
        decoded = base64.b64decode(text, validate=True)
    except ValueError:
        decoded = b""
    if len(decoded) != KEK_BYTES:
        raise ValueError(f"{source} must hold {KEK_BYTES} random bytes, raw or base64 (e.g. `head -c 32 /dev/urandom | base64`)")
    return decoded


def parse_store_settings(reader: FieldReader, environ: Mapping[str, str] | None = None) -> EtcdSettings | None:
    """The `store:` section (None when absent: the CA state directory and the mesh file, as before)."""
    section = reader.get("store", Mapping, None)
    if section is None:
        return None
    store = reader.child("store", section)
    store.check_known({"etcd"})
    etcd = store.child("etcd", store.get("etcd", Mapping))
    etcd.check_known({"endpoints", "prefix", "kek_file", "lease_ttl", "timeout"})
    endpoints = etcd.get("endpoints", list)
    if not endpoints:
        raise etcd.error("endpoints", "at least one etcd endpoint (host:port) is required")
    parsed = []
    for i, item in enumerate(endpoints):
        if not isinstance(item, str):
            raise etcd.error(f"endpoints[{i}]", "must be host:port")
        try:
            host, port = parse_host_port(item)
        except ValueError as error:
            raise etcd.error(f"endpoints[{i}]", str(error)) from None
        parsed.append(f"{host}:{port}")
    prefix = etcd.get("prefix", str, DEFAULT_PREFIX).rstrip("/")
    if not prefix.startswith("/"):
        raise etcd.error("prefix", f"{prefix!r} must start with '/'")
    lease_ttl = etcd.duration("lease_ttl", required=False) or DEFAULT_LEASE_TTL
    if not timedelta(seconds=2) <= lease_ttl <= timedelta(minutes=5):
        raise etcd.error("lease_ttl", "must be between 2s and 5m")
    timeout = float(etcd.get("timeout", (int, float), DEFAULT_TIMEOUT))
    if not 0 < timeout <= 60:
        raise etcd.error("timeout", "must be between 0 and 60 seconds")
    try:
        kek = read_kek(etcd.file("kek_file", required=False), os.environ if environ is None else environ, "kek_file")
    except ValueError as error:
        raise etcd.error("kek_file", str(error)) from None
    return EtcdSettings(tuple(parsed), prefix, kek, lease_ttl, timeout)


@dataclass(frozen=True)
class StoredValue:
    key: str  # without the prefix
    value: bytes = field(repr=False)
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    key: str  # without the prefix
    value: bytes | None = field(repr=False)  # None: deleted
    revision: int


class EtcdStore:
    """One etcd client per process, used from its event loop; `call` runs a coroutine from another thread
    (the CA's transitions run on the scheduler's worker).

    Keys are named without the prefix ("mesh/config"); every method adds it. `reachable` turns False
    when a call fails and True when one succeeds; `writes` counts the puts, deletes and transactions
    meshca sent (the figure docs/ha.md reports per push).
    """

    def __init__(self, settings: EtcdSettings, logger: logging.Logger) -> None:
        self.settings = settings
        self._log = logger
        self._client: Etcd3Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self.reachable = False
        self.writes = 0
        self.failures = 0

    # --- lifecycle -----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the channel and check that etcd answers (StoreUnavailable otherwise).

        etcd3aio dials an `ipv4:` target, which takes IP addresses only. One endpoint that is a DNS name (a
        Kubernetes headless Service) becomes a `dns:` target instead: gRPC resolves it to every address and
        resolves it again when connections fail, so members that come back with new IPs are found. Several
        endpoints with names are resolved here, once (IPv4); a member's new address needs a reconnect.
        """
        self._loop = asyncio.get_running_loop()
        endpoints = self.settings.endpoints
        names = [e for e in endpoints if not _is_ip_endpoint(e)]
        if len(endpoints) == 1 and names:
            client = Etcd3Client(["127.0.0.1:2379"], rpc_max_attempts=1)
            client._manager.target = f"dns:///{endpoints[0]}"  # etcd3aio 0.3.0 (pinned) has no option for it
        else:
            if names:
                try:
                    endpoints = await self._loop.run_in_executor(None, resolve_endpoints, endpoints, self._log)
                except OSError as error:
                    raise StoreUnavailable(str(error)) from None
            client = Etcd3Client(list(endpoints), rpc_max_attempts=1)
        await client.connect()
        self._client = client
        await self.revision()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def call(self, coroutine: Awaitable[T], timeout: float | None = None) -> T:
        """Run `coroutine` on the store's loop from another thread and wait for it."""
        assert self._loop is not None, "EtcdStore.connect() first"
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(coroutine), self._loop)
        return future.result(timeout if timeout is not None else self.settings.timeout * 2)

    # --- keys ----------------------------------------------------------------------------------

    def full_key(self, key: str) -> bytes:
        return f"{self.settings.prefix}/{key}".encode()

    def short_key(self, full: bytes) -> str:
        return full.decode()[len(self.settings.prefix) + 1 :]

    @property
    def kv(self) -> KVService:
        assert self._client is not None and self._client.kv is not None, "EtcdStore.connect() first"
        return self._client.kv

    @property
    def client(self) -> Etcd3Client:
        assert self._client is not None, "EtcdStore.connect() first"
        return self._client

    async def _rpc(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call`, retried on a transient failure (a member down, "leader changed" during an election) until
        `settings.timeout` has passed; then StoreUnavailable.

        A cancellation of the calling task always ends it (see `_cancel_lost`); asyncio.timeout, not
        asyncio.wait_for: Python 3.11's wait_for returns the result when the task is cancelled as the call
        completes, and the cancelled task goes on."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        deadline = loop.time() + self.settings.timeout
        pause = 0.05
        while True:
            if self._client is None:
                raise StoreUnavailable(f"etcd client closed ({what})")
            cancelling = _cancelling(task)
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.01)):
                    result = await call()
                _cancel_lost(task, cancelling)
                break
            except (asyncio.CancelledError, grpc.aio.AioRpcError, EtcdError, OSError) as error:
                _cancel_lost(task, cancelling)
                if isinstance(error, asyncio.CancelledError):
                    if self._client is None:  # close() cancelled the call: not this task's cancellation
                        raise StoreUnavailable(f"etcd client closed ({what})") from None
                    raise
                if _transient(error) and loop.time() + pause < deadline:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.5)
                    continue
                self.failures += 1
                if self.reachable:
                    self._log.error("etcd unreachable (%s): %s", what, _describe(error))
                self.reachable = False
                raise StoreUnavailable(f"etcd at {', '.join(self.settings.endpoints)} did not answer ({what}): "
                                       f"{_describe(error)}") from None
        if not self.reachable and self._client is not None:
            self._log.info("etcd reachable at %s", ", ".join(self.settings.endpoints))
        self.reachable = True
        return result

    # --- reads ---------------------------------------------------------------------------------

    async def revision(self) -> int:
        response = await self._rpc("status", lambda: self.kv.get(self.full_key("\0"), count_only=True))
        return int(response.header.revision)

    async def get(self, key: str) -> StoredValue | None:
        response = await self._rpc(f"get {key}", lambda: self.kv.get(self.full_key(key)))
        return self._value(response.kvs[0]) if response.kvs else None

    async def get_prefix(self, key_prefix: str) -> tuple[list[StoredValue], int]:
        """Every key under `key_prefix` and the store revision they were read at."""
        start = self.full_key(key_prefix)
        response = await self._rpc(
            f"get {key_prefix}*", lambda: self.kv.get(start, range_end=prefix_range_end(start))
        )
        return [self._value(kv) for kv in response.kvs], int(response.header.revision)

    def _value(self, kv: Any) -> StoredValue:
        return StoredValue(self.short_key(kv.key), bytes(kv.value), int(kv.mod_revision), int(kv.create_revision),
                           int(kv.lease))

    # --- writes --------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        self.writes += 1
        response = await self._rpc(f"put {key}", lambda: self.kv.put(self.full_key(key), value, lease=lease))
        return int(response.header.revision)

    async def delete(self, key: str) -> None:
        self.writes += 1
        await self._rpc(f"delete {key}", lambda: self.kv.delete(self.full_key(key)))

    async def txn(self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = ()) -> tuple[bool, int]:
        """One transaction (build its parts with `self.kv.txn_compare_*` / `txn_op_*` on full keys):
        (succeeded, revision)."""
        self.writes += 1
        response = await self._rpc("txn", lambda: self.kv.txn(compare, success, failure))
        return bool(response.succeeded), int(response.header.revision)

    # --- leases and watches ----------------------------------------------------------------------

    async def grant_lease(self, ttl: timedelta | None = None) -> int:
        seconds = int((ttl or self.settings.lease_ttl).total_seconds())
        assert self._client is not None and self._client.lease is not None
        lease = self._client.lease
        response = await self._rpc("lease grant", lambda: lease.grant(seconds))
        return int(response.ID)

    async def refresh_lease(self, lease_id: int) -> bool:
        """One keep-alive; False when the lease is gone (expired or revoked).

        The stream is written and read here, not through etcd3aio's keep_alive(): its request generator is
        consumed by a task grpc leaves running when the call has already ended."""
        assert self._client is not None and self._client.lease is not None
        lease = self._client.lease

        async def once() -> int:
            call = lease._stub.LeaseKeepAlive(metadata=lease._metadata or None)  # etcd3aio 0.3.0 (pinned)
            try:
                await _write(call, LeaseKeepAliveRequest(ID=lease_id))
                response = await call.read()
            finally:
                call.cancel()
            return 0 if response is grpc.aio.EOF else int(response.TTL)

        return await self._rpc("lease keep-alive", once) > 0

    async def revoke_lease(self, lease_id: int) -> None:
        assert self._client is not None and self._client.lease is not None
        lease = self._client.lease
        await self._rpc("lease revoke", lambda: lease.revoke(lease_id))

    async def watch_prefix(self, key_prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Changes under `key_prefix` from `start_revision` on, one list per etcd response. A transient failure
        (a member down, no quorum) creates the watch again after the last revision seen, with backoff; a
        compaction resumes after the compacted revision. Ends when the store is closed.

        Iterate it in one task; cancel that task (or close the generator from it) to stop: the stream is
        cancelled then. The stream is written and read here rather than through etcd3aio's watch(), whose
        request generator waits forever in a task grpc does not cancel once etcd has ended the stream ("Task
        was destroyed but it is pending", "aclose(): asynchronous generator is already running")."""
        start = self.full_key(key_prefix)
        request = WatchCreateRequest(key=start, range_end=prefix_range_end(start))
        task = asyncio.current_task()
        next_revision = start_revision
        pause = WATCH_BACKOFF[0]
        while True:
            client = self._client
            if client is None or client.watch is None:
                return
            call = client.watch._stub.Watch(metadata=client.watch._metadata or None)  # etcd3aio 0.3.0 (pinned)
            cancelling = _cancelling(task)
            try:
                request.start_revision = next_revision
                await _write(call, WatchRequest(create_request=request))
                while True:
                    response = await call.read()
                    _cancel_lost(task, cancelling)
                    if response is grpc.aio.EOF:
                        return
                    if response.compact_revision > 0:
                        self._log.warning("watch on %s: revisions up to %d were compacted; resuming after them",
                                          key_prefix, response.compact_revision)
                        next_revision = response.compact_revision + 1
                        break
                    if response.canceled:
                        raise EtcdError(f"etcd cancelled the watch on {key_prefix}: {response.cancel_reason}")
                    pause = WATCH_BACKOFF[0]
                    events = [
                        WatchEvent(self.short_key(event.kv.key), None if event.type == 1 else bytes(event.kv.value),
                                   int(event.kv.mod_revision))
                        for event in response.events
                    ]
                    if events:
                        next_revision = events[-1].revision + 1
                        yield events
            except asyncio.CancelledError:
                _cancel_lost(task, cancelling)
                if self._client is not None:
                    raise
                return  # the store was closed under the watch
            except grpc.aio.AioRpcError as error:
                _cancel_lost(task, cancelling)
                if not _transient(error):
                    raise
                self._log.debug("watch on %s: %s; again in %.2fs", key_prefix, _describe(error), pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, WATCH_BACKOFF[1])
            finally:
                call.cancel()


def _is_ip_endpoint(endpoint: str) -> bool:
    host, _ = parse_host_port(endpoint)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve_endpoints(
    endpoints: Sequence[str],
    logger: logging.Logger | None = None,
    getaddrinfo: Callable[..., list[Any]] = socket.getaddrinfo,
) -> tuple[str, ...]:
    """`host:port` endpoints with each DNS name replaced by its IPv4 addresses (in the resolver's order, no
    duplicates); a name that does not resolve is logged and left out; OSError when none is left."""
    resolved: list[str] = []
    failures: list[str] = []
    for endpoint in endpoints:
        if _is_ip_endpoint(endpoint):
            addresses = [endpoint]
        else:
            host, port = parse_host_port(endpoint)
            try:
                infos = getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
            except OSError as error:
                failures.append(f"{endpoint}: {error.strerror or error}")
                continue
            addresses = [f"{info[4][0]}:{port}" for info in infos]
        resolved.extend(a for a in addresses if a not in resolved)
    if failures and resolved and logger is not None:
        logger.warning("etcd endpoints left out, their names do not resolve: %s", "; ".join(failures))
    if not resolved:
        raise OSError(f"no etcd endpoint resolves to an IPv4 address ({'; '.join(failures)})")
    return tuple(resolved)


async def _write(call: Any, request: Any) -> None:
    """The first request of a stream; when the call has already ended, the read that follows says why."""
    try:
        await call.write(request)
    except asyncio.InvalidStateError:
        pass


def _cancelling(task: asyncio.Task[Any] | None) -> int:
    return task.cancelling() if task is not None else 0


def _cancel_lost(task: asyncio.Task[Any] | None, cancelling: int) -> None:
    """Raise CancelledError when `task` was cancelled while awaiting a grpc.aio call and the call returned
    anyway: grpc runs a call in a task of its own that catches a CancelledError arriving as the call completes,
    and then returns the result (or an RPC error), so the cancelled task would go on (a watch loop never ends,
    and whoever awaits it waits forever)."""
    if task is not None and task.cancelling() > cancelling:
        raise asyncio.CancelledError()


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _transient(error: BaseException) -> bool:
    """Worth another try within the call's time: etcd answered UNAVAILABLE (no leader yet, a member down)."""
    if isinstance(error, (EtcdTransientError, EtcdConnectionError)):
        return True
    return isinstance(error, grpc.aio.AioRpcError) and error.code() is grpc.StatusCode.UNAVAILABLE


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__
