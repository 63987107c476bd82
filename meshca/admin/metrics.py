"""Prometheus collectors: every `meshca_*` metric, read from live state at scrape time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshca.clock import Clock
from meshca.xds.snapshot import ResourceType
from meshca.xds.status import ProxyStatus, RegistryTotals

# Column order of `meshca status` and label order of per-type metrics.
STATUS_TYPES: tuple[ResourceType, ...] = (
    ResourceType.CLUSTER,
    ResourceType.ENDPOINT,
    ResourceType.LISTENER,
    ResourceType.ROUTE,
    ResourceType.SECRET,
)


class ProxySource(Protocol):
    """What metrics and /status read from the xDS server's registry (ProxyRegistry)."""

    def snapshot(self) -> list[ProxyStatus]: ...

    def totals(self) -> RegistryTotals: ...


class HeldCertificate(Protocol):
    @property
    def not_after(self) -> datetime: ...


class CertificateSource(Protocol):
    """What metrics read from SDS (WorkloadSecrets); never anything holding a private key."""

    def certificates(self) -> Sequence[HeldCertificate]: ...

    def issued_total(self) -> int: ...


class MeshVersionSource(Protocol):
    """What metrics read from the mesh publisher."""

    def mesh_version(self) -> str: ...

    def mesh_updates_total(self) -> int: ...

    def mesh_rejected_total(self) -> int: ...


class MeshcaCollector(Collector):
    """Builds every `meshca_*` metric family from live state at scrape time; holds no counters itself."""

    def __init__(
        self, proxies: ProxySource, certificates: CertificateSource, mesh: MeshVersionSource, clock: Clock
    ) -> None:
        self._proxies = proxies
        self._certificates = certificates
        self._mesh = mesh
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        yield from self._xds_metrics()
        yield from self._certificate_metrics()
        yield from self._mesh_metrics()

    def _xds_metrics(self) -> Iterator[Metric]:
        streams = self._proxies.snapshot()
        totals = self._proxies.totals()
        yield GaugeMetricFamily("meshca_connected_streams", "Open xDS streams (all types).", value=len(streams))
        connected = GaugeMetricFamily(
            "meshca_connected_proxies", "Open xDS streams that were sent or ACKed this resource type.", labels=["type"]
        )
        pushes = CounterMetricFamily("meshca_xds_pushes", "xDS responses sent, per resource type.", labels=["type"])
        nacks = CounterMetricFamily("meshca_xds_nacks", "xDS NACKs received, per resource type.", labels=["type"])
        for resource_type in STATUS_TYPES:
            label = [resource_type.short_name]
            count = sum(1 for s in streams if resource_type in s.sent or resource_type in s.acked)
            connected.add_metric(label, count)
            pushes.add_metric(label, totals.pushes.get(resource_type, 0))
            nacks.add_metric(label, totals.nacks.get(resource_type, 0))
        yield connected
        yield pushes
        yield nacks
        yield CounterMetricFamily(
            "meshca_xds_send_timeouts",
            "xDS streams closed because the proxy did not read a response within the send timeout.",
            value=totals.send_timeouts,
        )
        yield CounterMetricFamily(
            "meshca_xds_private_keys_sent",
            "Secret resources holding a private key in xDS responses written (none to agent-mode nodes).",
            value=totals.private_keys_sent,
        )

    def _certificate_metrics(self) -> Iterator[Metric]:
        held = self._certificates.certificates()
        yield CounterMetricFamily(
            "meshca_certificates_issued",
            "Workload certificates issued (first issues and renewals).",
            value=self._certificates.issued_total(),
        )
        yield GaugeMetricFamily(
            "meshca_workload_certificates", "Workload certificates currently served as `default`.", value=len(held)
        )
        expiry = GaugeMetricFamily(
            "meshca_certificate_earliest_expiry_seconds",
            "Seconds until the earliest not_after among held workload certificates (absent when none).",
        )
        if held:
            earliest = min(certificate.not_after for certificate in held)
            expiry.add_metric([], (earliest - self._clock()).total_seconds())
        yield expiry

    def _mesh_metrics(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "meshca_mesh_version_info", "The mesh version being served (always 1).", labels=["version"]
        )
        info.add_metric([self._mesh.mesh_version()], 1)
        yield info
        yield CounterMetricFamily(
            "meshca_mesh_updates", "Mesh updates accepted and published.", value=self._mesh.mesh_updates_total()
        )
        yield CounterMetricFamily(
            "meshca_mesh_rejected",
            "Mesh updates rejected (the last good snapshot kept serving).",
            value=self._mesh.mesh_rejected_total(),
        )


