"""Composition root: wires the CA, the identity gate, the snapshot engine and the gRPC services."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from typing import cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshca.admin.metrics import AuditCollector, GcPauseCollector, RotationCollector, VaultCollector
from meshca.admin.server import Observability
from meshca.audit import AuditLog, AuditSink, CaTransitions
from meshca.ca import csr_service, trust_service
from meshca.ca.api import CaError, MeshCa
from meshca.ca.revocation import CrlSettings
from meshca.ca.signed import SignedLeaves
from meshca.ca.vault.session import VaultSession
from meshca.clock import Clock
from meshca.gcpolicy import CollectorPause
from meshca.identity.jwt import (
    AuthenticationError,
    IdentityGate,
    NodeBindingError,
    TokenVerifier,
    TrustedIssuer,
    VerifiedIdentity,
    check_node_binding,
)
from meshca.identity.spiffe import SpiffeId
from meshca.listen import ListenError, check_bindable, format_address
from meshca.mesh import endpoints as registration_service
from meshca.mesh.build import ResourceMemo, build_mesh
from meshca.mesh.endpoints import (
    CoalescedWork,
    RegisteredEndpoints,
    RegistrationSink,
    RegistrationTiming,
    registered_only_services,
    with_registered,
)
from meshca.mesh.model import MeshConfig
from meshca.mesh.resources import AGENT_METADATA_KEY, AGENT_METADATA_VALUE
from meshca.sds.crl import CrlAuthority, ExternalCrls, RevocationPublisher, RevocationSource
from meshca.sds.retention import IdentityRetention
from meshca.sds.rotation import ApschedulerJobs, CaWatcher, LeafRotator, RotationSettings
from meshca.sds.server_tls import ServerCredentials, ServingCertificate
from meshca.sds.server_tls import issue_server_credentials as issue_server_credentials  # for cli and dev
from meshca.sds.taint import TaintedLeaves
from meshca.sds.workloads import ForeignTrustDomain, IdentityRevoked, MeshPublisher, WorkloadSecrets
from meshca.xds.cache import SnapshotCache
from meshca.xds.server import (
    DEFAULT_FIRST_REQUEST_TIMEOUT,
    DEFAULT_MAX_STREAM_AGE,
    DEFAULT_SEND_TIMEOUT,
    MAX_REQUEST_BYTES,
    Admission,
    NodeInfo,
    StreamRefused,
    XdsServer,
)
from meshca.xds.snapshot import InconsistentSnapshot
from meshca.xds.status import ProxyRegistry

DEFAULT_IDENTITY_GRACE = timedelta(minutes=10)
# The server pings every connection this often and drops it when a ping is not answered within the timeout: a
# registering agent's host that died without closing its socket loses its endpoints within about their sum.
DEFAULT_KEEPALIVE_TIME = timedelta(seconds=4)
DEFAULT_KEEPALIVE_TIMEOUT = timedelta(seconds=3)


def crl_publishing(
    source: RevocationSource, settings: CrlSettings = CrlSettings(), external: ExternalCrls | None = None
) -> Callable[[MeshcaApp], RevocationPublisher]:
    """MeshcaApp's `revocations` for the CA (internal: state dir or ReplicatedCa; the Vault modes with Vault's CRLs
    as `external`) and its revocation list."""

    def make(app: MeshcaApp) -> RevocationPublisher:
        return RevocationPublisher(
            cast(CrlAuthority, app.ca), source, app.secrets, app.publisher, app.clock,
            app.log.getChild("revocation"), settings, app.on_revoked_identities, app.on_leaves_revoked,
            app.audit, external, signed=app.signed_leaves,
        )

    return make


class JwtStreamGate:
    """The xDS server's StreamGate: identity from the verified JWT, node bound to it, secrets ready;
    the stream's deadline is the token's expiry plus its issuer's leeway.

    A certificate that must be issued is issued on `ca_executor`, never on the event loop: a CA call
    may wait seconds on Vault, and every other stream would wait with it.
    """

    def __init__(
        self,
        identity_gate: IdentityGate,
        publisher: MeshPublisher,
        retention: IdentityRetention,
        leeways: Mapping[str, timedelta] | None = None,
        ca_executor: Executor | None = None,
        logger: logging.Logger | None = None,
        hold: Callable[[NodeInfo], Awaitable[None]] | None = None,
    ) -> None:
        """`leeways`: per issuer, how long after `exp` a token is still accepted (as the verifier does). `hold`: waited
        for before an authenticated node is served (MeshcaApp holds reconnecting proxies in its registration warmup)."""
        self._identity_gate = identity_gate
        self._hold = hold
        self._log = logger or logging.getLogger(__name__)
        self._publisher = publisher
        self._retention = retention
        self._ca_executor = ca_executor
        self._leeways = dict(leeways or {})

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> VerifiedIdentity:
        try:
            return self._identity_gate.authenticate(metadata)
        except AuthenticationError as error:
            raise StreamRefused(grpc.StatusCode.UNAUTHENTICATED, str(error)) from None

    async def admit(self, principal: object, node: NodeInfo) -> Admission:
        assert isinstance(principal, VerifiedIdentity)
        try:
            check_node_binding(principal, node.id, node.metadata)
        except NodeBindingError as error:
            raise StreamRefused(grpc.StatusCode.PERMISSION_DENIED, str(error)) from None
        spiffe_id = principal.spiffe_id
        if self._publisher.is_revoked(spiffe_id):
            raise StreamRefused(grpc.StatusCode.PERMISSION_DENIED, f"identity {spiffe_id} is revoked")
        if self._hold is not None:
            await self._hold(node)
        self._retention.opened(spiffe_id)  # before the lookup: an identity being forgotten is kept or re-issued
        try:
            ensure: Callable[[], str]
            if node.metadata.get(AGENT_METADATA_KEY) == AGENT_METADATA_VALUE:
                # Its secrets come from its local agent: a snapshot without any Secret, and no certificate issued.
                key = self._publisher.current_agent_key(spiffe_id)
                ensure = partial(self._publisher.ensure_agent_identity, spiffe_id)
            else:
                key = self._publisher.current_key(spiffe_id)
                ensure = partial(self._publisher.ensure_identity, spiffe_id, node.id)
            if key is None:
                key = await asyncio.get_running_loop().run_in_executor(self._ca_executor, ensure)
        except (ForeignTrustDomain, IdentityRevoked) as error:
            self._retention.closed(spiffe_id)
            raise StreamRefused(grpc.StatusCode.PERMISSION_DENIED, str(error)) from None
        except CaError as error:  # e.g. the intermediate expired or Vault is down: the log says which
            self._retention.closed(spiffe_id)
            self._log.error("cannot issue a certificate for %s: %s", spiffe_id, error)
            raise StreamRefused(grpc.StatusCode.UNAVAILABLE, "cannot issue a certificate now; retry later") from None
        except BaseException:
            self._retention.closed(spiffe_id)
            raise
        try:
            deadline = principal.expires_at + self._leeways.get(principal.issuer, timedelta(0))
        except OverflowError:  # exp near year 9999
            deadline = principal.expires_at
        expired = principal.expires_at.isoformat(timespec="seconds")
        return Admission(
            key,
            spiffe_id.uri,
            deadline=deadline,
            deadline_message=f"token expired at {expired}; reconnect with a fresh token",
        )

    def release(self, admission: Admission) -> None:
        self._retention.closed(SpiffeId.parse(admission.identity))


class MeshcaApp:
    """One meshca process: gRPC server with ADS/xDS/SDS, the CSR service and health."""

    def __init__(
        self,
        ca: MeshCa,
        issuers: Sequence[TrustedIssuer],
        clock: Clock,
        logger: logging.Logger,
        leaf_ttl: timedelta | None = None,
        rotation: RotationSettings = RotationSettings(),
        vault: VaultSession | None = None,
        xds_send_timeout: timedelta = DEFAULT_SEND_TIMEOUT,
        collector_pause: CollectorPause | None = None,
        identity_grace: timedelta = DEFAULT_IDENTITY_GRACE,
        xds_max_stream_age: timedelta | None = DEFAULT_MAX_STREAM_AGE,
        xds_first_request_timeout: timedelta = DEFAULT_FIRST_REQUEST_TIMEOUT,
        revocations: Callable[[MeshcaApp], RevocationPublisher] | None = None,
        audit: AuditSink | None = None,
        keepalive: tuple[timedelta, timedelta] = (DEFAULT_KEEPALIVE_TIME, DEFAULT_KEEPALIVE_TIMEOUT),
        registration: RegistrationTiming = RegistrationTiming(),
    ) -> None:
        """`collector_pause`: defers CPython's garbage collection while a push is written (default:
        one on the `gc` module, see meshca.gcpolicy). `identity_grace`: how long an identity's
        certificate is kept (and renewed) after its last stream closed. `xds_max_stream_age`: streams
        are closed with UNAVAILABLE after about this long (±10%), so proxies reconnect (None: never).
        `revocations`: makes the RevocationPublisher of the internal CA (meshca.sds.crl) from this app; it is
        started here, so the first bundle secrets carry the CRLs (None: no CRLs, nothing revocable).
        `audit`: where issuances, renewals, signed CSRs and CA transitions are recorded (an AuditLog's
        counters are also served as metrics); revocation and taint record there too (meshca.audit).
        `keepalive`: the server's HTTP/2 ping interval and ack timeout (how soon a dead peer's streams end).
        `registration`: how long ended registrations stay, and how long a restart waits for agents to register again."""
        self.ca = ca
        self.vault = vault
        self.clock = clock
        self.log = logger
        self.cache = SnapshotCache()
        self.registry = ProxyRegistry(clock)
        self.identity_gate = IdentityGate(TokenVerifier(issuers, clock, logger=logger.getChild("jwt")))
        self._leeways = {i.issuer: i.leeway for i in issuers}  # streams end at their token's exp plus this
        self.rotation = rotation
        self.audit = audit
        self.leaf_ttl = leaf_ttl
        self.secrets = WorkloadSecrets(
            ca, clock, logger.getChild("sds"), leaf_ttl, reuse_until=1 - rotation.policy.hard_zone, audit=audit
        )
        self.publisher = MeshPublisher(self.cache, self.secrets, logger.getChild("mesh"))
        self.mesh_memo = ResourceMemo()
        self.agent_mesh_memo = ResourceMemo()  # the agent-mode variant's (used under the publisher's lock)
        self.jobs = ApschedulerJobs(logger.getChild("jobs"))
        self.rotator = LeafRotator(
            self.secrets, self.publisher, self.jobs, rotation.policy, clock, logger.getChild("rotation")
        )
        self.secrets.set_issue_listener(self.rotator.on_issued)
        # Forgetting runs on the scheduler's one worker, so it never overlaps a renewal.
        self.retention = IdentityRetention(
            (self.rotator, self.secrets, self.publisher), self.jobs, identity_grace, clock, logger.getChild("sds")
        )
        # CA calls (issuing, signing CSRs) run here, off the event loop: Vault may take seconds.
        self.ca_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="meshca-ca")
        self.ca_watcher = CaWatcher(
            ca, self.publisher, self.rotator, rotation, clock, logger.getChild("ca"),
            audit=None if audit is None else CaTransitions(ca, audit),
        )
        self.collector_pause = collector_pause if collector_pause is not None else CollectorPause()
        self.xds = XdsServer(
            self.cache,
            JwtStreamGate(
                self.identity_gate,
                self.publisher,
                self.retention,
                self._leeways,
                self.ca_executor,
                logger.getChild("gate"),
                hold=self._hold_in_warmup,
            ),
            self.registry,
            logger.getChild("xds"),
            send_timeout=xds_send_timeout,
            collector_pause=self.collector_pause,
            max_stream_age=xds_max_stream_age,
            first_request_timeout=xds_first_request_timeout,
            clock=clock,
        )
        self.observability = Observability(self.registry, self.secrets, self.publisher, clock, logger.getChild("admin"))
        self.observability.add_collector(
            RotationCollector(ca, self.secrets, self.rotator, self.ca_watcher, clock)
        )
        self.observability.add_collector(GcPauseCollector(self.collector_pause))
        if vault is not None:
            self.observability.add_collector(VaultCollector(vault, clock))
        if isinstance(audit, AuditLog):
            self.observability.add_collector(AuditCollector(audit))
        self.health = health.HealthServicer()
        self._mesh_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # the serving loop, once started
        self._mesh_config: MeshConfig | None = None
        self._denied_uris: frozenset[str] = frozenset()
        self.keepalive = keepalive
        self.registration_timing = registration
        self._warmup_ends: float | None = None  # event-loop time; set when serving starts
        # Registered endpoints (meshca.v1.EndpointService): merged into EDS; `registration_sink` is where a stream's
        # registration is written (these, or the HA store, whose watch then fills these: meshca.store.endpoints).
        # Many agents registering at once rebuild the mesh once per 100 ms at most, not once each (CoalescedWork).
        self.endpoint_rebuilds = CoalescedWork(
            partial(self._rebuild, "an endpoint registration"), logger.getChild("endpoints")
        )
        self.endpoints = RegisteredEndpoints(self._on_endpoints_changed)
        self.registration_sink: RegistrationSink = self.endpoints
        self.revocations: RevocationPublisher | None = None
        self.tainted: TaintedLeaves | None = None
        # GetBundle and WatchTrust (node agents follow the bundle and CRLs the ROOTCA secret carries)
        self.trust = trust_service.TrustBundleServicer(ca, material=self.secrets.trust_material)
        # What the CSR service signed (node agents' leaves): a revoked identity's are put on the CRLs too.
        self.signed_leaves = SignedLeaves(clock, logger.getChild("csr"))
        if revocations is not None:
            self.revocations = revocations(self)
            self.revocations.start()
            self.tainted = TaintedLeaves(
                cast(CrlAuthority, ca), self.secrets, self.rotator, rotation, clock, logger.getChild("taint")
            )
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.server_certificate: ServingCertificate | None = None

    def apply_mesh_config(self, config: MeshConfig) -> str:
        """Derive resources from the mesh model and publish them; the last good stays on error."""
        if config.trust_domain != self.ca.trust_domain:
            raise InconsistentSnapshot(
                [f"mesh trust_domain {config.trust_domain!r} is not the CA's trust domain {self.ca.trust_domain!r}"]
            )
        with self._mesh_lock:
            self._publish_locked(config)
            self._mesh_config = config
            return self.publisher.mesh_version()

    def _publish_locked(self, config: MeshConfig) -> None:
        """Build and publish `config` with what is in effect now: registered endpoints, revoked identities, and the
        agent-mode variant for identities that have agent-mode nodes (the caller holds the mesh lock)."""
        merged = with_registered(config, self.endpoints.snapshot())
        mesh = build_mesh(merged, self.mesh_memo, denied_spiffe_ids=self._denied_uris)
        agent_mesh = partial(
            build_mesh, merged, self.agent_mesh_memo, denied_spiffe_ids=self._denied_uris, secrets_from_agent=True
        )
        self.publisher.set_mesh(mesh, agent_mesh)

    def _rebuild(self, why: str) -> None:
        """Publish the last applied config again with what changed (under the lock: a mesh file applied meanwhile
        is the one rebuilt, never overwritten by an older one)."""
        with self._mesh_lock:
            if self._mesh_config is None:
                return
            try:
                self._publish_locked(self._mesh_config)
            except InconsistentSnapshot as error:  # cannot happen: the config applied before, only `why` changed
                self.log.error("mesh not rebuilt after %s: %s", why, error)

    @property
    def mesh_config(self) -> MeshConfig | None:
        """The mesh file's model last applied (without registered endpoints). Read without the mesh lock (one
        reference: atomic), so a registration is checked while a rebuild holds the lock on a worker thread."""
        return self._mesh_config

    async def _hold_in_warmup(self, node: NodeInfo) -> None:
        """A proxy coming back with config, while meshca has just started and its mesh has registered-only services,
        waits until the warmup ends: the agents register again meanwhile, so it is not told those services have no
        endpoints (it keeps routing with what it has). A proxy's first start, and any stream after the warmup, is not
        held. (`meshca serve` applies its mesh before it starts serving.)"""
        if not node.resumed or self._warmup_ends is None:
            return
        remaining = self._warmup_ends - asyncio.get_running_loop().time()
        if remaining > 0 and registered_only_services(self.mesh_config):
            self.log.debug("node %.64r reconnects within the registration warmup: served in %.1f s", node.id, remaining)
            await asyncio.sleep(remaining)

    def _on_endpoints_changed(self) -> asyncio.Future[None] | None:
        return self.endpoint_rebuilds.request()

    def on_revoked_identities(self, denied: frozenset[SpiffeId], newly: frozenset[SpiffeId]) -> None:
        """The revoked identities changed: newly revoked ones lose their certificate here (no renewal, no
        snapshot), and the mesh is rebuilt so every sidecar refuses their requests."""
        for spiffe_id in newly:
            self.rotator.forget(spiffe_id)
            self.publisher.forget(spiffe_id)
            self.secrets.forget(spiffe_id)
            self.log.info("identity %s revoked: its certificate is no longer served or renewed", spiffe_id)
            self._close_streams_of(spiffe_id)
        with self._mesh_lock:
            self._denied_uris = frozenset(spiffe_id.uri for spiffe_id in denied)
        self._rebuild("a revocation")

    def on_leaves_revoked(self, identities: frozenset[SpiffeId]) -> None:
        """Certificates held for these identities were revoked (by serial): renew them now, so that their sidecars
        present a certificate the CRLs do not list."""
        for spiffe_id in identities:
            self.log.info("the certificate of %s was revoked: renewing it now", spiffe_id)
            self.rotator.renew_soon(spiffe_id)

    def _close_streams_of(self, spiffe_id: SpiffeId) -> None:
        """End a revoked identity's xDS streams (PERMISSION_DENIED): its proxies keep what they have, are refused
        while it stays revoked, and get a certificate again on their next attempt after `meshca unrevoke`."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(
                self.xds.close_identity, spiffe_id.uri, grpc.StatusCode.PERMISSION_DENIED, f"identity {spiffe_id} is revoked"
            )

    def _check_ca(self) -> None:
        """The CA check, then the CRLs, then the leaves of tainted intermediates (in this order, on the scheduler's
        one worker: see RevocationPublisher and meshca.sds.taint)."""
        self.ca_watcher.check()
        if self.revocations is not None:
            self.revocations.check()
            if self.tainted is not None:
                self.tainted.check(self.revocations.revocations)
        self.trust.poke()  # the bundle and the CRLs change here: agents' watches look now

    def record_rejected(self) -> None:
        self.publisher.record_rejected()

    async def start(
        self,
        host: str,
        port: int,
        credentials: ServingCertificate | ServerCredentials | None,
        admin_port: int | None = None,
        admin_address: str = "127.0.0.1",
        *,
        share_port: bool = False,
    ) -> int:
        """Bind and start serving; `credentials=None` serves plaintext (tests only). Returns the port.

        A ServingCertificate is checked by a job every `ca_check_interval` (renewed, or re-read from its
        files) and a new one is served to new connections; plain ServerCredentials are served as they are.

        With `admin_port`, /metrics, /status and /healthz are served over HTTP on `admin_address`.
        A port already taken raises ListenError (naming `listen` or `metrics_port`) before anything
        starts; `share_port` lets several processes listen on the same port on purpose (SO_REUSEPORT).
        """
        if not share_port:
            check_bindable("listen", host, port)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.keepalive_time_ms", int(self.keepalive[0].total_seconds() * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive[1].total_seconds() * 1000)),
                # grpc-core 1.85 waits for a ping's ack this long (keepalive_timeout alone did not end the connection)
                ("grpc.http2.ping_timeout_ms", int(self.keepalive[1].total_seconds() * 1000)),
                ("grpc.http2.max_pings_without_data", 0),  # keep pinging idle connections (registrations)
                # proxies ping every 10 s (+-15 %) to notice a hung replica (meshca.node.bootstrap)
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.so_reuseport", int(share_port)),
            ]
        )
        self.xds.add_to_server(server)
        csr_executor = self.ca_executor if self.ca.signs_remotely else None
        csr_service.add_to_server(
            server,
            csr_service.CertificateServicer(
                self.identity_gate, self.ca, ca_executor=csr_executor, revoked=self.secrets.is_denied, audit=self.audit,
                default_ttl=self.leaf_ttl, signed=self.signed_leaves if self.revocations is not None else None,
            ),
        )
        trust_service.add_to_server(server, self.trust)
        registration_service.add_to_server(
            server,
            registration_service.EndpointServicer(
                self.identity_gate, self.registration_sink, lambda: self.mesh_config,
                self.log.getChild("endpoints"), revoked=self.secrets.is_denied, grace=self.registration_timing.grace,
                leeways=self._leeways, clock=self.clock,
            ),
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = format_address(host, port)
        try:
            if credentials is None:
                bound = server.add_insecure_port(address)
            else:
                if isinstance(credentials, ServerCredentials):
                    credentials = ServingCertificate(credentials, self.log.getChild("tls"))
                self.server_certificate = credentials
                bound = server.add_secure_port(address, credentials.server_credentials())
        except RuntimeError:  # grpc raises "Failed to bind" (older versions return 0)
            bound = 0
        if not bound:
            await server.stop(None)
            raise ListenError(f"listen: cannot listen on {address}")
        if admin_port is not None:
            try:
                self.observability.start(admin_address, admin_port)
            except ListenError:
                await server.stop(None)
                raise
        await server.start()
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._warmup_ends = self._loop.time() + self.registration_timing.warmup.total_seconds()
        self.jobs.every("ca-watch", self.rotation.ca_check_interval.total_seconds(), self._check_ca)
        if self.server_certificate is not None:
            self.jobs.every(
                "server-certificate", self.rotation.ca_check_interval.total_seconds(), self.server_certificate.check
            )
        if self.vault is not None:
            self.jobs.every("vault-token", 2.0, self.vault.maintain)
        self.jobs.start()
        self.port = bound
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.log.info("meshca serving on %s:%d (tls=%s)", host, bound, credentials is not None)
        return bound

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving: xDS streams end at once with UNAVAILABLE (proxies reconnect elsewhere); other
        calls get up to `grace` seconds."""
        if self._server is not None:
            self.health.enter_graceful_shutdown()
            self.xds.shutdown()
            self.trust.close()
            await self._server.stop(grace)
            self._server = None
            self.observability.stop()
            self.jobs.shutdown()
            self.ca_executor.shutdown(wait=False, cancel_futures=True)
            self.identity_gate.close()
            self.log.info("meshca stopped")
