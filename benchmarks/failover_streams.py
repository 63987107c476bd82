"""Load generator for failover_reconnect: delta ADS streams like Envoy sidecars that, when their replica
dies, reconnect to the next one with `initial_resource_versions` (after Envoy's first jittered backoff).

    python -m benchmarks.failover_streams '{"ports": [a, b], "root": ..., "signing_key": ..., "layout": ...,
                                            "first": 0, "count": 1500, "streams_per_channel": 100}'

Commands: `connect` opens every stream on the first port and answers once each was served (its `default`
certificate arrived): {"t0", "served": [monotonic times], "missing"}. `collect` waits until every stream
was served again after a reconnect and answers the same way (t0 is the parent's: the kill).
A stream is "served" by a replica when its `default` secret arrives from it: the one resource every
replica sends a moving proxy, since each issues its own certificates.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc

from benchmarks.common import child_args, emit, serve_commands
from benchmarks.loadgen import fields
from benchmarks.meshgen import NAMESPACE, SDS, TYPES, Layout
from meshca.v1 import xds_wire_pb2 as wire
from meshca.xds.server import DELTA_ADS_METHOD

_FIRST_BACKOFF_S = 0.25  # the bootstrap's base interval: Envoy's first retry is uniform in [0, 0.25 s)


def _channel(port: int, root_pem: bytes) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=root_pem)
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


def _resources(raw: bytes) -> tuple[str, str, dict[str, str]]:
    """type_url, nonce and name -> version of a DeltaDiscoveryResponse's resources."""
    type_url = nonce = ""
    held: dict[str, str] = {}
    for number, start, end in fields(raw):
        if number == 4:
            type_url = raw[start:end].decode()
        elif number == 5:
            nonce = raw[start:end].decode()
        elif number == 2:
            name = version = ""
            resource = raw[start:end]
            for n2, s2, e2 in fields(resource):
                if n2 == 3:
                    name = resource[s2:e2].decode()
                elif n2 == 1:
                    version = resource[s2:e2].decode()
            held[name] = version
    return type_url, nonce, held


class Stream:
    def __init__(self, index: int, token: str, subscriptions: dict[str, list[str]]) -> None:
        self.index = index
        self.token = token
        self.subscriptions = subscriptions
        self.held: dict[str, dict[str, str]] = {t: {} for t in TYPES}
        self.served: list[float] = []  # when `default` arrived, per connection
        self.replica = 0
        self.error: str | None = None


class FailoverLoad:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        root = Path(args["root"]).read_bytes()
        per_channel = args.get("streams_per_channel", 100)
        count = args["count"]
        groups = (count + per_channel - 1) // per_channel
        self.channels = [[_channel(port, root) for _ in range(groups)] for port in args["ports"]]
        layout = Layout.from_json(args["layout"])
        key = Path(args["signing_key"]).read_bytes()
        from meshca.dev.tokens import mint_token

        now = datetime.now(timezone.utc)
        self.streams = [
            Stream(
                args["first"] + k,
                mint_token(key, namespace=NAMESPACE, service_account=layout.service_account(args["first"] + k), now=now),
                layout.subscriptions(args["first"] + k),
            )
            for k in range(count)
        ]
        self.per_channel = per_channel
        self.tasks: list[asyncio.Task[None]] = []
        self.progress = asyncio.Event()
        self.retries: dict[str, int] = {}  # why a stream had to be reopened on the same replica
        self.gate = asyncio.Semaphore(args.get("connecting", 50))

    async def _run(self, stream: Stream, position: int) -> None:
        """Stay on a replica until it has served the stream once; when the stream ends after that, move on
        to the next replica (a stream refused before being served retries the same one)."""
        while stream.replica < len(self.channels):
            channel = self.channels[stream.replica][position // self.per_channel]
            served_before = len(stream.served)
            try:
                await self._serve_one(stream, channel)
                code = "EOF"
            except grpc.aio.AioRpcError as error:
                code = f"{error.code().name}: {error.details()}"[:120]
            except asyncio.InvalidStateError:  # a write raced the end of the call
                code = "write after the end"
            except asyncio.CancelledError:
                raise
            except Exception as error:  # reported; the benchmark fails on a stream that is never served again
                stream.error = f"{type(error).__name__}: {error}"
                return
            if len(stream.served) > served_before:
                stream.replica += 1
            else:
                self.retries[code] = self.retries.get(code, 0) + 1
            await asyncio.sleep(random.uniform(0, _FIRST_BACKOFF_S))

    async def _serve_one(self, stream: Stream, channel: grpc.aio.Channel) -> None:
        """One stream until it ends. Until it is served it holds one of the `connecting` slots, as
        benchmarks.loadgen does (grpc.aio cancels streams opened by the thousand at once)."""
        await self.gate.acquire()
        holding = True
        try:
            call = channel.stream_stream(DELTA_ADS_METHOD)(metadata=[("authorization", f"Bearer {stream.token}")])
            for position, type_url in enumerate(TYPES):
                request = wire.DeltaDiscoveryRequest(
                    type_url=type_url,
                    resource_names_subscribe=stream.subscriptions[type_url],
                    initial_resource_versions=stream.held[type_url],
                )
                if position == 0:
                    request.node.id = f"bench-{stream.index}"
                    request.node.cluster = "bench"
                await call.write(request.SerializeToString())
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return
                at = time.monotonic()
                type_url, nonce, resources = _resources(raw)
                stream.held[type_url].update(resources)
                await call.write(wire.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce).SerializeToString())
                if type_url == SDS and "default" in resources:
                    stream.served.append(at)
                    self.progress.set()
                    if holding:
                        holding = False
                        self.gate.release()
        finally:
            if holding:
                self.gate.release()

    async def _wait(self, connections: int, timeout: float) -> list[float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(s.served) >= connections or s.error for s in self.streams):
                break
            self.progress.clear()
            try:
                await asyncio.wait_for(self.progress.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
        return [s.served[connections - 1] for s in self.streams if len(s.served) >= connections]

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        self.tasks = [asyncio.create_task(self._run(s, k)) for k, s in enumerate(self.streams)]
        served = await self._wait(1, cmd.get("timeout", 300))
        return {"t0": t0, "served": served, "missing": len(self.streams) - len(served), "errors": self._errors()}

    async def collect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        served = await self._wait(2, cmd.get("timeout", 120))
        return {"served": served, "missing": len(self.streams) - len(served), "errors": self._errors()}

    def _errors(self) -> dict[str, int]:
        errors: dict[str, int] = {f"retried: {why}": n for why, n in self.retries.items()}
        for stream in self.streams:
            if stream.error:
                errors[stream.error[:120]] = errors.get(stream.error[:120], 0) + 1
        return errors

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for group in self.channels:
            for channel in group:
                await channel.close()


async def main() -> None:
    load = FailoverLoad(child_args())
    emit({"event": "ready", "pid": os.getpid(), "streams": len(load.streams)})
    try:
        await serve_commands({"connect": load.connect, "collect": load.collect})
    finally:
        await load.close()


if __name__ == "__main__":
    asyncio.run(main())