class CaSlotView(Protocol):
    kind: str
    id: str
    state: str
    not_before: datetime
    not_after: datetime


class CaStatusView(Protocol):
    @property
    def slots(self) -> Sequence[CaSlotView]: ...


class CaStatusSource(Protocol):
    def status(self) -> CaStatusView: ...


class RotationCountersView(Protocol):
    leaf_rotations: int
    leaf_rotations_failed: int


class RotationSource(Protocol):
    def counters(self) -> RotationCountersView: ...


class CaWatchSource(Protocol):
    def ca_rotations(self) -> int: ...

    def failures(self) -> int: ...


class RotationCollector(Collector):
    """Age and expiry of every CA certificate and workload leaf, and rotation counts."""

    def __init__(
        self,
        ca: CaStatusSource,
        leaves: CertificateSource,
        rotator: RotationSource,
        watcher: CaWatchSource,
        clock: Clock,
    ) -> None:
        self._ca = ca
        self._leaves = leaves
        self._rotator = rotator
        self._watcher = watcher
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        labels = ["kind", "state", "id"]
        expiry = GaugeMetricFamily(
            "meshca_ca_expiry_seconds", "Seconds until each CA certificate expires.", labels=labels
        )
        age = GaugeMetricFamily(
            "meshca_ca_age_seconds", "Seconds since each CA certificate's not_before.", labels=labels
        )
        for slot in self._ca.status().slots:
            label = [str(slot.kind), str(slot.state), slot.id]
            expiry.add_metric(label, (slot.not_after - now).total_seconds())
            age.add_metric(label, (now - slot.not_before).total_seconds())
        yield expiry
        yield age
        leaf_expiry = GaugeMetricFamily(
            "meshca_workload_certificate_expiry_seconds",
            "Seconds until each identity's current workload certificate expires.",
            labels=["identity"],
        )
        for leaf in self._leaves.certificates():
            identity = getattr(leaf, "spiffe_id", "")
            leaf_expiry.add_metric([str(identity)], (leaf.not_after - now).total_seconds())
        yield leaf_expiry
        counters = self._rotator.counters()
        yield CounterMetricFamily(
            "meshca_leaf_rotations", "Workload certificates renewed by rotation.", value=counters.leaf_rotations
        )
        yield CounterMetricFamily(
            "meshca_leaf_rotations_failed",
            "Renewals that failed (retried; the old one kept serving).",
            value=counters.leaf_rotations_failed,
        )
        yield CounterMetricFamily(
            "meshca_ca_rotations",
            "Changes of the signing intermediate seen by this server.",
            value=self._watcher.ca_rotations(),
        )
        yield CounterMetricFamily(
            "meshca_ca_rotations_failed",
            "CA transitions that failed (the current CA kept issuing).",
            value=self._watcher.failures(),
        )


class VaultStatusView(Protocol):
    authenticated: bool
    token_expires_at: datetime | None
    consecutive_failures: int
    logins_total: int
    renewals_total: int
    failures_total: int


class VaultStatusSource(Protocol):
    def status(self) -> VaultStatusView: ...


