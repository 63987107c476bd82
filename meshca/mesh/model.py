"""The user's mesh model (services, who may call them, HTTP routes), parsed from YAML and validated."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from meshca.fields import ConfigError, FieldReader, parse_host_port, read_yaml_mapping
from meshca.identity.spiffe import InvalidSpiffeId, SpiffeId

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class AllowRule:
    """Who may call a service: one SPIFFE ID, every identity of a namespace, or the whole trust domain."""

    spiffe_id: SpiffeId | None = None
    namespace: str | None = None
    any_identity: bool = False

    def describe(self) -> str:
        if self.spiffe_id is not None:
            return self.spiffe_id.uri
        if self.namespace is not None:
            return f"namespace:{self.namespace}"
        return "*"


@dataclass(frozen=True)
class Inbound:
    """The sidecar's mTLS listener for a service and the local app it forwards to."""

    port: int
    app_host: str
    app_port: int
    listen_address: str = "0.0.0.0"


@dataclass(frozen=True)
class Outbound:
    """The sidecar's plain-HTTP listener the app sends its outgoing calls to (loopback only)."""

    port: int
    listen_address: str = "127.0.0.1"


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    service_account: str
    spiffe_id: SpiffeId
    inbound: Inbound | None
    outbound: Outbound | None
    endpoints: tuple[tuple[str, int], ...]  # the service's sidecars' inbound addresses (the mesh file's)
    allow: tuple[AllowRule, ...]

    def __hash__(self) -> int:
        return self._hash

    @cached_property
    def _hash(self) -> int:
        """Computed once: a rebuild keys its memo by service, and a nested dataclass hash is slow."""
        return hash(
            (self.name, self.namespace, self.service_account, self.spiffe_id, self.inbound, self.outbound)
            + (self.endpoints, self.allow)
        )


@dataclass(frozen=True)
class RouteTarget:
    service: str
    weight: int


@dataclass(frozen=True)
class HttpRoute:
    """Requests whose path starts with `prefix` go to one service or are split by weight."""

    prefix: str
    targets: tuple[RouteTarget, ...]


@dataclass(frozen=True)
class MeshConfig:
    trust_domain: str
    services: tuple[Service, ...]
    routes: tuple[HttpRoute, ...]

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)


def load_mesh_config(path: Path) -> MeshConfig:
    """Read, parse and validate a mesh config file; ConfigError names file, field path and reason."""
    return parse_mesh_config(path, read_yaml_mapping(path))


def _port(reader: FieldReader, key: str) -> int:
    port = reader.get(key, int)
    if not 1 <= port <= 65535:
        raise reader.error(key, f"{port} is not a port (1-65535)")
    return port


