"""SDS for workloads: each identity's `default` certificate and trust bundles, composed with the mesh."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Literal, Protocol

from meshca.audit import AuditEvent, AuditSink, IssuerIds, NoAudit
from meshca.clock import Clock
from meshca.identity.spiffe import SpiffeId
from meshca.mesh.build import MeshResources
from meshca.mesh.resources import (
    DEFAULT_CERT_SECRET,
    ROOT_CA_SECRET,
    tls_certificate_secret,
    validation_context_secret,
)
from meshca.sds.rotation import lifetime_start
from meshca.xds.cache import SnapshotCache
from meshca.xds.snapshot import EncodedResource, Overlay, Reference, ResourceType, Snapshot, TypeResources

ALL_BUNDLES_SECRET = "ALL"


class IssuedLeaf(Protocol):
    chain_pem: bytes
    private_key_pem: bytes | None
    serial_number: int
    not_before: datetime
    not_after: datetime


class WorkloadIssuer(Protocol):
    """What SDS needs from a CA backend."""

    @property
    def trust_domain(self) -> str: ...

    def issue_workload(self, spiffe_id: SpiffeId, ttl: timedelta | None = None) -> IssuedLeaf: ...

    def trust_bundle_pem(self) -> bytes: ...


class ForeignTrustDomain(ValueError):
    """An identity outside the CA's trust domain asked for a certificate."""


class IdentityRevoked(ValueError):
    """A revoked identity (`meshca revoke --spiffe-id`) asked for a certificate."""


@dataclass(frozen=True)
class WorkloadCertificate:
    """The certificate currently served as one identity's `default` secret."""

    spiffe_id: SpiffeId
    serial_number: int
    not_before: datetime
    not_after: datetime
    issued_at: datetime  # when meshca got it: notBefore may be backdated (Vault: by 60 s)
    chain_pem: bytes = field(default=b"", repr=False, compare=False)  # as served: the leaf, then its issuer(s)


@dataclass(frozen=True)
class _Issued:
    info: WorkloadCertificate
    secret: EncodedResource


