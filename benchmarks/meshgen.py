"""Synthetic meshes: N services (cluster, 10-endpoint CLA, route, inbound listener) and optional clients.

A layout names the mesh and how load-generator stream `j` maps to an identity and its subscriptions,
so the meshca server process and the load generators derive the same names without talking.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import TRUST_DOMAIN
from meshca.identity.spiffe import SpiffeId
from meshca.mesh.build import OUTBOUND_ROUTES, inbound_listener_name, local_cluster_name, outbound_cluster_name
from meshca.mesh.model import MeshConfig, parse_mesh_config

NAMESPACE = "bench"
INBOUND_PORT = 15006
OUTBOUND_PORT = 15001

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SDS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
TYPES = (CDS, EDS, LDS, RDS, SDS)


@dataclass(frozen=True)
class Layout:
    """`services` serving services (svc-i) and `clients` outbound-only services (client-j).

    Streams map to clients when `streams_are_clients`, else stream j is the sidecar of svc-j
    (j < services) or an identity with no service of its own (extra-j).
    """

    services: int
    endpoints: int = 10
    clients: int = 0
    streams_are_clients: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layout:
        return cls(**data)

    def service_account(self, stream: int) -> str:
        if self.streams_are_clients:
            return f"client-{stream}"
        return f"svc-{stream}" if stream < self.services else f"extra-{stream}"

    def spiffe_id(self, stream: int) -> SpiffeId:
        return SpiffeId.for_service_account(TRUST_DOMAIN, NAMESPACE, self.service_account(stream))

    def subscriptions(self, stream: int) -> dict[str, list[str]]:
        """What an Envoy sidecar of this identity asks for: CDS and LDS wildcard, EDS and RDS by name, SDS."""
        eds = [outbound_cluster_name(f"svc-{i}") for i in range(self.services)]
        rds = [OUTBOUND_ROUTES]
        if not self.streams_are_clients and stream < self.services:
            eds.append(local_cluster_name(f"svc-{stream}"))
            rds.append(inbound_listener_name(f"svc-{stream}"))
        return {CDS: [], EDS: eds, LDS: [], RDS: rds, SDS: ["default", "ROOTCA"]}


def endpoint(service: int, k: int, generation: int = 0) -> str:
    return f"10.{(service // 250) % 250}.{service % 250}.{k + 1}:{INBOUND_PORT + generation}"


def mesh_dict(layout: Layout) -> dict[str, Any]:
    services: dict[str, Any] = {}
    for i in range(layout.services):
        services[f"svc-{i}"] = {
            "namespace": NAMESPACE,
            "service_account": f"svc-{i}",
            "inbound": {"port": INBOUND_PORT, "app": "127.0.0.1:8080"},
            "outbound": {"port": OUTBOUND_PORT},
            "endpoints": [endpoint(i, k) for k in range(layout.endpoints)],
            "allow": [f"namespace:{NAMESPACE}"],
        }
    for j in range(layout.clients):
        services[f"client-{j}"] = {
            "namespace": NAMESPACE,
            "service_account": f"client-{j}",
            "outbound": {"port": OUTBOUND_PORT},
        }
    routes = [{"prefix": f"/svc-{i}/", "to": f"svc-{i}"} for i in range(layout.services)]
    return {"trust_domain": TRUST_DOMAIN, "services": services, "routes": routes}


def mesh_config(layout: Layout) -> MeshConfig:
    return parse_mesh_config(Path("<benchmark mesh>"), mesh_dict(layout))


def with_endpoint_change(config: MeshConfig, service_name: str, generation: int) -> MeshConfig:
    """The same mesh with the first endpoint of one service moved to another port: one CLA changes."""
    services = []
    for service in config.services:
        if service.name == service_name:
            host, port = service.endpoints[0]
            service = dataclasses.replace(service, endpoints=((host, port + 1000 + generation), *service.endpoints[1:]))
        services.append(service)
    return dataclasses.replace(config, services=tuple(services))
