"""The node agent's connections to meshca (meshca.agent.channels): one TLS connection per replica for all its CSRs,
registration streams and trust stream, counted at a real TCP relay in front of a real meshca (MeshcaApp, TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from meshca_harness import make_ca, running_meshca

from meshca.agent.channels import ReplicaChannels
from meshca.agent.csr import CsrClient
from meshca.agent.registration import Endpoint
from meshca.agent.service import NodeAgent
from meshca.agent.settings import AgentSettings, WorkloadSettings
from meshca.agent.trust import TrustAnchor
from meshca.ca import crypto
from meshca.ca.trust_service import FULL_WATCH_METHOD
from meshca.clock import system_clock
from meshca.dev.envoy_process import wait_until
from meshca.mesh.model import parse_mesh_config
from meshca.v1 import trust_pb2

LOG = logging.getLogger("meshca.test.agent.channels")
WORKLOADS = ("a", "b", "c")


class TcpRelay:
    """A real TCP relay (TLS passes through untouched) in front of meshca: every connection made to meshca through
    it is counted, and stop() makes it a replica that died (listener closed, its connections cut)."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.accepted = 0
        self.open = 0
        self.port = 0

    async def start(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)
            self._writers.add(up_writer)
            pipes = [asyncio.create_task(_pipe(reader, up_writer)), asyncio.create_task(_pipe(up_reader, writer))]
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            up_writer.transport.abort()
            self._writers.discard(up_writer)
        finally:
            writer.transport.abort()
            self._writers.discard(writer)
            self.open -= 1

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while data := await source.read(65536):
        sink.write(data)
        await sink.drain()


@contextlib.asynccontextmanager
async def relays(upstream_port: int, count: int) -> AsyncIterator[list[TcpRelay]]:
    started = [await TcpRelay(upstream_port).start() for _ in range(count)]
    try:
        yield started
    finally:
        for relay in started:
            with contextlib.suppress(Exception):
                await relay.stop()


def mesh() -> Any:
    services = {
        f"svc-{w}": {"namespace": "shop", "service_account": w, "inbound": {"port": 15006, "app": "127.0.0.1:8080"},
                     "endpoints": []}
        for w in WORKLOADS
    }
    return parse_mesh_config(Path("mesh.yaml"), yaml.safe_load(yaml.safe_dump({"trust_domain": "mesh.test",
                                                                              "services": services})))


async def until(predicate: Callable[[], object], what: str, timeout: float = 15) -> None:
    """wait_until off the event loop, which runs meshca, the relays and the agent meanwhile."""
    await asyncio.to_thread(wait_until, predicate, timeout, 0.02, what)


async def quick(seconds: float) -> None:
    """The agent's sleeps (renewal waits, backoffs) shortened: renewals follow each other within the test."""
    await asyncio.sleep(min(seconds, 0.1))


