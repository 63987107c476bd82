"""The fleet's proxy registry in etcd: each replica writes one summary of its streams under its own lease, at most
once per interval and only when it changed; any replica reads every summary for the fleet view."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import threading
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshca.clock import Clock
from meshca.store.etcd import EtcdStore, StoredValue, StoreUnavailable

REPLICAS_PREFIX = "replicas/"
DEFAULT_INTERVAL = 1.0  # seconds: at most one registry write per replica per interval
CHUNK_BYTES = 1_000_000  # a value above this is split: etcd refuses requests over 1.5 MiB
MAX_NACK_MESSAGE = 256  # characters of a NACK message kept in the summary
FLEET_TIMEOUT = 2.0  # seconds /status waits for the other replicas' summaries before showing its own proxies only
_ZLIB_MAGIC = 0x78  # the first byte of a zlib stream; a chunked summary's header is JSON ("{")

ProxyJson = dict[str, Any]  # one proxy as /status shows it


def default_replica_id() -> str:
    """hostname-pid: this process's name among the replicas (the CA leader key, `replicas/<id>`, /status), unique
    per process on a host and readable in `meshca status`; leases, not names, tell a restarted process apart."""
    return f"{socket.gethostname()}-{os.getpid()}".replace("/", "_")


@dataclass(frozen=True)
class ReplicaSummary:
    """One replica's proxies as read from the store."""

    replica: str
    written_at: str  # ISO 8601, the writer's clock
    proxies: tuple[ProxyJson, ...] = field(repr=False)
    complete: bool = True  # False: read while a split summary was being rewritten (the next read has it)


def encode_summary(replica: str, written_at: str, proxies: Sequence[ProxyJson]) -> bytes:
    """The summary as stored: compact JSON, zlib-compressed (per proxy mostly repeated versions and names)."""
    bounded = [_bound_nack(proxy) for proxy in proxies]
    body = json.dumps({"replica": replica, "written_at": written_at, "proxies": bounded}, separators=(",", ":"))
    return zlib.compress(body.encode(), 6)


def _bound_nack(proxy: ProxyJson) -> ProxyJson:
    nack = proxy.get("last_nack")
    if not nack or len(str(nack.get("message", ""))) <= MAX_NACK_MESSAGE:
        return proxy
    message = str(nack["message"])[: MAX_NACK_MESSAGE - 3] + "..."
    return {**proxy, "last_nack": {**nack, "message": message}}


def decode_summaries(values: Sequence[StoredValue]) -> list[ReplicaSummary]:
    """Every replica's summary from the values under `replicas/` (whole, or a header and its chunks)."""
    heads: dict[str, bytes] = {}
    chunks: dict[str, dict[int, bytes]] = {}
    for value in values:
        rest = value.key[len(REPLICAS_PREFIX):]
        replica, _, index = rest.partition("/")
        if not index:
            heads[replica] = value.value
        elif index.isdigit():
            chunks.setdefault(replica, {})[int(index)] = value.value
    summaries = []
    for replica, head in sorted(heads.items()):
        data: bytes | None = head
        if head[:1] != bytes([_ZLIB_MAGIC]):
            data = _join_chunks(head, chunks.get(replica, {}))
        summary = _parse(replica, data)
        summaries.append(summary)
    return summaries


