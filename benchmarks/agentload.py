"""Load generator of the agent-start benchmark: workloads started through NodeAgents, or nodes on today's central SDS.

    python -m benchmarks.agentload '{"mode": "agent" | "central", "port": ..., "first": 0, "count": 100, ...}'

- agent: one meshca.agent NodeAgent per workload, in this process (each its own agent start, its one channel to
  meshca for its CSRs, registration stream and trust stream, and its SDS socket). Before the clock starts, an
  EDS observer per workload (an ADS stream of an identity with no service of its own, subscribed to the
  workload's outbound ClusterLoadAssignment, ACKing like Envoy) is opened and has its first answer (with `register` false: no endpoints, no observers).
  `go`: t0 just before the NodeAgent is made and started; `cert_at` when an SDS client on the workload's Unix socket (SotW StreamSecrets, `default`) receives
  the Secret; `endpoint_at` when the observer receives a CLA holding the workload's address.
- central: one node per workload opens its own TLS connection and ADS stream with the workload's JWT and
  asks for `default`. t0 just before the channel is made; `cert_at` when the Secret arrives.

Both modes start the workloads all at once (`wave` 0) or in waves of `wave`, each wave once the previous one
is done. Times are time.monotonic(), one clock for every process of the machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc

from benchmarks.common import child_args, cpu_seconds, emit, serve_commands
from benchmarks.loadgen import ADS_METHOD, ack_bytes, names_field, parse_response, secret_digest
from benchmarks.meshgen import EDS, INBOUND_PORT, NAMESPACE, SDS
from meshca.agent.csr import CsrClient, SignedCertificate
from meshca.agent.registration import Endpoint
from meshca.agent.service import NodeAgent
from meshca.agent.settings import AgentSettings, WorkloadSettings
from meshca.ca import crypto
from meshca.clock import system_clock
from meshca.dev.tokens import mint_token
from meshca.mesh.build import outbound_cluster_name
from meshca.v1 import xds_wire_pb2 as wire

SDS_METHOD = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"
OBSERVER_ACCOUNT = "eds-observer"
OBSERVERS_PER_CHANNEL = 100


def workload_address(index: int) -> str:
    return f"10.{200 + index // 62500}.{(index // 250) % 250}.{index % 250 + 1}"


def _channel_options() -> list[tuple[str, int]]:
    return [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class TimedSigner:
    """The agent's CsrClient, with when each workload's CSR call began (its key and CSR made) and returned."""

    def __init__(self) -> None:
        self.inner: CsrClient | None = None  # set once the agent (whose channels it uses) is made
        self.called_at: float | None = None
        self.returned_at: float | None = None

    async def sign(self, csr_pem: bytes, token: str, ttl: Any = None) -> SignedCertificate:
        if self.called_at is None:
            self.called_at = time.monotonic()
        assert self.inner is not None
        signed = await self.inner.sign(csr_pem, token, ttl)
        if self.returned_at is None:
            self.returned_at = time.monotonic()
        return signed


class Observer:
    """An ADS stream subscribed to one service's outbound CLA; notes when `address` first appears in it."""

    def __init__(self, index: int, service: str, address: str) -> None:
        self.index = index
        self.cluster = outbound_cluster_name(service)
        self.needle = address.encode()
        self.first_answer = asyncio.Event()
        self.seen = asyncio.Event()
        self.seen_at: float | None = None
        self.responses = 0
        self.error: str | None = None

    async def run(self, channel: grpc.aio.Channel, token: str) -> None:
        names = {EDS: names_field([self.cluster])}
        try:
            call = channel.stream_stream(ADS_METHOD)(metadata=[("authorization", f"Bearer {token}")])
            request = wire.DiscoveryRequest(type_url=EDS, resource_names=[self.cluster])
            request.node.id = f"observer-{self.index}"
            request.node.cluster = "bench"
            await call.write(request.SerializeToString())
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    self.error = f"stream ended: {await call.code()}"
                    return
                at = time.monotonic()
                version, type_url, nonce, _ = parse_response(raw)
                self.responses += 1
                if self.seen_at is None and self.needle in raw:
                    self.seen_at = at
                    self.seen.set()
                self.first_answer.set()
                await call.write(ack_bytes(version, names, type_url, nonce))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as error:
            self.error = f"{error.code()}: {error.details()}"
        except Exception as error:  # reported with the results; the benchmark fails on it
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self.first_answer.set()
            self.seen.set()


