"""Derives Envoy resources from the mesh model: shared outbound clusters and routes, per-identity listeners."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar, cast

from meshca.identity.spiffe import SpiffeId
from meshca.mesh import resources as r
from meshca.mesh.model import AllowRule, MeshConfig, Service
from meshca.xds.snapshot import EncodedResource

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

    @cached_property
    def version(self) -> str:
        digest = hashlib.sha256()
        for resource in sorted(self.shared, key=lambda res: (res.type.name, res.name)):  # order-independent
            digest.update(f"{resource.type.name}/{resource.name}/{resource.version};".encode())
        for spiffe_id in sorted(self.per_identity):
            digest.update(spiffe_id.uri.encode())
            for resource in sorted(self.per_identity[spiffe_id], key=lambda res: (res.type.name, res.name)):
                digest.update(f"{resource.type.name}/{resource.name}/{resource.version};".encode())
        return digest.hexdigest()[:12]


T = TypeVar("T")


class ResourceMemo:
    """Remembers encoded resources (and groups of them) by their hashable, frozen spec from one
    build to the next, so an edit re-encodes only what it changed; entries the latest build did
    not use are dropped."""

    def __init__(self) -> None:
        self._previous: dict[tuple[object, ...], Any] = {}
        self._current: dict[tuple[object, ...], Any] = {}

    def get(self, key: tuple[object, ...], make: Callable[[], T]) -> T:
        found = self._current.get(key)
        if found is None:
            found = self._previous.get(key)
            if found is None:
                found = make()
            self._current[key] = found
        return cast(T, found)

    def finish_build(self) -> None:
        self._previous, self._current = self._current, {}


class _Encoder:
    """The resource builders, through a memo when one is given."""

    def __init__(self, memo: ResourceMemo | None) -> None:
        self._memo = memo

    def get(self, key: tuple[object, ...], make: Callable[[], T]) -> T:
        return make() if self._memo is None else self._memo.get(key, make)

    def cluster(self, spec: r.ClusterSpec) -> EncodedResource:
        return self.get(("cluster", spec), lambda: r.cluster(spec))

    def cluster_load_assignment(self, name: str, endpoints: tuple[tuple[str, int], ...]) -> EncodedResource:
        return self.get(("cla", name, endpoints), lambda: r.cluster_load_assignment(name, endpoints))

    def route_configuration(self, name: str, virtual_hosts: tuple[r.VirtualHostSpec, ...]) -> EncodedResource:
        return self.get(("route", name, virtual_hosts), lambda: r.route_configuration(name, virtual_hosts))

    def http_listener(self, spec: r.HttpListenerSpec) -> EncodedResource:
        return self.get(("listener", spec), lambda: r.http_listener(spec))


def _allowed_callers(rules: tuple[AllowRule, ...], trust_domain: str, from_agent: bool) -> r.MtlsPeer:
    """No rules: any identity of the trust domain (mTLS is still required)."""
    if not rules or any(rule.any_identity for rule in rules):
        return r.MtlsPeer(allowed_spiffe_prefixes=(f"spiffe://{trust_domain}/",), secrets_from_agent=from_agent)
    return r.MtlsPeer(
        secrets_from_agent=from_agent,
        allowed_spiffe_ids=tuple(rule.spiffe_id.uri for rule in rules if rule.spiffe_id is not None),
        allowed_spiffe_prefixes=tuple(
            f"spiffe://{trust_domain}/ns/{rule.namespace}/sa/" for rule in rules if rule.namespace is not None
        ),
    )


def _caller_policy(callers: r.MtlsPeer, denied_spiffe_ids: frozenset[str]) -> r.CallerPolicy:
    """The per-request policy for the callers the handshake admits; only denied IDs these callers
    would include are listed, so denying an identity changes only the sidecars it could call."""
    denied = sorted(
        spiffe_id
        for spiffe_id in denied_spiffe_ids
        if spiffe_id in callers.allowed_spiffe_ids
        or any(spiffe_id.startswith(prefix) for prefix in callers.allowed_spiffe_prefixes)
    )
    return r.CallerPolicy(callers.allowed_spiffe_ids, callers.allowed_spiffe_prefixes, tuple(denied))


def _outbound(service: Service, encode: _Encoder, from_agent: bool) -> tuple[EncodedResource, ...]:
    """What every caller of a service needs: its mTLS cluster and its endpoints."""
    name = outbound_cluster_name(service.name)
    upstream = r.MtlsPeer(allowed_spiffe_ids=(service.spiffe_id.uri,), secrets_from_agent=from_agent)
    return (
        encode.cluster(r.ClusterSpec(name, upstream_tls=upstream)),
        encode.cluster_load_assignment(name, service.endpoints),
    )


def _shared(config: MeshConfig, encode: _Encoder, from_agent: bool) -> list[EncodedResource]:
    resources: list[EncodedResource] = []
    for service in config.services:
        if service.inbound is None:
            continue
        resources.extend(
            encode.get(
                ("outbound", service.name, service.spiffe_id, service.endpoints, from_agent),
                lambda service=service: _outbound(service, encode, from_agent),  # type: ignore[misc]
            )
        )
    routes = tuple(
        r.RouteSpec(route.prefix, tuple((outbound_cluster_name(t.service), t.weight) for t in route.targets))
        for route in config.routes
    )
    resources.append(encode.route_configuration(OUTBOUND_ROUTES, (r.VirtualHostSpec("outbound", ("*",), routes),)))
    return resources


def _sidecar(
    service: Service, trust_domain: str, denied: frozenset[str], encode: _Encoder, from_agent: bool
) -> list[EncodedResource]:
    resources: list[EncodedResource] = []
    if service.inbound is not None:
        inbound = service.inbound
        local = local_cluster_name(service.name)
        resources.append(encode.cluster(r.ClusterSpec(local)))
        resources.append(encode.cluster_load_assignment(local, ((inbound.app_host, inbound.app_port),)))
        route_name = inbound_listener_name(service.name)
        callers = _allowed_callers(service.allow, trust_domain, from_agent)
        # Callers are checked twice: at the handshake (the listener, LDS) and on every request (RBAC
        # on the route, RDS). Envoy keeps connections of a changed listener for its drain time, but
        # every request on them follows the current route configuration.
        host = r.VirtualHostSpec(
            service.name, ("*",), (r.RouteSpec("/", ((local, 1),)),), callers=_caller_policy(callers, denied)
        )
        resources.append(encode.route_configuration(route_name, (host,)))
        resources.append(
            encode.http_listener(
                r.HttpListenerSpec(
                    inbound_listener_name(service.name),
                    inbound.listen_address,
                    inbound.port,
                    route_name,
                    downstream_tls=callers,
                    stat_prefix=f"inbound_{service.name}",
                    authorize_requests=True,
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


def build_mesh(
    config: MeshConfig,
    memo: ResourceMemo | None = None,
    *,
    denied_spiffe_ids: frozenset[str] = frozenset(),
    secrets_from_agent: bool = False,
) -> MeshResources:
    """Every resource of the mesh; with a memo, resources whose spec did not change are reused.

    `denied_spiffe_ids` (e.g. revoked identities) are refused per request on every sidecar, also
    where a namespace or trust-domain rule would admit them. `secrets_from_agent`: the variant for
    agent-mode nodes, whose TLS secrets come from their local agent (it references no Secret; give
    it its own memo, a memo keeps only what its latest build used)."""
    encode = _Encoder(memo)
    per_identity: dict[SpiffeId, list[EncodedResource]] = {}
    for service in config.services:
        sidecar = encode.get(
            ("sidecar", service, config.trust_domain, denied_spiffe_ids, secrets_from_agent),
            lambda service=service: tuple(  # type: ignore[misc]
                _sidecar(service, config.trust_domain, denied_spiffe_ids, encode, secrets_from_agent)
            ),
        )
        per_identity.setdefault(service.spiffe_id, []).extend(sidecar)
    mesh = MeshResources(tuple(_shared(config, encode, secrets_from_agent)), {k: tuple(v) for k, v in per_identity.items()})
    if memo is not None:
        memo.finish_build()
    return mesh