class VaultCollector(Collector):
    """The Vault session: logged in or not, token expiry, logins, renewals and failures."""

    def __init__(self, session: VaultStatusSource, clock: Clock) -> None:
        self._session = session
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        status = self._session.status()
        yield GaugeMetricFamily(
            "meshca_vault_authenticated", "1 while meshca holds a valid Vault token.", value=int(status.authenticated)
        )
        expiry = GaugeMetricFamily(
            "meshca_vault_token_expiry_seconds",
            "Seconds until the Vault token expires (absent for non-expiring tokens).",
        )
        if status.token_expires_at is not None:
            expiry.add_metric([], (status.token_expires_at - self._clock()).total_seconds())
        yield expiry
        yield GaugeMetricFamily(
            "meshca_vault_consecutive_failures",
            "Vault calls failed in a row (0 once Vault answers again).",
            value=status.consecutive_failures,
        )
        yield CounterMetricFamily(
            "meshca_vault_failures", "Failed Vault calls and renewals.", value=status.failures_total
        )
        yield CounterMetricFamily(
            "meshca_vault_logins", "Vault logins (first and after a failed renewal).", value=status.logins_total
        )
        yield CounterMetricFamily("meshca_vault_renewals", "Vault token renewals.", value=status.renewals_total)


class PauseSource(Protocol):
    """What metrics read from the xDS server's meshca.gcpolicy.CollectorPause."""

    @property
    def pauses(self) -> int: ...

    @property
    def expired(self) -> int: ...


class GcPauseCollector(Collector):
    """How often garbage collection was deferred for a push, and how often a deferral hit its bound."""

    def __init__(self, pause: PauseSource) -> None:
        self._pause = pause

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "meshca_gc_push_pauses",
            "Pushes during which automatic garbage collection was deferred until every woken stream had written.",
            value=self._pause.pauses,
        )
        yield CounterMetricFamily(
            "meshca_gc_push_pauses_expired",
            "Deferrals ended by their bound (10 s) before every woken stream had written.",
            value=self._pause.expired,
        )


class StoreStatusSource(Protocol):
    """What metrics read from the etcd store client (meshca.store.etcd.EtcdStore)."""

    @property
    def reachable(self) -> bool: ...

    @property
    def writes(self) -> int: ...

    @property
    def failures(self) -> int: ...


class StoreCollector(Collector):
    """The etcd store: whether it answers, and how many writes and failed calls meshca made."""

    def __init__(self, store: StoreStatusSource) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "meshca_store_reachable", "1 while the last etcd call succeeded.", value=int(self._store.reachable)
        )
        yield CounterMetricFamily(
            "meshca_store_writes", "etcd puts, deletes and transactions this replica sent.", value=self._store.writes
        )
        yield CounterMetricFamily(
            "meshca_store_failures", "etcd calls that failed or timed out.", value=self._store.failures
        )


class AuditStatsView(Protocol):
    @property
    def written(self) -> int: ...

    @property
    def write_failures(self) -> int: ...

    @property
    def dropped(self) -> int: ...

    @property
    def pending(self) -> int: ...


class AuditStatsSource(Protocol):
    def stats(self) -> AuditStatsView: ...


class AuditCollector(Collector):
    """The audit log writer's counters (meshca.audit.AuditLog)."""

    def __init__(self, audit: AuditStatsSource) -> None:
        self._audit = audit

    def collect(self) -> Iterator[Metric]:
        stats = self._audit.stats()
        yield CounterMetricFamily("meshca_audit_records_written", "Audit log lines written and fsynced.",
                                  value=stats.written)
        yield CounterMetricFamily(
            "meshca_audit_write_failures", "Audit log flushes that failed (disk full, read-only); issuing went on.",
            value=stats.write_failures,
        )
        yield CounterMetricFamily(
            "meshca_audit_records_dropped", "Audit records lost: too many waited while writes failed.",
            value=stats.dropped,
        )
        yield GaugeMetricFamily("meshca_audit_records_pending", "Audit records waiting to be written.",
                                value=stats.pending)