def _name(reader: FieldReader, key: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise reader.error(key, f"{value!r} must be a DNS label: lowercase letters, digits and '-'")
    return value


def _host_port(reader: FieldReader, key: str, value: object) -> tuple[str, int]:
    try:
        host, port = parse_host_port(value)
    except ValueError as error:
        raise reader.error(key, str(error)) from None
    if port == 0:
        raise reader.error(key, f"{value!r}: port 0 is not allowed")
    return host, port


def _ip(reader: FieldReader, key: str, default: str) -> str:
    value = reader.get(key, str, default)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise reader.error(key, f"{value!r} is not an IP address (Envoy listeners bind to addresses)") from None


def _allow_rule(reader: FieldReader, key: str, value: object, trust_domain: str) -> AllowRule:
    if value == "*":
        return AllowRule(any_identity=True)
    if isinstance(value, str) and value.startswith("namespace:"):
        return AllowRule(namespace=_name(reader, key, value.removeprefix("namespace:")))
    if isinstance(value, str) and value.startswith("spiffe://"):
        try:
            spiffe_id = SpiffeId.parse(value)
        except InvalidSpiffeId as error:
            raise reader.error(key, str(error)) from None
        if spiffe_id.trust_domain != trust_domain:
            raise reader.error(key, f"{value!r} is not in trust domain {trust_domain!r}")
        return AllowRule(spiffe_id=spiffe_id)
    raise reader.error(key, f"{value!r} must be a SPIFFE ID, 'namespace:<ns>' or '*'")


def _service(reader: FieldReader, name: str, data: object, trust_domain: str) -> Service:
    if not isinstance(data, Mapping):
        raise reader.error(name, "must be a mapping")
    sub = reader.child(name, data)
    sub.check_known({"namespace", "service_account", "inbound", "outbound", "endpoints", "allow"})
    namespace = _name(sub, "namespace", sub.get("namespace", str))
    service_account = _name(sub, "service_account", sub.get("service_account", str, name))
    inbound = None
    inbound_data = sub.get("inbound", Mapping, None)
    if inbound_data is not None:
        ib = sub.child("inbound", inbound_data)
        ib.check_known({"port", "app", "listen_address"})
        app_host, app_port = _host_port(ib, "app", ib.get("app", str))
        inbound = Inbound(_port(ib, "port"), app_host, app_port, _ip(ib, "listen_address", "0.0.0.0"))
    outbound = None
    outbound_data = sub.get("outbound", Mapping, None)
    if outbound_data is not None:
        ob = sub.child("outbound", outbound_data)
        ob.check_known({"port", "listen_address"})
        outbound = Outbound(_port(ob, "port"), _ip(ob, "listen_address", "127.0.0.1"))
    raw_endpoints = sub.get("endpoints", list, None)
    if raw_endpoints is None:
        endpoints: tuple[tuple[str, int], ...] = ((("127.0.0.1", inbound.port),) if inbound is not None else ())
    else:
        if inbound is None:
            raise sub.error("endpoints", "a service without 'inbound' cannot have endpoints")
        # `endpoints: []`: no static endpoints, only those its sidecars register (meshca.mesh.endpoints)
        endpoints = tuple(_host_port(sub, f"endpoints[{i}]", e) for i, e in enumerate(raw_endpoints))
    allow = tuple(
        _allow_rule(sub, f"allow[{i}]", rule, trust_domain) for i, rule in enumerate(sub.get("allow", list, []))
    )
    if allow and inbound is None:
        raise sub.error("allow", "only a service with 'inbound' accepts callers")
    if inbound is None and outbound is None:
        raise sub.error("", "needs 'inbound' (it serves), 'outbound' (it calls others) or both")
    return Service(
        name=name,
        namespace=namespace,
        service_account=service_account,
        spiffe_id=SpiffeId.for_service_account(trust_domain, namespace, service_account),
        inbound=inbound,
        outbound=outbound,
        endpoints=endpoints,
        allow=allow,
    )


def _route(reader: FieldReader, index: int, data: object, services: Mapping[str, Service]) -> HttpRoute:
    key = f"routes[{index}]"
    if not isinstance(data, Mapping):
        raise reader.error(key, "must be a mapping")
    sub = reader.child(key, data)
    sub.check_known({"prefix", "to", "split"})
    prefix = sub.get("prefix", str)
    if not prefix.startswith("/"):
        raise sub.error("prefix", f"{prefix!r} must start with '/'")
    if ("to" in data) == ("split" in data):
        raise sub.error("", "needs exactly one of 'to' (a service) or 'split' (service: weight)")
    if "to" in data:
        targets: tuple[RouteTarget, ...] = (RouteTarget(sub.get("to", str), 1),)
        field_of = {targets[0].service: "to"}
    else:
        split = sub.get("split", Mapping)
        if not split:
            raise sub.error("split", "must name at least one service")
        targets = tuple(RouteTarget(str(name), weight) for name, weight in split.items())
        field_of = {t.service: f"split.{t.service}" for t in targets}
        for target in targets:
            if isinstance(target.weight, bool) or not isinstance(target.weight, int) or target.weight < 0:
                raise sub.error(field_of[target.service], f"weight {target.weight!r} must be an integer >= 0")
        if sum(t.weight for t in targets) == 0:
            raise sub.error("split", "weights must not all be 0")
    for target in targets:
        service = services.get(target.service)
        if service is None:
            known = ", ".join(sorted(services)) or "none"
            raise sub.error(field_of[target.service], f"unknown service {target.service!r} (known: {known})")
        if service.inbound is None:
            raise sub.error(field_of[target.service], f"service {target.service!r} has no 'inbound': nothing to call")
    return HttpRoute(prefix, targets)


def parse_mesh_config(path: Path, data: Mapping[str, Any]) -> MeshConfig:
    reader = FieldReader(path, data)
    reader.check_known({"trust_domain", "services", "routes"})
    trust_domain = reader.get("trust_domain", str)
    try:
        SpiffeId(trust_domain)
    except InvalidSpiffeId as error:
        raise reader.error("trust_domain", str(error)) from None
    services_data = reader.get("services", Mapping)
    services_reader = reader.child("services", services_data)
    services: dict[str, Service] = {}
    for name in services_data:
        _name(services_reader, str(name), name)
        services[name] = _service(services_reader, name, services_data[name], trust_domain)
    _check_ports(services_reader, services)
    routes = tuple(_route(reader, i, item, services) for i, item in enumerate(reader.get("routes", list, [])))
    return MeshConfig(trust_domain, tuple(services.values()), routes)


def _check_ports(reader: FieldReader, services: Mapping[str, Service]) -> None:
    """Two listeners of the same identity's sidecar cannot share a port."""
    seen: dict[tuple[SpiffeId, int], str] = {}
    for service in services.values():
        for kind, listener in (("inbound", service.inbound), ("outbound", service.outbound)):
            if listener is None:
                continue
            key = (service.spiffe_id, listener.port)
            if key in seen:
                raise reader.error(
                    f"{service.name}.{kind}.port", f"port {listener.port} is already used by {seen[key]}"
                )
            seen[key] = f"{service.name}.{kind}"


__all__ = ["ConfigError", "MeshConfig", "Service", "HttpRoute", "RouteTarget", "AllowRule", "load_mesh_config"]
