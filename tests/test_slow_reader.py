"""A proxy that stops reading does not slow the others down, and is closed after the send timeout."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.service.discovery.v3 import DeltaDiscoveryRequest, DiscoveryRequest
from meshca_harness import TRUST_DOMAIN, RunningMeshca, running_meshca
from snapshot_helpers import encode_resource
from xds_client import XdsClient

from meshca.identity.spiffe import SpiffeId
from meshca.mesh import resources as r
from meshca.mesh.build import MeshResources
from meshca.xds import server as xds_server
from meshca.xds.server import ADS_METHOD, DELTA_ADS_METHOD
from meshca.xds.snapshot import EncodedResource, ResourceType

CDS = ResourceType.CLUSTER.type_url
SEND_TIMEOUT = timedelta(seconds=1)
CLOSE_MARGIN = 1.5  # seconds past the send timeout; generous for a loaded CI machine


def huge_cluster() -> EncodedResource:
    """An 8 MB Cluster: more than any HTTP/2 flow-control window lets through unread."""
    message = Cluster(name="huge", type=ClusterDiscoveryType.STATIC, alt_stat_name="x" * 8_000_000)
    return encode_resource(ResourceType.CLUSTER, "huge", message)


class Mesh:
    """Shared clusters for everyone, plus the huge one only the `slow` service account gets."""

    def __init__(self, meshca: RunningMeshca) -> None:
        self._meshca = meshca
        self._slow_id = SpiffeId.for_service_account(TRUST_DOMAIN, "shop", "slow")
        self._huge = huge_cluster()
        self.shared = [r.cluster(r.ClusterSpec("backend")), r.cluster_load_assignment("backend", [("127.0.0.1", 1)])]
        self.publish()

    def publish(self) -> None:
        self._meshca.app.publisher.set_mesh(MeshResources(tuple(self.shared), {self._slow_id: (self._huge,)}))

    def add_cluster(self, port: int) -> None:
        self.shared[1] = r.cluster_load_assignment("backend", [("127.0.0.1", port)])
        self.shared.append(r.cluster(r.ClusterSpec(f"extra-{port}")))
        self.shared.append(r.cluster_load_assignment(f"extra-{port}", [("127.0.0.1", port)]))
        self.publish()


def connected(meshca: RunningMeshca) -> list[str]:
    return sorted(p.node_id for p in meshca.app.registry.snapshot())


async def fast_proxy(meshca: RunningMeshca) -> XdsClient:
    fast = XdsClient(meshca.channel(), meshca.token("shop", "fast"))
    await fast.send(CDS, node_id="fast-1")
    await fast.ack(await fast.recv())
    return fast


def unread_channel(meshca: RunningMeshca) -> grpc.aio.Channel:
    """A channel whose streams get no more than 64 KiB unread: BDP probing would widen the window."""
    return grpc.aio.secure_channel(
        f"127.0.0.1:{meshca.port}",
        grpc.ssl_channel_credentials(root_certificates=meshca.root_pem),
        options=[("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", -1)],
    )


async def open_unread_stream(meshca: RunningMeshca, method: str, request: bytes) -> grpc.aio.StreamStreamCall:
    """A stream from `slow-1` (who gets the 8 MB cluster) that sends `request` and never reads."""
    channel = unread_channel(meshca)
    stream = channel.stream_stream(method)(metadata=[("authorization", f"Bearer {meshca.token('shop', 'slow')}")])
    await stream.write(request)
    await asyncio.wait_for(wait_until_listed(meshca, "slow-1"), 5)
    return stream


async def wait_until_listed(meshca: RunningMeshca, node_id: str) -> None:
    while node_id not in connected(meshca):
        await asyncio.sleep(0.01)


async def wait_until_gone(meshca: RunningMeshca, node_id: str, since: float) -> float:
    """Seconds from `since` until the registry stops listing `node_id` (bounded by the send timeout)."""
    loop = asyncio.get_running_loop()
    while node_id in connected(meshca):
        assert loop.time() - since < SEND_TIMEOUT.total_seconds() + CLOSE_MARGIN, f"{node_id} not closed"
        await asyncio.sleep(0.05)
    return loop.time() - since


async def test_slow_reader_does_not_delay_other_proxies(tmp_path: Path) -> None:
    async with running_meshca(tmp_path) as meshca:
        mesh = Mesh(meshca)
        slow = meshca.channel().stream_stream(ADS_METHOD)(
            metadata=[("authorization", f"Bearer {meshca.token('shop', 'slow')}")]
        )
        await slow.write(bytes(DiscoveryRequest(type_url=CDS, node=Node(id="slow-1"))))  # and never reads
        fast = await fast_proxy(meshca)
        # the fast proxy keeps getting updates promptly while the slow one is stuck
        for port in (2, 3, 4):
            mesh.add_cluster(port)
            update = await fast.recv(timeout=2)
            await fast.ack(update)
            assert len(update.resources) == 1 + (port - 1)
        # the slow proxy is still connected (within the default 30 s send timeout), stuck on its first
        # response: at most one response per type is ever outstanding (the protocol waits for an ACK),
        # so nothing piles up for it
        assert connected(meshca) == ["fast-1", "slow-1"]
        slow.cancel()
        fast.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_proxy_that_stops_reading_is_closed_after_the_send_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, delta: bool
) -> None:
    async with running_meshca(tmp_path, xds_send_timeout=SEND_TIMEOUT) as meshca:
        mesh = Mesh(meshca)
        fast = await fast_proxy(meshca)
        request = (DeltaDiscoveryRequest if delta else DiscoveryRequest)(type_url=CDS, node=Node(id="slow-1"))
        started = asyncio.get_running_loop().time()
        slow = await open_unread_stream(meshca, DELTA_ADS_METHOD if delta else ADS_METHOD, bytes(request))

        # the others keep getting pushes while the slow one's write waits
        for port in (2, 3):
            mesh.add_cluster(port)
            update = await fast.recv(timeout=2)
            await fast.ack(update)
            assert len(update.resources) == 1 + (port - 1)
        assert connected(meshca) == ["fast-1", "slow-1"]

        assert await wait_until_gone(meshca, "slow-1", started) >= SEND_TIMEOUT.total_seconds()
        assert connected(meshca) == ["fast-1"]

        # gRPC core sent the status as trailers plus RST_STREAM; grpc.aio reports it on the next read
        with pytest.raises(grpc.aio.AioRpcError) as closed:
            await asyncio.wait_for(slow.read(), 2)
        assert closed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert closed.value.details() == "xDS stream closed: client did not read a response for 1 s"
        assert meshca.app.registry.totals().send_timeouts == 1
        warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
        assert any("node slow-1 did not read a response for 1 s" in message for message in warnings), warnings

        mesh.add_cluster(4)
        update = await fast.recv(timeout=2)
        assert len(update.resources) == 4
        fast.close()


async def test_stream_is_dropped_even_if_grpc_cannot_cancel_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a grpcio release lays out its call objects differently, the stream still leaves the registry."""
    monkeypatch.setattr(xds_server, "cancel_rpc", lambda *args: False)
    async with running_meshca(tmp_path, xds_send_timeout=SEND_TIMEOUT) as meshca:
        Mesh(meshca)
        started = asyncio.get_running_loop().time()
        slow = await open_unread_stream(meshca, ADS_METHOD, bytes(DiscoveryRequest(type_url=CDS, node=Node(id="slow-1"))))
        await wait_until_gone(meshca, "slow-1", started)
        assert meshca.app.registry.totals().send_timeouts == 1
        warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
        assert any("xds stream dropped: node slow-1" in message for message in warnings), warnings
        slow.cancel()
