"""A proxy that stops reading does not slow the others down."""

from __future__ import annotations

from pathlib import Path

from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from meshca_harness import TRUST_DOMAIN, running_meshca
from xds_client import XdsClient

from meshca import resources as r
from meshca.identity import SpiffeId
from meshca.meshbuild import MeshResources
from meshca.snapshot import ResourceType, encode_resource

CDS = ResourceType.CLUSTER.type_url


def huge_cluster() -> object:
    """An 8 MB Cluster: more than any HTTP/2 flow-control window lets through unread."""
    message = Cluster(name="huge", type=ClusterDiscoveryType.STATIC, alt_stat_name="x" * 8_000_000)
    return encode_resource(ResourceType.CLUSTER, "huge", message)


async def test_slow_reader_does_not_delay_other_proxies(tmp_path: Path) -> None:
    async with running_meshca(tmp_path) as meshca:
        slow_id = SpiffeId.for_service_account(TRUST_DOMAIN, "shop", "slow")
        shared = [r.cluster(r.ClusterSpec("backend")), r.cluster_load_assignment("backend", [("127.0.0.1", 1)])]
        meshca.app.publisher.set_mesh(MeshResources(tuple(shared), {slow_id: (huge_cluster(),)}))

        channel = meshca.channel()
        slow = channel.stream_stream("/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources")(
            metadata=[("authorization", f"Bearer {meshca.token('shop', 'slow')}")]
        )
        fast = XdsClient(meshca.channel(), meshca.token("shop", "fast"))
        from envoy_data_plane.envoy.config.core.v3 import Node
        from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest

        await slow.write(bytes(DiscoveryRequest(type_url=CDS, node=Node(id="slow-1"))))  # and never reads
        await fast.send(CDS, node_id="fast-1")
        first = await fast.recv()
        await fast.ack(first)
        # the fast proxy keeps getting updates promptly while the slow one is stuck
        for port in (2, 3, 4):
            shared[1] = r.cluster_load_assignment("backend", [("127.0.0.1", port)])
            shared.append(r.cluster(r.ClusterSpec(f"extra-{port}")))
            shared.append(r.cluster_load_assignment(f"extra-{port}", [("127.0.0.1", port)]))
            meshca.app.publisher.set_mesh(MeshResources(tuple(shared), {slow_id: (huge_cluster(),)}))
            update = await fast.recv(timeout=2)
            await fast.ack(update)
            assert len(update.resources) == 1 + (port - 1)
        # the slow proxy is still connected, stuck on its first response: at most one response
        # per type is ever outstanding (the protocol waits for an ACK), so nothing piles up for it
        assert sorted(p.node_id for p in meshca.app.registry.snapshot()) == ["fast-1", "slow-1"]
        slow.cancel()
        fast.close()
