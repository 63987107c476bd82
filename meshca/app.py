"""Composition root: wires the CA, the identity gate, the snapshot engine and the gRPC services."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshca import csr_service
from meshca.ca import CaError, CertificateAuthority
from meshca.clock import Clock
from meshca.gcpolicy import CollectorPause
from meshca.jwtgate import (
    AuthenticationError,
    IdentityGate,
    NodeBindingError,
    TokenVerifier,
    TrustedIssuer,
    VerifiedIdentity,
    check_node_binding,
)
from meshca.listen import ListenError, check_bindable, format_address
from meshca.meshbuild import ResourceMemo, build_mesh
from meshca.meshconfig import MeshConfig
from meshca.observability import GcPauseCollector, Observability, RotationCollector, VaultCollector
from meshca.rotation import ApschedulerJobs, CaWatcher, LeafRotator, RotationSettings
from meshca.snapshot import InconsistentSnapshot, SnapshotCache
from meshca.vault import VaultSession
from meshca.workloads import ForeignTrustDomain, MeshPublisher, WorkloadSecrets
from meshca.xds.server import (
    DEFAULT_SEND_TIMEOUT,
    MAX_REQUEST_BYTES,
    Admission,
    NodeInfo,
    StreamRefused,
    XdsServer,
)
from meshca.xds.status import ProxyRegistry


class JwtStreamGate:
    """The xDS server's StreamGate: identity from the verified JWT, node bound to it, secrets ready."""

    def __init__(self, identity_gate: IdentityGate, publisher: MeshPublisher) -> None:
        self._identity_gate = identity_gate
        self._publisher = publisher

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
        try:
            key = self._publisher.ensure_identity(principal.spiffe_id)
        except ForeignTrustDomain as error:
            raise StreamRefused(grpc.StatusCode.PERMISSION_DENIED, str(error)) from None
        except CaError as error:  # e.g. the intermediate expired: say so rather than fail obscurely
            raise StreamRefused(grpc.StatusCode.UNAVAILABLE, f"cannot issue a certificate now: {error}") from None
        return Admission(key, principal.spiffe_id.uri)


@dataclass(frozen=True)
class ServerCredentials:
    certificate_chain_pem: bytes
    private_key_pem: bytes


def issue_server_credentials(ca: CertificateAuthority, names: Sequence[str], ttl: timedelta) -> ServerCredentials:
    """A TLS certificate for meshca's own gRPC endpoint, from its own CA."""
    dns_names, ips = [], []
    for name in names:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns_names.append(name)
    issued = ca.issue_server_certificate(dns_names, ips, ttl)
    assert issued.private_key_pem is not None
    return ServerCredentials(issued.chain_pem, issued.private_key_pem)


class MeshcaApp:
    """One meshca process: gRPC server with ADS/xDS/SDS, the CSR service and health."""

    def __init__(
        self,
        ca: CertificateAuthority,
        issuers: Sequence[TrustedIssuer],
        clock: Clock,
        logger: logging.Logger,
        leaf_ttl: timedelta | None = None,
        rotation: RotationSettings = RotationSettings(),
        vault: VaultSession | None = None,
        xds_send_timeout: timedelta = DEFAULT_SEND_TIMEOUT,
        collector_pause: CollectorPause | None = None,
    ) -> None:
        """`collector_pause`: defers CPython's garbage collection while a push is written (default:
        one on the `gc` module, see meshca.gcpolicy)."""
        self.ca = ca
        self.vault = vault
        self.clock = clock
        self.log = logger
        self.cache = SnapshotCache()
        self.registry = ProxyRegistry(clock)
        self.identity_gate = IdentityGate(TokenVerifier(issuers, clock, logger=logger.getChild("jwt")))
        self.rotation = rotation
        self.secrets = WorkloadSecrets(
            ca, clock, logger.getChild("sds"), leaf_ttl, reuse_until=1 - rotation.policy.hard_zone
        )
        self.publisher = MeshPublisher(self.cache, self.secrets, logger.getChild("mesh"))
        self.mesh_memo = ResourceMemo()
        self.jobs = ApschedulerJobs(logger.getChild("jobs"))
        self.rotator = LeafRotator(
            self.secrets, self.publisher, self.jobs, rotation.policy, clock, logger.getChild("rotation")
        )
        self.secrets.set_issue_listener(self.rotator.on_issued)
        self.ca_watcher = CaWatcher(ca, self.publisher, self.rotator, rotation, clock, logger.getChild("ca"))
        self.collector_pause = collector_pause if collector_pause is not None else CollectorPause()
        self.xds = XdsServer(
            self.cache,
            JwtStreamGate(self.identity_gate, self.publisher),
            self.registry,
            logger.getChild("xds"),
            send_timeout=xds_send_timeout,
            collector_pause=self.collector_pause,
        )
        self.observability = Observability(self.registry, self.secrets, self.publisher, clock, logger.getChild("admin"))
        self.observability.add_collector(
            RotationCollector(ca, self.secrets, self.rotator, self.ca_watcher, clock)
        )
        self.observability.add_collector(GcPauseCollector(self.collector_pause))
        if vault is not None:
            self.observability.add_collector(VaultCollector(vault, clock))
        self.health = health.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    def apply_mesh_config(self, config: MeshConfig) -> str:
        """Derive resources from the mesh model and publish them; the last good stays on error."""
        if config.trust_domain != self.ca.trust_domain:
            raise InconsistentSnapshot(
                [f"mesh trust_domain {config.trust_domain!r} is not the CA's trust domain {self.ca.trust_domain!r}"]
            )
        mesh = build_mesh(config, self.mesh_memo)
        self.publisher.set_mesh(mesh)
        return self.publisher.mesh_version()

    def record_rejected(self) -> None:
        self.publisher.record_rejected()

    async def start(
        self,
        host: str,
        port: int,
        credentials: ServerCredentials | None,
        admin_port: int | None = None,
        admin_address: str = "127.0.0.1",
        *,
        share_port: bool = False,
    ) -> int:
        """Bind and start serving; `credentials=None` serves plaintext (tests only). Returns the port.

        With `admin_port`, /metrics, /status and /healthz are served over HTTP on `admin_address`.
        A port already taken raises ListenError (naming `listen` or `metrics_port`) before anything
        starts; `share_port` lets several processes listen on the same port on purpose (SO_REUSEPORT).
        """
        if not share_port:
            check_bindable("listen", host, port)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.so_reuseport", int(share_port)),
            ]
        )
        self.xds.add_to_server(server)
        csr_service.add_to_server(server, csr_service.CertificateServicer(self.identity_gate, self.ca))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = format_address(host, port)
        try:
            if credentials is None:
                bound = server.add_insecure_port(address)
            else:
                server_credentials = grpc.ssl_server_credentials(
                    [(credentials.private_key_pem, credentials.certificate_chain_pem)]
                )
                bound = server.add_secure_port(address, server_credentials)
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
        self.jobs.every("ca-watch", self.rotation.ca_check_interval.total_seconds(), self.ca_watcher.check)
        if self.vault is not None:
            self.jobs.every("vault-token", 2.0, self.vault.maintain)
        self.jobs.start()
        self.port = bound
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.log.info("meshca serving on %s:%d (tls=%s)", host, bound, credentials is not None)
        return bound

    async def stop(self, grace: float = 5.0) -> None:
        if self._server is not None:
            self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
            self.observability.stop()
            self.jobs.shutdown()
            self.log.info("meshca stopped")
