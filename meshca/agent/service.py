"""The node agent: every configured workload's identity (meshca.agent.workload) and SDS socket (meshca.agent.sds)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

from meshca.agent.channels import ReplicaChannels
from meshca.agent.csr import CsrClient
from meshca.agent.discovery import WorkloadDirectory
from meshca.agent.registration import CHANNEL_OPTIONS, Endpoint, Registered, keep_registered
from meshca.agent.sds import WorkloadSocket
from meshca.agent.settings import AgentSettings, WorkloadSettings
from meshca.agent.trust import TrustAnchor, TrustMaterial, follow_trust
from meshca.agent.workload import Retry, Served, Signer, WorkloadIdentity
from meshca.backoff import backoff_delay
from meshca.clock import Clock
from meshca.sds.rotation import RenewalPolicy
from meshca.xds.cache import SnapshotCache


@dataclass(frozen=True)
class EndpointsState:
    """A workload's endpoints to register, and what meshca accepted while its stream holds (None: not registered)."""

    endpoints: tuple[Endpoint, ...]
    registered: Registered | None = None


@dataclass(frozen=True)
class WorkloadStatus:
    name: str
    socket: str
    served: Served | None
    issued: int
    failures: int
    streams: int
    last_failure: str | None = None  # why its CSRs fail, while they do
    endpoints: EndpointsState | None = None  # None: it has no endpoints to register