async def first_default(socket: Path, node_id: str) -> float:
    """When an SDS client on the agent's Unix socket (as Envoy's, SotW) receives the `default` Secret."""
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        call = channel.stream_stream(SDS_METHOD)()
        at = await default_received(call, node_id, f"SDS stream on {socket}")
        call.cancel()
        return at


async def default_received(call: grpc.aio.StreamStreamCall, node_id: str, what: str) -> float:
    """Ask `call` (SDS or ADS, SotW) for the `default` Secret as Envoy does; when it arrived (time.monotonic())."""
    request = wire.DiscoveryRequest(type_url=SDS, resource_names=["default"])
    request.node.id = node_id
    request.node.cluster = "bench"
    await call.write(request.SerializeToString())
    while True:
        raw = await call.read()
        if raw is grpc.aio.EOF:
            raise RuntimeError(f"{what} ended: {await call.code()}")
        at = time.monotonic()
        _, _, _, resources = parse_response(raw)
        if secret_digest(raw, resources, b"default") is not None:
            return at


class AgentLoad:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self.first, self.count = args["first"], args["count"]
        self.root = Path(args["root"])
        self.sockets = Path(args["socket_dir"])
        self.tokens = Path(args["workdir"]) / "tokens"
        self.tokens.mkdir(parents=True, exist_ok=True)
        key = Path(args["signing_key"]).read_bytes()
        now = datetime.now(timezone.utc)
        for i in self.indices:
            token = mint_token(key, namespace=NAMESPACE, service_account=f"svc-{i}", now=now)
            path = self.tokens / f"svc-{i}.jwt"
            path.write_text(token)
            path.chmod(0o600)
        self.observer_token = mint_token(key, namespace=NAMESPACE, service_account=OBSERVER_ACCOUNT, now=now)
        self.log = logging.getLogger("bench-agent")
        self.log.setLevel(logging.WARNING)  # 200 agents' INFO lines would cost this shared CPU
        self.agents: list[NodeAgent] = []
        self.observers: dict[int, Observer] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.channels: list[grpc.aio.Channel] = []

    @property
    def indices(self) -> range:
        return range(self.first, self.first + self.count)

    async def open_observers(self) -> dict[str, Any]:
        """With `register` false the agents register no endpoint and nothing is observed."""
        started = time.monotonic()
        if not self.args.get("register", True):
            return {"event": "ready", "pid": os.getpid(), "observers": 0, "seconds": 0.0}
        credentials = grpc.ssl_channel_credentials(root_certificates=self.root.read_bytes())
        for k, i in enumerate(self.indices):
            if k % OBSERVERS_PER_CHANNEL == 0:
                self.channels.append(grpc.aio.secure_channel(
                    f"127.0.0.1:{self.args['port']}", credentials, options=_channel_options()
                ))
            observer = Observer(i, f"svc-{i}", workload_address(i))
            self.observers[i] = observer
            self.tasks.append(asyncio.create_task(observer.run(self.channels[-1], self.observer_token)))
        await asyncio.wait_for(asyncio.gather(*(o.first_answer.wait() for o in self.observers.values())), 300)
        errors = [o.error for o in self.observers.values() if o.error]
        if errors:
            raise RuntimeError(f"{len(errors)} EDS observers failed, e.g. {errors[0]}")
        return {"event": "ready", "pid": os.getpid(), "observers": len(self.observers),
                "seconds": time.monotonic() - started}

    async def _start_one(self, i: int) -> dict[str, Any]:
        service = f"svc-{i}"
        observer = self.observers.get(i)
        socket = self.sockets / f"w{i}.sock"
        settings = AgentSettings(
            meshca=(("127.0.0.1", self.args["port"]),),
            server_name="localhost",
            ca=self.root,
            workloads=(WorkloadSettings(
                name=service, token_file=self.tokens / f"{service}.jwt", socket=socket,
                endpoints=(Endpoint(service, workload_address(i), INBOUND_PORT),) if observer is not None else (),
            ),),
        )
        t0 = time.monotonic()
        signer = TimedSigner()
        agent = NodeAgent(settings, system_clock, self.log, signer=signer)
        # the agent's own CSR client (as without `signer`): over the agent's channel to meshca
        signer.inner = CsrClient(settings.meshca, settings.server_name, settings.ca, settings.timeout,
                                 roots=agent.anchor.roots, channels=agent.channels)
        self.agents.append(agent)
        await agent.start()
        listening = time.monotonic()
        cert_at = await first_default(socket, f"workload-{i}")
        if observer is not None:
            await observer.seen.wait()
            if observer.error:
                raise RuntimeError(f"EDS observer of {service}: {observer.error}")
        return {
            "index": i,
            "t0": t0,
            "listening": listening,
            "csr_called": signer.called_at,
            "csr_returned": signer.returned_at,
            "cert_at": cert_at,
            "endpoint_at": observer.seen_at if observer is not None else None,
            "eds_responses": observer.responses if observer is not None else 0,
        }

    async def go(self, cmd: dict[str, Any]) -> dict[str, Any]:
        cpu = cpu_seconds(os.getpid())
        samples = await _in_waves(self._start_one, list(self.indices), cmd.get("wave", 0))
        return {"samples": samples, "cpu_seconds": cpu_seconds(os.getpid()) - cpu}

    async def keygen(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """What one attempt's key and CSR cost this process, alone (the agent makes both before its CSR call)."""
        n = cmd.get("n", 50)
        started = time.perf_counter()
        for _ in range(n):
            crypto.build_csr_pem(crypto.generate_private_key_pem(crypto.KeyAlgorithm.EC_P256))
        return {"key_and_csr_ms": (time.perf_counter() - started) / n * 1000}

    async def stop(self, cmd: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        await asyncio.gather(*(agent.stop() for agent in self.agents))
        self.agents = []
        return {"seconds": time.monotonic() - started}

    async def close(self) -> None:
        for agent in self.agents:
            await agent.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()


class CentralLoad:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self.root = Path(args["root"]).read_bytes()
        key = Path(args["signing_key"]).read_bytes()
        now = datetime.now(timezone.utc)
        first, count = args["first"], args["count"]
        self.tokens = {
            i: mint_token(key, namespace=NAMESPACE, service_account=f"svc-{i}", now=now)
            for i in range(first, first + count)
        }
        self.channels: list[grpc.aio.Channel] = []

    async def _start_one(self, i: int) -> dict[str, Any]:
        t0 = time.monotonic()
        credentials = grpc.ssl_channel_credentials(root_certificates=self.root)
        channel = grpc.aio.secure_channel(f"127.0.0.1:{self.args['port']}", credentials, options=_channel_options())
        self.channels.append(channel)
        call = channel.stream_stream(ADS_METHOD)(metadata=[("authorization", f"Bearer {self.tokens[i]}")])
        at = await default_received(call, f"central-{i}", f"ADS stream of svc-{i}")
        return {"index": i, "t0": t0, "cert_at": at}

    async def go(self, cmd: dict[str, Any]) -> dict[str, Any]:
        cpu = cpu_seconds(os.getpid())
        samples = await _in_waves(self._start_one, list(self.tokens), cmd.get("wave", 0))
        return {"samples": samples, "cpu_seconds": cpu_seconds(os.getpid()) - cpu}

    async def stop(self, cmd: dict[str, Any]) -> dict[str, Any]:
        await self.close()
        return {}

    async def close(self) -> None:
        channels, self.channels = self.channels, []
        for channel in channels:
            await channel.close()


async def _in_waves(start: Any, indices: list[int], wave: int) -> list[dict[str, Any]]:
    size = wave if wave > 0 else len(indices)
    samples: list[dict[str, Any]] = []
    for offset in range(0, len(indices), size):
        samples += await asyncio.gather(*(start(i) for i in indices[offset:offset + size]))
    return samples


async def main() -> None:
    args = child_args()
    load: AgentLoad | CentralLoad
    if args["mode"] == "agent":
        agents = load = AgentLoad(args)
        emit(await agents.open_observers())
        handlers = {"go": agents.go, "stop": agents.stop, "keygen": agents.keygen}
    else:
        load = CentralLoad(args)
        emit({"event": "ready", "pid": os.getpid()})
        handlers = {"go": load.go, "stop": load.stop}
    try:
        await serve_commands(handlers)
    finally:
        await load.close()


if __name__ == "__main__":
    asyncio.run(main())