def _join_chunks(head: bytes, parts: dict[int, bytes]) -> bytes | None:
    try:
        header = json.loads(head)
        count, digest = int(header["chunks"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError):
        return None
    if any(i not in parts for i in range(count)):
        return None
    data = b"".join(parts[i] for i in range(count))
    return data if hashlib.sha256(data).hexdigest() == digest else None


def _parse(replica: str, data: bytes | None) -> ReplicaSummary:
    if data is None:
        return ReplicaSummary(replica, "", (), complete=False)
    try:
        body = json.loads(zlib.decompress(data))
        return ReplicaSummary(replica, str(body.get("written_at", "")), tuple(body.get("proxies", ())))
    except (zlib.error, ValueError, TypeError, AttributeError):
        return ReplicaSummary(replica, "", (), complete=False)


def fleet_view(replica: str, local: Sequence[ProxyJson], summaries: Sequence[ReplicaSummary]) -> list[ProxyJson]:
    """/status for the fleet: this replica's own proxies (fresh) and every other replica's (as last written),
    each with a `replica` field."""
    proxies = [{**proxy, "replica": replica} for proxy in local]
    for summary in summaries:
        if summary.replica != replica:
            proxies.extend({**proxy, "replica": summary.replica} for proxy in summary.proxies)
    proxies.sort(key=lambda p: (str(p.get("node_id", "")), p["replica"], int(p.get("stream_id", 0))))
    return proxies


class RegistryPublisher:
    """Keeps `replicas/<replica-id>` in etcd equal to this replica's registry summary, under a lease it keeps alive.

    A push to thousands of streams changes the summary once per interval at most, so it costs at most one
    write per interval (plus one per extra chunk of a summary over CHUNK_BYTES). While etcd is unreachable
    nothing is written and nothing more is logged than the store's one line; a lease that expired meanwhile
    is replaced and the summary written again.
    """

    def __init__(
        self,
        store: EtcdStore,
        summary: Callable[[], list[ProxyJson]],
        changes: Callable[[], int],
        clock: Clock,
        logger: logging.Logger,
        replica_id: str | None = None,
        interval: float = DEFAULT_INTERVAL,
        chunk_bytes: int = CHUNK_BYTES,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """`summary`: the local proxies as /status shows them; `changes`: a counter that moves whenever they
        may have (ProxyRegistry.changes), so an idle replica does not even build its summary."""
        self.replica_id = replica_id or default_replica_id()
        if "/" in self.replica_id or not self.replica_id:
            raise ValueError(f"replica id {self.replica_id!r} must be non-empty and without '/'")
        self._store = store
        self._summary = summary
        self._changes = changes
        self._clock = clock
        self._log = logger
        self._interval = interval
        self._chunk_bytes = chunk_bytes
        self._sleep = sleep
        self._lease: int | None = None
        self._seen_changes: int | None = None
        self._written_digest: str | None = None
        self._written_chunks = 0
        self._loop_thread: int | None = None
        self._fleet_failing = False
        self.registry_writes = 0  # etcd requests this publisher sent (puts and deletes of its keys)
        self.last_bytes = 0  # the size of the last summary written (compressed)
        self.last_proxies = 0

    @property
    def key(self) -> str:
        return f"{REPLICAS_PREFIX}{self.replica_id}"

    @property
    def lease(self) -> int | None:
        return self._lease

    async def publish_once(self) -> bool:
        """Write the summary if it changed since the last write; True when something was written."""
        self._remember_loop()
        changes = self._changes()
        if self._lease is None:
            self._lease = await self._store.grant_lease()
            self._written_digest = None
        elif changes == self._seen_changes and self._written_digest is not None:
            return False
        proxies = await asyncio.to_thread(self._summary)
        written_at = self._clock().isoformat(timespec="seconds")
        digest_body = json.dumps(proxies, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(digest_body).hexdigest()
        if digest == self._written_digest:
            self._seen_changes = changes
            return False
        data = await asyncio.to_thread(encode_summary, self.replica_id, written_at, proxies)
        await self._write(data)  # on StoreUnavailable the same summary is tried again next time
        self._seen_changes, self._written_digest = changes, digest
        self.last_bytes, self.last_proxies = len(data), len(proxies)
        return True

    async def _write(self, data: bytes) -> None:
        assert self._lease is not None
        if len(data) <= self._chunk_bytes:
            await self._put(self.key, data)
            chunks = 0
        else:
            parts = [data[i: i + self._chunk_bytes] for i in range(0, len(data), self._chunk_bytes)]
            for index, part in enumerate(parts):
                await self._put(f"{self.key}/{index}", part)
            header = {"chunks": len(parts), "sha256": hashlib.sha256(data).hexdigest()}
            await self._put(self.key, json.dumps(header).encode())
            chunks = len(parts)
        for stale in range(chunks, self._written_chunks):
            self.registry_writes += 1
            await self._store.delete(f"{self.key}/{stale}")
        self._written_chunks = chunks

    async def _put(self, key: str, value: bytes) -> None:
        assert self._lease is not None
        self.registry_writes += 1
        await self._store.put(key, value, lease=self._lease)

    async def keep_alive(self) -> None:
        """Refresh the lease; a lease found gone (expired while etcd was away, or revoked) is replaced at the
        next publish, which writes the summary again."""
        if self._lease is not None and not await self._store.refresh_lease(self._lease):
            self._log.warning("registry lease of replica %s was gone; writing the summary again", self.replica_id)
            self._lease = None

    async def run(self) -> None:
        """Publish every interval and keep the lease alive (a third of its TTL) until cancelled."""
        refresh_every = self._store.settings.lease_ttl.total_seconds() / 3
        since_refresh = 0.0
        while True:
            try:
                if since_refresh >= refresh_every:
                    since_refresh = 0.0
                    await self.keep_alive()
                await self.publish_once()
            except StoreUnavailable:
                pass  # the store logged that etcd is unreachable (once); try again next interval
            await self._sleep(self._interval)
            since_refresh += self._interval

    async def close(self) -> None:
        """Revoke the lease: this replica leaves the fleet view at once instead of after the TTL."""
        if self._lease is not None:
            try:
                await self._store.revoke_lease(self._lease)
            except StoreUnavailable:
                pass
            self._lease = None

    # --- the fleet view ------------------------------------------------------------------------------

    async def read_fleet(self) -> list[ReplicaSummary]:
        values, _ = await self._store.get_prefix(REPLICAS_PREFIX)
        return decode_summaries(values)

    async def fleet_async(self, local: Sequence[ProxyJson]) -> list[ProxyJson]:
        return fleet_view(self.replica_id, local, await self.read_fleet())

    def fleet(self, local: list[ProxyJson]) -> list[ProxyJson]:
        """The fleet view from another thread (the admin server's): local proxies are fresh, the others as of
        their replica's last write; with etcd unreachable, this replica's own proxies only, at once (one warning per
        outage): /status and `meshca status` must not wait for the store's timeout on every call."""
        self._remember_loop()
        if self._loop_thread == threading.get_ident():  # blocking here would block the loop it needs
            return fleet_view(self.replica_id, local, ())
        if not self._store.reachable:  # known down: answer at once rather than wait out the store's timeout
            self._fleet_left_out("etcd unreachable")
            return fleet_view(self.replica_id, local, ())
        try:
            summaries = self._store.call(self.read_fleet(), timeout=FLEET_TIMEOUT)
        except (StoreUnavailable, TimeoutError) as error:
            self._fleet_left_out(str(error) or f"no answer from etcd within {FLEET_TIMEOUT:g}s")
            summaries = []
        else:
            self._fleet_failing = False
        return fleet_view(self.replica_id, local, summaries)

    def _fleet_left_out(self, why: str) -> None:
        """One warning per outage, however often /status is asked for."""
        if not self._fleet_failing:
            self._log.warning("fleet view: other replicas' proxies left out until etcd answers: %s", why)
        self._fleet_failing = True

    def _remember_loop(self) -> None:
        if self._loop_thread is None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return
            self._loop_thread = threading.get_ident()
