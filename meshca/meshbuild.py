"""Derives Envoy resources from the mesh model: shared outbound clusters and routes, per-identity listeners."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from meshca import resources as r
from meshca.identity import SpiffeId
from meshca.meshconfig import AllowRule, MeshConfig, Service
from meshca.snapshot import EncodedResource

OUTBOUND_ROUTES = "outbound"


def outbound_cluster_name(service: str) -> str:
    return f"outbound|{service}"


def inbound_listener_name(service: str) -> str:
    return f"inbound|{service}"


def local_cluster_name(service: str) -> str:
    return f"local|{service}"


def outbound_listener_name(port: int) -> str:
    return f"outbound|{port}"


@dataclass(frozen=True)
class MeshResources:
    """Resources every proxy gets, plus those only the sidecars of one identity get."""

    shared: tuple[EncodedResource, ...]
    per_identity: Mapping[SpiffeId, tuple[EncodedResource, ...]] = field(default_factory=dict)

    @property
    def version(self) -> str:
        digest = hashlib.sha256()
        for resource in sorted(self.shared, key=lambda res: (res.type.name, res.name)):  # order-independent
            digest.update(f"{resource.type.name}/{resource.name}/{resource.version};".encode())
        for spiffe_id in sorted(self.per_identity):
            digest.update(spiffe_id.uri.encode())
            for resource in sorted(self.per_identity[spiffe_id], key=lambda res: (res.type.name, res.name)):
                digest.update(f"{resource.type.name}/{resource.name}/{resource.version};".encode())
        return digest.hexdigest()[:12]


class ResourceMemo:
    """Remembers encoded resources by their (hashable, frozen) spec from one build to the next, so
    an edit re-encodes only what it changed; entries not used by the latest build are dropped."""

    def __init__(self) -> None:
        self._previous: dict[tuple[object, ...], EncodedResource] = {}
        self._current: dict[tuple[object, ...], EncodedResource] = {}

    def get(self, key: tuple[object, ...], make: Callable[[], EncodedResource]) -> EncodedResource:
        found = self._current.get(key) or self._previous.get(key)
        if found is None:
            found = make()
        self._current[key] = found
        return found

    def finish_build(self) -> None:
        self._previous, self._current = self._current, {}


class _Encoder:
    """The resource builders, through a memo when one is given."""

    def __init__(self, memo: ResourceMemo | None) -> None:
        self._memo = memo

    def _get(self, key: tuple[object, ...], make: Callable[[], EncodedResource]) -> EncodedResource:
        return make() if self._memo is None else self._memo.get(key, make)

    def cluster(self, spec: r.ClusterSpec) -> EncodedResource:
        return self._get(("cluster", spec), lambda: r.cluster(spec))

    def cluster_load_assignment(self, name: str, endpoints: tuple[tuple[str, int], ...]) -> EncodedResource:
        return self._get(("cla", name, endpoints), lambda: r.cluster_load_assignment(name, endpoints))

    def route_configuration(self, name: str, virtual_hosts: tuple[r.VirtualHostSpec, ...]) -> EncodedResource:
        return self._get(("route", name, virtual_hosts), lambda: r.route_configuration(name, virtual_hosts))

    def http_listener(self, spec: r.HttpListenerSpec) -> EncodedResource:
        return self._get(("listener", spec), lambda: r.http_listener(spec))


def _allowed_callers(rules: tuple[AllowRule, ...], trust_domain: str) -> r.MtlsPeer:
    """No rules: any identity of the trust domain (mTLS is still required)."""
    if not rules or any(rule.any_identity for rule in rules):
        return r.MtlsPeer(allowed_spiffe_prefixes=(f"spiffe://{trust_domain}/",))
    return r.MtlsPeer(
        allowed_spiffe_ids=tuple(rule.spiffe_id.uri for rule in rules if rule.spiffe_id is not None),
        allowed_spiffe_prefixes=tuple(
            f"spiffe://{trust_domain}/ns/{rule.namespace}/sa/" for rule in rules if rule.namespace is not None
        ),
    )


def _shared(config: MeshConfig, encode: _Encoder) -> list[EncodedResource]:
    resources: list[EncodedResource] = []
    for service in config.services:
        if service.inbound is None:
            continue
        name = outbound_cluster_name(service.name)
        upstream = r.MtlsPeer(allowed_spiffe_ids=(service.spiffe_id.uri,))
        resources.append(encode.cluster(r.ClusterSpec(name, upstream_tls=upstream)))
        resources.append(encode.cluster_load_assignment(name, service.endpoints))
    routes = tuple(
        r.RouteSpec(route.prefix, tuple((outbound_cluster_name(t.service), t.weight) for t in route.targets))
        for route in config.routes
    )
    resources.append(encode.route_configuration(OUTBOUND_ROUTES, (r.VirtualHostSpec("outbound", ("*",), routes),)))
    return resources


def _sidecar(service: Service, trust_domain: str, encode: _Encoder) -> list[EncodedResource]:
    resources: list[EncodedResource] = []
    if service.inbound is not None:
        inbound = service.inbound
        local = local_cluster_name(service.name)
        resources.append(encode.cluster(r.ClusterSpec(local)))
        resources.append(encode.cluster_load_assignment(local, ((inbound.app_host, inbound.app_port),)))
        route_name = inbound_listener_name(service.name)
        resources.append(
            encode.route_configuration(
                route_name, (r.VirtualHostSpec(service.name, ("*",), (r.RouteSpec("/", ((local, 1),)),)),)
            )
        )
        resources.append(
            encode.http_listener(
                r.HttpListenerSpec(
                    inbound_listener_name(service.name),
                    inbound.listen_address,
                    inbound.port,
                    route_name,
                    downstream_tls=_allowed_callers(service.allow, trust_domain),
                    stat_prefix=f"inbound_{service.name}",
                )
            )
        )
    if service.outbound is not None:
        outbound = service.outbound
        resources.append(
            encode.http_listener(
                r.HttpListenerSpec(
                    outbound_listener_name(outbound.port),
                    outbound.listen_address,
                    outbound.port,
                    OUTBOUND_ROUTES,
                    stat_prefix=f"outbound_{outbound.port}",
                )
            )
        )
    return resources


def build_mesh(config: MeshConfig, memo: ResourceMemo | None = None) -> MeshResources:
    """Every resource of the mesh; with a memo, resources whose spec did not change are reused."""
    encode = _Encoder(memo)
    per_identity: dict[SpiffeId, list[EncodedResource]] = {}
    for service in config.services:
        per_identity.setdefault(service.spiffe_id, []).extend(_sidecar(service, config.trust_domain, encode))
    mesh = MeshResources(tuple(_shared(config, encode)), {k: tuple(v) for k, v in per_identity.items()})
    if memo is not None:
        memo.finish_build()
    return mesh