async def test_one_connection_per_replica_for_all_csrs_renewals_registrations_and_trust(
    tmp_path: Path, socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A NodeAgent with 3 workloads that each register an endpoint: first certificates, renewals, the three
    registration streams and the trust stream all over ONE TCP connection to the replica in use; the other replica
    is not connected to. When that replica dies, everything moves to the next one, again over one connection."""
    caplog.set_level(logging.INFO)
    async with running_meshca(tmp_path / "meshca", mesh=mesh()) as meshca, relays(meshca.port, 2) as (first, second):
        (tmp_path / "root.pem").write_bytes(meshca.root_pem)
        workloads = []
        for index, name in enumerate(WORKLOADS):
            (tmp_path / f"{name}.jwt").write_text(meshca.token("shop", name))
            workloads.append(WorkloadSettings(name, tmp_path / f"{name}.jwt", socket_dir / f"{name}.sock",
                                              endpoints=(Endpoint(f"svc-{name}", f"10.0.1.{index + 1}", 15006),)))
        settings = AgentSettings(
            meshca=(("127.0.0.1", first.port), ("127.0.0.1", second.port)), server_name="localhost",
            ca=tmp_path / "root.pem", workloads=tuple(workloads),
        )
        agent = NodeAgent(settings, system_clock, LOG, sleep=quick)
        await agent.start()
        try:
            await until(lambda: all(i.issued >= 4 for i in agent.identities), "first certificates and 3 renewals each")
            await until(lambda: meshca.app.endpoints.count() == 3, "the 3 workloads' endpoints registered")
            await until(lambda: agent.trust is not None, "trust material followed")
            issued = sum(i.issued for i in agent.identities)
            assert (first.accepted, second.accepted) == (1, 0), f"after {issued} CSRs, 3 registrations and the trust stream"
            assert first.open == 1
            assert agent.channels.generations == 1  # the bundle adopted from meshca holds the same root: no new channel

            await first.stop()  # the replica in use dies
            registered = caplog.text.count(" registered as spiffe://")
            before = [i.issued for i in agent.identities]
            await until(lambda: all(i.issued >= n + 3 for i, n in zip(agent.identities, before, strict=True)),
                        "3 more renewals each, from the next replica")
            await until(lambda: caplog.text.count(" registered as spiffe://") >= registered + 3,
                        "the 3 registrations again, with the next replica")
            await until(lambda: "trust stream: meshca at 127.0.0.1:%d" % first.port in caplog.text,
                        "the trust stream left the dead replica")
            await asyncio.sleep(0.5)  # the trust stream's next attempt (backoff 0.2 s) is on the next replica
            assert second.accepted == 1, f"after {sum(i.issued for i in agent.identities)} CSRs"
            assert meshca.app.endpoints.count() >= 3
        finally:
            await agent.stop()
        await until(lambda: second.open == 0, "stop closed the agent's connection")
    assert "eyJ" not in caplog.text  # no token in the logs


def csr() -> bytes:
    return crypto.build_csr_pem(crypto.generate_private_key_pem())


async def test_new_roots_make_new_calls_use_a_new_channel_and_the_old_one_closes_when_its_calls_ended(
    tmp_path: Path,
) -> None:
    """TrustAnchor adopts a bundle with another root (a root rotation followed from meshca): the next users get a
    channel made with the new roots (a new TLS connection); the stream still running on the old channel is not
    cut, and the old channel and its connection are closed as soon as that stream ends."""
    async with running_meshca(tmp_path / "meshca") as meshca, relays(meshca.port, 1) as (relay,):
        (tmp_path / "root.pem").write_bytes(meshca.root_pem)
        anchor = TrustAnchor(tmp_path / "root.pem")
        channels = ReplicaChannels([("127.0.0.1", relay.port)], "localhost", anchor.roots)
        signer = CsrClient([("127.0.0.1", relay.port)], "localhost", tmp_path / "root.pem", channels=channels)
        token = meshca.token("shop", "frontend")
        try:
            old = channels[0]
            watch = old.unary_stream(FULL_WATCH_METHOD, request_serializer=trust_pb2.WatchTrustRequest.SerializeToString,
                                     response_deserializer=trust_pb2.TrustMaterial.FromString)(trust_pb2.WatchTrustRequest())
            first_material = await watch.read()
            await signer.sign(csr(), token)
            assert channels[0] is old and relay.accepted == 1  # same roots: same channel, same connection

            other_root = make_ca(tmp_path / "other").trust_bundle_pem()
            anchor.adopt(first_material.bundle_pem.encode() + other_root)  # the roots' bytes change
            signed = await signer.sign(csr(), token)
            assert signed.spiffe_id.endswith("/ns/shop/sa/frontend")
            new = channels[0]
            assert new is not old and channels.generations == 2
            assert relay.accepted == 2  # the new channel's own TLS connection, verified with the new roots
            assert not watch.done() and relay.open == 2  # the old channel's stream still runs: not cut
            assert channels.open_channels() == [new, old]

            watch.cancel()  # the last call started on the old channel ends
            del watch  # (grpc keeps a channel's connection while a call object of it is still referenced)
            await until(lambda: old.closed and relay.open == 1, "the old channel and its connection closed")
            assert channels.open_channels() == [new]
            await signer.sign(csr(), token)
            assert relay.accepted == 2
        finally:
            await channels.close()
        await until(lambda: relay.open == 0, "close() closed the last connection")


async def test_an_unreadable_ca_file_is_one_line_per_attempt_until_a_channel_exists_then_the_channel_is_kept(
    tmp_path: Path,
) -> None:
    async with running_meshca(tmp_path / "meshca") as meshca:
        ca = tmp_path / "root.pem"
        anchor = TrustAnchor(ca)
        channels = ReplicaChannels([("127.0.0.1", meshca.port)], "localhost", anchor.roots)
        signer = CsrClient([("127.0.0.1", meshca.port)], "localhost", ca, channels=channels)
        token = meshca.token("shop", "frontend")
        try:
            for _ in range(2):
                with pytest.raises(Exception) as raised:
                    await signer.sign(csr(), token)
                assert str(raised.value) == f"cannot read ca {ca}: No such file or directory"
            ca.write_bytes(meshca.root_pem)
            await signer.sign(csr(), token)
            made = channels[0]
            ca.unlink()  # e.g. replaced by a non-atomic write: the channel already verified meshca stays in use
            await signer.sign(csr(), token)
            assert channels[0] is made and channels.generations == 1
        finally:
            await channels.close()


async def test_replica_channels_are_a_sequence_of_one_channel_per_replica(tmp_path: Path) -> None:
    """What keep_registered (channels[replica % len(channels)]) and follow_trust (connect(target)) use."""
    (tmp_path / "root.pem").write_bytes(make_ca(tmp_path).trust_bundle_pem())
    channels = ReplicaChannels([("127.0.0.1", 1), ("::1", 2)], "localhost", (tmp_path / "root.pem").read_bytes)
    assert len(channels) == 2 and channels.targets == ("127.0.0.1:1", "[::1]:2")
    try:
        first = channels[0]
        assert channels[0] is first and channels[1] is not first and list(channels) == [first, channels[1]]
        assert channels.connect("[::1]:2") is channels[1]
        assert isinstance(first, grpc.aio.Channel)
    finally:
        await channels.close()
    assert first.closed