class WorkloadSecrets:
    """Issues an identity's certificate on first request and reuses it until it must be renewed.

    The CA is called without holding the table's lock (a slow Vault delays only the identity being
    issued); issuances of one identity are serialized so that it is issued once, not once per caller.
    """

    def __init__(
        self,
        issuer: WorkloadIssuer,
        clock: Clock,
        logger: logging.Logger,
        leaf_ttl: timedelta | None = None,
        reuse_until: float = 0.9,
        audit: AuditSink | None = None,
    ) -> None:
        """`audit`: every issuance and renewal is recorded there (meshca.audit)."""
        self._issuer = issuer
        self._audit: AuditSink = audit if audit is not None else NoAudit()
        self._issuer_ids = IssuerIds()
        self._clock = clock
        self._log = logger
        self._leaf_ttl = leaf_ttl
        # A held certificate is handed out until this fraction of its lifetime (the rotation
        # policy's hard zone starts there); after that a stream open issues a fresh one.
        self._reuse_until = reuse_until
        self._on_issued: Callable[[WorkloadCertificate], object] | None = None
        self._lock = threading.Lock()
        self._issued: dict[SpiffeId, _Issued] = {}
        self._issuing: dict[SpiffeId, threading.Lock] = {}
        self._issued_total = 0
        self._bundle: tuple[tuple[bytes, bytes], list[EncodedResource]] = ((b"", b""), [])  # (bundle, CRLs), encoded
        self._crls = b""
        self._denied: frozenset[SpiffeId] = frozenset()

    def bundle_secrets(self) -> list[EncodedResource]:
        """`ROOTCA`, `ALL` and `spiffe://<trust-domain>` all carry this CA's bundle (and the CRLs, if set)."""
        bundle = self._issuer.trust_bundle_pem()
        with self._lock:
            crls = self._crls
            cached_for, cached = self._bundle
            if cached_for == (bundle, crls):  # compared, not concatenated: this runs once per identity published
                return list(cached)
        names = (ROOT_CA_SECRET, ALL_BUNDLES_SECRET, f"spiffe://{self._issuer.trust_domain}")
        encoded = [validation_context_secret(name, bundle, crls) for name in names]
        with self._lock:
            self._bundle = ((bundle, crls), encoded)
        return list(encoded)

    def trust_material(self) -> tuple[bytes, bytes]:
        """(bundle, CRLs) as every bundle secret carries them now: what agents serve as their ROOTCA."""
        bundle = self._issuer.trust_bundle_pem()
        with self._lock:
            return bundle, self._crls

    def set_crls(self, crls_pem: bytes) -> None:
        """The CRLs every bundle secret carries from now on (the caller republishes)."""
        with self._lock:
            self._crls = crls_pem

    def set_denied(self, denied: frozenset[SpiffeId]) -> None:
        """Revoked identities: issuing for them raises IdentityRevoked from now on."""
        with self._lock:
            self._denied = denied

    def is_denied(self, spiffe_id: SpiffeId) -> bool:
        with self._lock:
            return spiffe_id in self._denied

    def set_issue_listener(self, listener: Callable[[WorkloadCertificate], object]) -> None:
        """Called (outside the lock) after every issuance: the rotation scheduler tracks leaves so."""
        self._on_issued = listener

    def held_secret(self, spiffe_id: SpiffeId) -> EncodedResource | None:
        """The identity's `default` secret if the held certificate may still be handed out (no CA call)."""
        with self._lock:
            return self._usable_locked(spiffe_id)

    def _usable_locked(self, spiffe_id: SpiffeId) -> EncodedResource | None:
        current = self._issued.get(spiffe_id)
        if current is None:
            return None
        info = current.info
        start = lifetime_start(info.not_before, info.issued_at, info.not_after)
        if self._clock() < start + (info.not_after - start) * self._reuse_until:
            return current.secret
        return None

    def default_secret(self, spiffe_id: SpiffeId, node_id: str | None = None) -> EncodedResource:
        """The identity's `default` secret: the held certificate, or a new one if none is usable.

        May call the CA: callers on an event loop run it in a thread unless `held_secret` answered.
        `node_id`: the node whose stream asked, for the audit log.
        """
        self._check_trust_domain(spiffe_id)
        with self._lock:
            secret = self._usable_locked(spiffe_id)
            if secret is not None:
                return secret
            issuing = self._issuing.setdefault(spiffe_id, threading.Lock())
        with issuing:
            with self._lock:
                secret = self._usable_locked(spiffe_id)  # issued by the caller we waited for
            if secret is not None:
                return secret
            issued = self._issue(spiffe_id, "issue", node_id)
        self._issued_event(issued.info)
        return issued.secret

    def renew(self, spiffe_id: SpiffeId) -> WorkloadCertificate:
        """Issue a new certificate for the identity now (rotation); the caller republishes."""
        self._check_trust_domain(spiffe_id)
        with self._lock:
            issuing = self._issuing.setdefault(spiffe_id, threading.Lock())
        with issuing:
            issued = self._issue(spiffe_id, "renew", None)
        self._issued_event(issued.info)
        return issued.info

    def forget(self, spiffe_id: SpiffeId) -> bool:
        """Drop the identity's certificate and key (its last stream is gone); True if one was held."""
        with self._lock:
            self._issuing.pop(spiffe_id, None)
            return self._issued.pop(spiffe_id, None) is not None

    def _check_trust_domain(self, spiffe_id: SpiffeId) -> None:
        if spiffe_id.trust_domain != self._issuer.trust_domain:
            raise ForeignTrustDomain(
                f"identity {spiffe_id} is in trust domain {spiffe_id.trust_domain!r}; "
                f"this CA issues for {self._issuer.trust_domain!r}"
            )

    def _issue(self, spiffe_id: SpiffeId, event: Literal["issue", "renew"], node_id: str | None) -> _Issued:
        """Call the CA (the caller holds the identity's issuing lock, not the table's)."""
        if self.is_denied(spiffe_id):
            raise IdentityRevoked(f"identity {spiffe_id} is revoked (`meshca unrevoke --spiffe-id` lifts it)")
        leaf = self._issuer.issue_workload(spiffe_id, self._leaf_ttl)
        assert leaf.private_key_pem is not None, "issue_workload returns the generated key"
        info = WorkloadCertificate(
            spiffe_id, leaf.serial_number, leaf.not_before, leaf.not_after, self._clock(), leaf.chain_pem
        )
        issued = _Issued(info, tls_certificate_secret(DEFAULT_CERT_SECRET, leaf.chain_pem, leaf.private_key_pem))
        with self._lock:
            self._issued[spiffe_id] = issued
            self._issued_total += 1
        self._audit.record(AuditEvent(
            event, spiffe_id=spiffe_id.uri, serial=leaf.serial_number, node_id=node_id,
            issuer=self._issuer_ids.of_chain(leaf.chain_pem), not_before=leaf.not_before, not_after=leaf.not_after,
        ))
        return issued

    def _issued_event(self, info: WorkloadCertificate) -> None:
        self._log.info(
            "issued workload certificate: identity=%s serial=%x not_after=%s",
            info.spiffe_id,
            info.serial_number,
            info.not_after.isoformat(),
        )
        if self._on_issued is not None:
            self._on_issued(info)

    def certificates(self) -> list[WorkloadCertificate]:
        with self._lock:
            return [issued.info for issued in self._issued.values()]

    def issued_total(self) -> int:
        """Workload certificates issued since start (first issues and renewals)."""
        with self._lock:
            return self._issued_total


