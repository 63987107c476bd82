"""Registered endpoints in etcd: each replica writes its streams' registrations under its own lease, and every
replica follows `endpoints/`, so EDS is the same on every replica."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

from meshca.mesh.endpoints import (
    MAX_ENDPOINTS_PER_REQUEST,
    EndpointRefused,
    RegisteredEndpoints,
    Registration,
    check_registration,
)
from meshca.mesh.model import MeshConfig
from meshca.store.etcd import EtcdStore, StoreUnavailable
from meshca.store.tasks import stop_tasks

ENDPOINTS_PREFIX = "endpoints/"  # endpoints/<replica-id>/<registration-id>: JSON of Registration.to_json
DEFAULT_RETRY = 1.0  # seconds between write attempts while etcd does not answer
_MAX_LOGGED = 200  # characters of a bad stored value's reason in one log line


def registration_key(replica_id: str, registration_id: str) -> str:
    return f"{ENDPOINTS_PREFIX}{replica_id}/{registration_id}"


def parse_stored(key: str, raw: bytes, mesh: MeshConfig | None) -> tuple[Registration | None, str | None]:
    """The registration stored under `key` and why it does not count (None: it does). A value that is not what
    `to_json` writes, or holds a malformed endpoint, is (None, why); one of a service the mesh does not give its
    identity is returned with the reason (EDS leaves it out, as it does a local one, until the mesh gives it)."""
    rest = key[len(ENDPOINTS_PREFIX):]
    replica, _, registration_id = rest.partition("/")
    if not replica or not registration_id or "/" in registration_id:
        return None, "not endpoints/<replica-id>/<registration-id>"
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        registration = Registration.from_json(data)
    except (ValueError, KeyError, TypeError) as error:
        return None, f"not a registration ({type(error).__name__}: {error})"
    if len(registration.endpoints) > MAX_ENDPOINTS_PER_REQUEST:
        return None, f"{len(registration.endpoints)} endpoints, at most {MAX_ENDPOINTS_PER_REQUEST}"
    canonical = []
    for i, endpoint in enumerate(registration.endpoints):  # what EDS needs, whatever the mesh says
        try:
            address = str(ipaddress.ip_address(endpoint.address))
        except ValueError:
            return None, f"endpoints[{i}].address: {endpoint.address[:64]!r} is not an IP address"
        if not 1 <= endpoint.port <= 65535:
            return None, f"endpoints[{i}].port: {endpoint.port} is not 1-65535"
        canonical.append(replace(endpoint, address=address))
    registration = replace(registration, endpoints=tuple(canonical))
    try:
        check_registration(mesh, registration.spiffe_id, registration.endpoints)
    except EndpointRefused as refused:
        return registration, refused.message
    return registration, None


class StoredRegistrations:
    """The RegistrationSink of a replica with `store:` (meshca.mesh.endpoints.RegistrationSink).

    `put`/`remove` change this replica's live registrations in memory, publish them at once (a stream's answer
    means its endpoints are in this replica's EDS) and wake the writer, which makes `endpoints/<replica-id>/...`
    in etcd equal to them under this replica's lease (refreshed every third of `lease_ttl`; one found gone is
    replaced and every live registration written again). While etcd does not answer, the writes wait (one log
    line per outage) and are made when it is back. Only this replica's keys are ever written or deleted: a replica
    that was stopped (SIGSTOP) and wakes finds its lease gone and cannot touch what others registered meanwhile.

    The follower feeds everything under `endpoints/` to `local` (RegisteredEndpoints.replace_all); this replica's
    own keys are taken from memory instead (they are newer). A replica killed with -9 stops refreshing its lease:
    its keys expire with it, and its agents register again at another replica meanwhile.

    Create with `await StoredRegistrations.open(...)` on the store's loop; `stop()` ends the tasks and leaves the
    keys to expire with the lease (at shutdown the streams end, and agents re-register elsewhere before then).
    """

    def __init__(
        self,
        store: EtcdStore,
        replica_id: str,
        local: RegisteredEndpoints,
        mesh: Callable[[], MeshConfig | None],
        logger: logging.Logger,
        retry: float = DEFAULT_RETRY,
    ) -> None:
        if not replica_id or "/" in replica_id:
            raise ValueError(f"replica id {replica_id!r} must be non-empty and without '/'")
        self.replica_id = replica_id
        self._store = store
        self._local = local
        self._mesh = mesh
        self._log = logger
        self._retry = retry
        self._own = f"{replica_id}/"
        self._live: dict[str, Registration] = {}  # this replica's streams, by registration id
        self._written: dict[str, Registration] = {}  # what etcd holds of them under `_lease`
        self._stored: dict[str, Registration] = {}  # everything under endpoints/, by "<replica-id>/<registration-id>"
        self._bad: dict[str, int] = {}  # keys whose value did not count, by the mod revision logged
        self._revision = 0
        self._lease: int | None = None
        self._check_lease = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.failing = False  # etcd did not take the last writes (they are retried)

    @classmethod
    async def open(
        cls,
        store: EtcdStore,
        replica_id: str,
        local: RegisteredEndpoints,
        mesh: Callable[[], MeshConfig | None],
        logger: logging.Logger,
        retry: float = DEFAULT_RETRY,
    ) -> StoredRegistrations:
        """Read what etcd holds (StoreUnavailable when it does not answer), then start writing and following."""
        sink = cls(store, replica_id, local, mesh, logger, retry)
        await sink.sync()
        sink.start()
        return sink

    def start(self) -> None:
        if not self._tasks:
            self._wake.set()
            self._tasks = [asyncio.create_task(self._write_loop(), name="endpoints-store-writer"),
                           asyncio.create_task(self._follow(), name="endpoints-store-watch")]

    async def stop(self) -> None:
        await stop_tasks(self._tasks, self._log)
        self._tasks = []

    # --- the sink ------------------------------------------------------------------------------------

    async def put(self, registration_id: str, registration: Registration) -> None:
        self._live[registration_id] = registration
        self._wake.set()
        await self._publish()

    async def remove(self, registration_id: str) -> None:
        if self._live.pop(registration_id, None) is not None:
            self._wake.set()
            await self._publish()

    def live(self) -> Mapping[str, Registration]:
        return dict(self._live)

    # --- the writer ----------------------------------------------------------------------------------

    async def write_once(self) -> None:
        """Make etcd hold exactly the live registrations under this replica's keys (StoreUnavailable: not yet)."""
        if self._check_lease and self._lease is not None:
            self._check_lease = False
            if not await self._store.refresh_lease(self._lease):
                self._lease_gone()
        if self._lease is None:
            if not self._live:
                return
            self._lease = await self._store.grant_lease()
            self._written = {}
        for registration_id in [r for r in self._written if r not in self._live]:
            await self._store.delete(registration_key(self.replica_id, registration_id))
            del self._written[registration_id]
        for registration_id, registration in list(self._live.items()):
            if self._written.get(registration_id) != registration:
                value = json.dumps(registration.to_json(), separators=(",", ":")).encode()
                await self._store.put(registration_key(self.replica_id, registration_id), value, lease=self._lease)
                self._written[registration_id] = registration

    def _lease_gone(self) -> None:
        self._log.warning("endpoint lease of replica %s was gone; writing its %d registration(s) again",
                          self.replica_id, len(self._live))
        self._lease = None
        self._written = {}

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        refresh_every = self._store.settings.lease_ttl.total_seconds() / 3
        next_refresh = loop.time() + refresh_every
        while True:
            try:
                async with asyncio.timeout(max(next_refresh - loop.time(), 0)):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if loop.time() >= next_refresh:  # also right after a SIGSTOP ends: the lease is checked before writing
                next_refresh = loop.time() + refresh_every
                self._check_lease = True
            try:
                await self.write_once()
            except StoreUnavailable as error:
                if not self.failing:
                    self._log.warning("endpoint registrations not written to etcd, retrying every %gs (those in "
                                      "memory keep serving): %s", self._retry, error)
                self.failing = True
                self._check_lease = True  # a write refused for an expired lease looks the same: check it first
                await asyncio.sleep(self._retry)
                self._wake.set()
                continue
            if self.failing:
                self._log.info("endpoint registrations of replica %s written to etcd again (%d live)",
                               self.replica_id, len(self._live))
            self.failing = False

    # --- the follower --------------------------------------------------------------------------------

    async def sync(self) -> None:
        """Read everything under `endpoints/` and publish it (StoreUnavailable when etcd does not answer)."""
        values, revision = await self._store.get_prefix(ENDPOINTS_PREFIX)
        stored: dict[str, Registration] = {}
        for value in values:
            registration = self._parse(value.key, value.value, value.mod_revision)
            if registration is not None:
                stored[value.key[len(ENDPOINTS_PREFIX):]] = registration
        self._stored, self._revision = stored, revision
        self._publish_soon()

    async def _follow(self) -> None:
        """Apply every change under `endpoints/` (until cancelled); after a watch that ended, read everything again."""
        failing = False
        while True:
            try:
                async for events in self._store.watch_prefix(ENDPOINTS_PREFIX, self._revision + 1):
                    for event in events:
                        name = event.key[len(ENDPOINTS_PREFIX):]
                        registration = (None if event.value is None else
                                        self._parse(event.key, event.value, event.revision))
                        if registration is None:
                            self._stored.pop(name, None)
                        else:
                            self._stored[name] = registration
                    self._revision = events[-1].revision
                    self._publish_soon()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._log.debug("endpoints watch ended: %s", error)
            await asyncio.sleep(self._retry)
            try:
                await self.sync()
                failing = False
            except StoreUnavailable as error:
                if not failing:
                    self._log.error("cannot read endpoints/ from etcd; the registrations known keep serving: %s", error)
                failing = True

    def _parse(self, key: str, raw: bytes, revision: int) -> Registration | None:
        registration, why = parse_stored(key, raw, self._mesh())
        if why is None:
            self._bad.pop(key, None)
        elif self._bad.get(key) != revision:  # one line per bad value, not per re-read
            self._bad[key] = revision
            why = " ".join(why.split())
            if len(why) > _MAX_LOGGED:
                why = why[: _MAX_LOGGED - 3] + "..."
            what = "skipped" if registration is None else "left out of EDS while the mesh does not allow it"
            self._log.warning("%s%s (revision %d) %s: %s", self._store.settings.prefix + "/", key[:_MAX_LOGGED],
                              revision, what, why)
        return registration

    # --- what this replica serves --------------------------------------------------------------------

    def view(self) -> dict[str, Registration]:
        """Every replica's registrations as etcd has them, this replica's own as memory has them."""
        merged = {name: r for name, r in self._stored.items() if not name.startswith(self._own)}
        merged.update({self._own + registration_id: r for registration_id, r in self._live.items()})
        return merged

    async def _publish(self) -> None:
        waiting = self._local.replace_all(self.view())
        if waiting is not None:
            await waiting

    def _publish_soon(self) -> None:
        self._local.replace_all(self.view())  # the rebuild runs on its own (CoalescedWork); the watch goes on