class NodeAgent:
    """Starts each workload's socket, keeps each one's certificate current, and stops them all."""

    def __init__(
        self,
        settings: AgentSettings,
        clock: Clock,
        logger: logging.Logger,
        signer: Signer | None = None,
        policy: RenewalPolicy = RenewalPolicy(),
        retry: Retry = Retry(),
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`signer`: how CSRs reach meshca (default: a CsrClient over the settings' addresses)."""
        self.settings = settings
        self._log = logger
        self._sleep = sleep
        self.cache = SnapshotCache()
        # the roots meshca is verified with: the `ca` file plus the bundle followed from meshca (meshca.agent.trust)
        self.anchor = TrustAnchor(settings.ca)
        self.trust: TrustMaterial | None = None
        # one TLS channel per replica for all of this agent's calls: CSRs, registration streams, the trust stream
        self.channels = ReplicaChannels(settings.meshca, settings.server_name, self.anchor.roots, CHANNEL_OPTIONS)
        if signer is None:
            signer = CsrClient(settings.meshca, settings.server_name, settings.ca, settings.timeout,
                               roots=self.anchor.roots, channels=self.channels)
        rng = rng if rng is not None else random.Random()
        self._signer, self._clock, self._policy, self._retry, self._rng = signer, clock, policy, retry, rng
        self.identities = [self._identity(w) for w in settings.workloads]
        self.sockets = [self._socket(w) for w in settings.workloads]
        self._tasks: list[asyncio.Task[None]] = []
        # Workloads added while running (workloads_dir): their certificate task and their registration task.
        self._added: dict[str, asyncio.Task[None]] = {}
        self._registrations: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self._endpoints: dict[str, EndpointsState] = {}  # by workload, while its registration task runs
        self.running = False  # from start() until stop()
        self.directory = (
            WorkloadDirectory(settings.workloads_dir, self, clock, logger.getChild("workloads_dir"),
                              [w.name for w in settings.workloads])
            if settings.workloads_dir is not None else None
        )

    def _socket(self, workload: WorkloadSettings) -> WorkloadSocket:
        return WorkloadSocket(workload, self.cache, self._clock, self._log.getChild(workload.name))

    def _identity(self, workload: WorkloadSettings) -> WorkloadIdentity:
        return WorkloadIdentity(
            workload, self._signer, self.cache, self._clock, self._log.getChild(workload.name), self._policy,
            self._retry, self.settings.ttl, random.Random(self._rng.random()),
        )

    async def start(self) -> None:
        """Listen on every socket (Envoy may connect at once: its streams wait for the first certificate),
        then start asking meshca for certificates."""
        started: list[WorkloadSocket] = []
        try:
            for workload_socket in self.sockets:
                await workload_socket.start()
                started.append(workload_socket)
        except BaseException:
            for workload_socket in started:
                await workload_socket.stop()
            raise
        self._tasks = [
            asyncio.create_task(identity.run(self._sleep), name=f"agent-{identity.name}") for identity in self.identities
        ]
        self._tasks.append(asyncio.create_task(self._follow_trust(), name="agent-trust"))
        for workload in self.settings.workloads:
            if workload.endpoints:
                self._register(workload)
        if self.directory is not None:
            self._tasks.append(asyncio.create_task(self.directory.run(self._sleep), name="agent-workloads-dir"))
        self.running = True

    async def wait_served(self, timeout: float | None = None) -> None:
        """Until every workload has had a certificate (asyncio.TimeoutError after `timeout` seconds)."""
        await asyncio.wait_for(asyncio.gather(*(i.first_served.wait() for i in self.identities)), timeout)

    async def stop(self) -> None:
        self.running = False
        tasks = [*self._tasks, *self._added.values(), *(task for task, _ in self._registrations.values())]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._added.clear()
        self._registrations.clear()
        for workload_socket in self.sockets:
            await workload_socket.stop()
        await self.channels.close()

    async def _follow_trust(self) -> None:
        """Serve meshca's bundle and CRLs as every workload's ROOTCA as they change (WatchTrust), until cancelled."""
        await follow_trust(self.channels.targets, self.channels.connect, self._on_trust, self._log.getChild("trust"),
                           anchor=self.anchor, sleep=self._sleep, shared_channels=True)

    def _on_trust(self, material: TrustMaterial) -> None:
        self.trust = material
        for identity in self.identities:
            identity.set_trust(material.bundle_pem, material.crls_pem)

    async def add_workload(self, workload: WorkloadSettings) -> None:
        """Serve one more workload while running: its socket (SocketError if it cannot be served), then its
        certificate and its endpoints."""
        if any(s.settings.name == workload.name for s in self.sockets):
            raise ValueError(f"workload {workload.name!r} is already served")
        workload_socket = self._socket(workload)
        await workload_socket.start()
        identity = self._identity(workload)
        if self.trust is not None:  # what every other workload's ROOTCA has now
            identity.set_trust(self.trust.bundle_pem, self.trust.crls_pem)
        self.identities.append(identity)
        self.sockets.append(workload_socket)
        self._added[workload.name] = asyncio.create_task(identity.run(self._sleep), name=f"agent-{workload.name}")
        if workload.endpoints:
            self._register(workload)

    async def remove_workload(self, name: str) -> None:
        """Stop serving a workload added by add_workload: its registration ends (its endpoints leave EDS), its
        socket is closed and removed, and its key and certificate are dropped from memory."""
        await self._withdraw(name)
        tasks = [t for t in (self._added.pop(name, None),) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        index = next((i for i, s in enumerate(self.sockets) if s.settings.name == name), None)
        if index is None:
            return
        del self.identities[index]
        workload_socket = self.sockets.pop(index)
        await workload_socket.stop()
        self.cache.remove(name)

    async def set_endpoints(self, name: str, endpoints: Sequence[Endpoint]) -> None:
        """Register `endpoints` for a workload added by add_workload instead of what it had (none: deregistered)."""
        await self._withdraw(name)
        workload_socket = next(s for s in self.sockets if s.settings.name == name)
        if endpoints:
            self._register(replace(workload_socket.settings, endpoints=tuple(endpoints)))

    def _register(self, workload: WorkloadSettings) -> None:
        identity = next(i for i in self.identities if i.name == workload.name)
        withdraw = asyncio.Event()
        task = asyncio.create_task(
            self._keep_registered(workload, identity.first_served, withdraw), name=f"agent-{workload.name}-endpoints"
        )
        self._registrations[workload.name] = (task, withdraw)

    async def _withdraw(self, name: str) -> None:
        """End a workload's registration, its endpoints out of EDS at once (not after meshca's grace: it is gone)."""
        registration = self._registrations.pop(name, None)
        if registration is None:
            return
        task, withdraw = registration
        withdraw.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 3.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _keep_registered(
        self, workload: WorkloadSettings, served: asyncio.Event, withdraw: asyncio.Event | None = None
    ) -> None:
        """Keep `workload`'s endpoints registered with meshca (over the agent's channels, as the CSRs) until cancelled,
        from when the agent first has a certificate to serve for it (before that its sidecar cannot take a call).

        Refusals and outages are logged by keep_registered and retried there with capped backoff; this task
        never ends on its own, so neither the agent nor its SDS is affected by them. Whether meshca holds them
        is in status() meanwhile."""
        log = self._log.getChild(workload.name)
        endpoints = list(workload.endpoints)
        name = workload.name
        self._endpoints[name] = EndpointsState(workload.endpoints)

        def accepted(registered: Registered) -> None:
            self._endpoints[name] = EndpointsState(workload.endpoints, registered)

        def lost(_: str) -> None:
            self._endpoints[name] = EndpointsState(workload.endpoints)

        try:
            await served.wait()
            attempt = 0
            while True:
                try:
                    self.channels.current()  # made once the roots can be read; kept (or made anew) after
                    break
                except OSError as error:
                    attempt += 1
                    delay = backoff_delay(attempt, timedelta(seconds=1), timedelta(seconds=30))
                    log.error("endpoint registration: cannot read ca %s (%s); retrying in %.1f s",
                              self.settings.ca, error.strerror, delay.total_seconds())
                    await self._sleep(delay.total_seconds())
            await keep_registered(self.channels, workload.token_file, endpoints, log, sleep=self._sleep,
                                  token_no_symlink=workload.token_no_symlink, withdraw=withdraw,
                                  on_registered=accepted, on_lost=lost)
        finally:
            self._endpoints.pop(name, None)

    def status(self) -> list[WorkloadStatus]:
        """Every served workload's state; also from another thread (the admin endpoint's, meshca.agent.admin): the
        lists change on the event loop, so it reads copies and pairs them by name."""
        identities, sockets, endpoints = list(self.identities), list(self.sockets), dict(self._endpoints)
        socket_of = {s.settings.name: s for s in sockets}
        return [
            WorkloadStatus(
                i.name, str(s.path), i.served, i.issued, i.failures, len(s.registry.snapshot()), i.last_failure,
                endpoints.get(i.name),
            )
            for i in identities
            if (s := socket_of.get(i.name)) is not None  # else being added or removed right now
        ]

    def ended_tasks(self) -> list[str]:
        """The names of this agent's tasks that ended while it runs (they never end on their own: a bug); also
        from another thread."""
        if not self.running:
            return []
        registrations = [task for task, _ in list(self._registrations.values())]
        return [t.get_name() for t in [*list(self._tasks), *list(self._added.values()), *registrations] if t.done()]