class MeshPublisher:
    """Publishes one snapshot per identity: shared mesh resources, that identity's own, its secrets.

    A mesh update that would leave any snapshot inconsistent is refused as a whole and the last
    good one keeps serving.
    """

    def __init__(self, cache: SnapshotCache, secrets: WorkloadSecrets, logger: logging.Logger) -> None:
        self._cache = cache
        self._secrets = secrets
        self._log = logger
        self._lock = threading.Lock()
        # Publishing is serialized: a renewal (scheduler thread) and a mesh update (config source)
        # each read an identity's current secrets and publish; interleaved, the later write could
        # carry the older certificate.
        self._publishing = threading.RLock()
        self._shared_view = Snapshot.build([])
        self._overlays: dict[SpiffeId, Overlay] = {}  # each identity's own resources, checked on the shared view
        self._provided: frozenset[Reference] = frozenset()
        self._secret_sets: dict[SpiffeId, TypeResources] = {}  # last published per identity (same objects, same version)
        self._identities: set[SpiffeId] = set()
        # Agent mode: identities with agent-mode nodes get a second snapshot (agent_snapshot_key) built from the
        # mesh's agent variant, holding no Secret; the variant is built only while such identities exist.
        self._agent_source: Callable[[], MeshResources] | None = None
        self._agent_view: tuple[Snapshot, dict[SpiffeId, Overlay]] | None = None
        self._agent_identities: set[SpiffeId] = set()
        self._version = ""
        self._updates = 0
        self._rejected = 0

    @staticmethod
    def snapshot_key(spiffe_id: SpiffeId) -> str:
        return spiffe_id.uri

    @staticmethod
    def agent_snapshot_key(spiffe_id: SpiffeId) -> str:
        return f"agent|{spiffe_id.uri}"

    def set_mesh(
        self, mesh: MeshResources | Iterable[EncodedResource], agent_mesh: Callable[[], MeshResources] | None = None
    ) -> None:
        """Validate every identity's view against the secrets it will have, then publish to all.

        `agent_mesh` builds the same mesh for agent-mode nodes (build_mesh(secrets_from_agent=True)); it is
        called only while identities with agent-mode nodes exist (now, or later by `ensure_agent_identity`).
        Raises InconsistentSnapshot naming every dangling reference; nothing changes then (the
        caller, e.g. a config source, counts the rejection with record_rejected).
        """
        with self._publishing:
            agent_view = None
            with self._lock:
                agent_identities = list(self._agent_identities)
                previous_agent = self._agent_view
            if agent_mesh is not None and agent_identities:
                agent_view = _agent_view(agent_mesh(), previous_agent)  # checked before anything changes
            self._set_mesh(mesh)
            with self._lock:
                self._agent_source = agent_mesh
                self._agent_view = agent_view
            if agent_view is not None:
                shared, overlays = agent_view
                self._cache.set_snapshots(
                    (self.agent_snapshot_key(spiffe_id), partial(_composed, shared, overlays.get(spiffe_id)))
                    for spiffe_id in agent_identities
                )

    def ensure_agent_identity(self, spiffe_id: SpiffeId) -> str:
        """Publish the identity's agent-mode snapshot (the mesh without any Secret) and return its key; no
        certificate is issued for it. Builds the agent variant of the mesh if no agent-mode node had it yet."""
        key = self.agent_snapshot_key(spiffe_id)
        with self._publishing:
            with self._lock:
                self._agent_identities.add(spiffe_id)
                view, source = self._agent_view, self._agent_source
            if view is None:
                view = _agent_view(source() if source is not None else MeshResources(()), None)
                with self._lock:
                    self._agent_view = view
            if self._cache.get(key) is None:
                shared, overlays = view
                self._cache.set_snapshot(key, _composed(shared, overlays.get(spiffe_id)))
        return key

    def current_agent_key(self, spiffe_id: SpiffeId) -> str | None:
        """The identity's agent-mode key if its snapshot is published (nothing to build)."""
        key = self.agent_snapshot_key(spiffe_id)
        with self._lock:
            known = spiffe_id in self._agent_identities
        return key if known and self._cache.get(key) is not None else None

    def _set_mesh(self, mesh: MeshResources | Iterable[EncodedResource]) -> None:
        if not isinstance(mesh, MeshResources):
            mesh = MeshResources(tuple(mesh))
        # Each identity's snapshot gets its own secrets on top: check with the names it will have.
        provided = frozenset(Reference(ResourceType.SECRET, name) for name in self._secret_names())
        if provided == self._provided:
            provided = self._provided  # the same object: layers compare their promises by identity first
        self._provided = provided
        with self._lock:
            previous = self._shared_view
        # The shared part is checked once; each identity's own resources are layered on it and
        # checked against it, so an update costs O(resources + identities), not their product.
        shared_view = Snapshot.build(
            [r for r in mesh.shared if r.type is not ResourceType.SECRET], previous=previous, provided=provided
        )
        with self._lock:
            previous_overlays = dict(self._overlays)
        overlays: dict[SpiffeId, Overlay] = {}
        for spiffe_id, own in mesh.per_identity.items():
            resources = [r for r in own if r.type is not ResourceType.SECRET]
            kept = previous_overlays.get(spiffe_id)
            if kept is not None and kept.holds(resources, provided) and kept.recheck(shared_view, previous):
                overlays[spiffe_id] = kept  # unchanged, and still consistent with what the base changed
            else:
                overlays[spiffe_id] = Overlay.on(shared_view, resources, provided)
        version = _mesh_version(shared_view, overlays)
        with self._lock:
            self._shared_view = shared_view
            self._overlays = overlays
            self._version = version
            self._updates += 1
            identities = list(self._identities)
            held = dict(self._secret_sets)
        self._log.info("mesh version %s published to %d identities", version, len(identities))
        # Their secrets did not change (renewals and bundle changes publish on their own): each
        # identity's snapshot is composed when its stream reads it, not here for every identity.
        pending: list[tuple[str, Snapshot | Callable[[], Snapshot]]] = []
        for spiffe_id in identities:
            secrets = held.get(spiffe_id)
            if secrets is None:
                try:
                    self._publish(spiffe_id)
                except IdentityRevoked:  # being forgotten
                    continue
            else:
                compose = partial(_published, shared_view, overlays.get(spiffe_id), secrets)
                pending.append((self.snapshot_key(spiffe_id), compose))
        self._cache.set_snapshots(pending)

    def _secret_names(self) -> list[str]:
        return [DEFAULT_CERT_SECRET, *(secret.name for secret in self._secrets.bundle_secrets())]

    def record_rejected(self) -> None:
        """Count a mesh update refused by its source (parse, validation or consistency error)."""
        with self._lock:
            self._rejected += 1

    def mesh_version(self) -> str:
        with self._lock:
            return self._version

    def mesh_updates_total(self) -> int:
        with self._lock:
            return self._updates

    def mesh_rejected_total(self) -> int:
        with self._lock:
            return self._rejected

    def current_key(self, spiffe_id: SpiffeId) -> str | None:
        """The identity's key if its published snapshot already carries a usable certificate (no CA
        call, nothing published); None when `ensure_identity` has work to do."""
        key = self.snapshot_key(spiffe_id)
        with self._lock:
            known = spiffe_id in self._identities
        secret = self._secrets.held_secret(spiffe_id) if known else None
        if secret is None:
            return None
        published = self._cache.get(key)
        if published is None or published.of_type(ResourceType.SECRET).resources.get(DEFAULT_CERT_SECRET) is not secret:
            return None
        return key

    def is_revoked(self, spiffe_id: SpiffeId) -> bool:
        """True for an identity `meshca revoke --spiffe-id` revoked: it gets no certificate."""
        return self._secrets.is_denied(spiffe_id)

    def forget(self, spiffe_id: SpiffeId) -> None:
        """Stop publishing for the identity and drop its snapshot (no stream of it is left)."""
        with self._publishing:
            with self._lock:
                self._identities.discard(spiffe_id)
                self._secret_sets.pop(spiffe_id, None)
                self._agent_identities.discard(spiffe_id)
                if not self._agent_identities:
                    self._agent_view = None  # built again when an agent-mode node comes
            self._cache.remove(self.snapshot_key(spiffe_id))
            self._cache.remove(self.agent_snapshot_key(spiffe_id))

    def identities(self) -> int:
        with self._lock:
            return len(self._identities)

    def ensure_identity(self, spiffe_id: SpiffeId, node_id: str | None = None) -> str:
        """Make sure this identity has a certificate and a published snapshot; return its key.

        May call the CA (see WorkloadSecrets.default_secret); `node_id` (the node asking) is for the audit log."""
        key = self.snapshot_key(spiffe_id)
        with self._lock:
            known = spiffe_id in self._identities
            self._identities.add(spiffe_id)
        if known:
            # Another stream of a known identity (or a reconnect): its published snapshot is current
            # unless its certificate was (re)issued meanwhile; mesh and bundle changes republish all.
            published = self._cache.get(key)
            secret = self._secrets.default_secret(spiffe_id, node_id)
            if published is not None and published.of_type(ResourceType.SECRET).resources.get(
                DEFAULT_CERT_SECRET
            ) is secret:
                return key
        else:
            self._secrets.default_secret(spiffe_id, node_id)  # issued here, so the audit log names the node
        self._publish(spiffe_id)
        return key

    def refresh(self, spiffe_id: SpiffeId) -> None:
        """Publish the identity's snapshot again (its certificate was renewed)."""
        with self._lock:
            known = spiffe_id in self._identities
        if known:
            self._publish(spiffe_id)

    def refresh_all(self) -> None:
        """Publish every identity again (the trust bundle changed)."""
        with self._lock:
            identities = list(self._identities)
        for spiffe_id in identities:
            try:
                self._publish(spiffe_id)
            except IdentityRevoked:  # being forgotten (meshca.app.MeshcaApp.on_revoked_identities)
                continue

    def _publish(self, spiffe_id: SpiffeId) -> None:
        with self._publishing:
            secrets = [self._secrets.default_secret(spiffe_id), *self._secrets.bundle_secrets()]
            with self._lock:
                shared, overlay = self._shared_view, self._overlays.get(spiffe_id)
                held = self._secret_sets.get(spiffe_id)
            if held is None or not _same_secrets(held, secrets):
                held = TypeResources.of(secrets, previous=held)
                with self._lock:
                    self._secret_sets[spiffe_id] = held
            self._cache.set_snapshot(self.snapshot_key(spiffe_id), _published(shared, overlay, held))


def _published(shared: Snapshot, overlay: Overlay | None, secrets: TypeResources) -> Snapshot:
    """An identity's snapshot: the shared view, its own resources, its secrets (the names set_mesh
    checked everything against as `provided`)."""
    view = overlay.compose(shared) if overlay is not None else shared
    return view.fill_provided(ResourceType.SECRET, secrets)


def _agent_view(
    mesh: MeshResources, previous: tuple[Snapshot, dict[SpiffeId, Overlay]] | None
) -> tuple[Snapshot, dict[SpiffeId, Overlay]]:
    """The agent variant checked like set_mesh checks the mesh, with no Secret provided: none may be referenced."""
    shared = Snapshot.build(
        [r for r in mesh.shared if r.type is not ResourceType.SECRET], previous=previous[0] if previous else None
    )
    overlays = {
        spiffe_id: Overlay.on(shared, [r for r in own if r.type is not ResourceType.SECRET], frozenset())
        for spiffe_id, own in mesh.per_identity.items()
    }
    return shared, overlays


def _composed(shared: Snapshot, overlay: Overlay | None) -> Snapshot:
    return overlay.compose(shared) if overlay is not None else shared


def _mesh_version(shared: Snapshot, overlays: Mapping[SpiffeId, Overlay]) -> str:
    """A content hash of the whole mesh from versions already computed (an identity's own part is
    hashed once, when its resources change)."""
    digest = hashlib.sha256(";".join(shared.version(t) for t in ResourceType).encode())
    for part in sorted(f"{spiffe_id.uri}:{overlay.version}" for spiffe_id, overlay in overlays.items()):
        digest.update(part.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:12]


def _same_secrets(held: TypeResources, secrets: list[EncodedResource]) -> bool:
    return len(held.resources) == len(secrets) and all(held.resources.get(s.name) is s for s in secrets)
