"""Load generator, always its own process (several for many streams), driven by JSON-line commands.

    python -m benchmarks.loadgen '{"mode": "xds" | "raw" | "csr" | "unary" | "bao", ...}'

- xds: ADS streams like Envoy sidecars, each with its own identity (a dev token), subscribed to
  CDS and LDS (wildcard), EDS and RDS (by name), SDS `default` + `ROOTCA`; every response is ACKed.
  Only the top-level fields of responses are read (version, type, nonce); resources are skipped,
  except the `default` secret's bytes, whose hash tells a rotated certificate.
- raw: idle bidi streams against benchmarks.rawserver (the baseline); with "ack" (a file), each
  stream answers every message with those bytes, as an xds stream ACKs.
- csr: N concurrent clients calling meshca.v1.CertificateService/Sign with pre-generated CSRs.
- unary: the csr clients' calls (same N, TLS, message and header sizes) against benchmarks.rawserver's
  empty unary handler: the transport's floor.
- bao: N threads calling OpenBao's `pki/sign/<role>` through hvac with the same CSRs.

Times are `time.monotonic()`, which on Linux is one clock for every process of the machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc

from benchmarks.common import TRUST_DOMAIN, child_args, cpu_seconds, emit, percentile, serve_commands
from meshca.xds.wire import length_delimited

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
RAW_METHOD = "/bench.Raw/Hold"
RAW_UNARY_METHOD = "/bench.Raw/Unary"


# -- protobuf wire reading (top level only) ------------------------------------------------------


def _varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def fields(data: bytes) -> list[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field; other wire types are skipped."""
    out = []
    i, n = 0, len(data)
    while i < n:
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 2:
            length, i = _varint(data, i)
            out.append((key >> 3, i, i + length))
            i += length
        elif wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return out


def names_field(names: Sequence[str]) -> bytes:
    """DiscoveryRequest.resource_names (field 3), encoded."""
    return b"".join(length_delimited(3, name.encode()) for name in names)


def ack_bytes(version: str, names_fields: dict[str, bytes], type_url: str, nonce: str) -> bytes:
    """The ACK DiscoveryRequest, byte for byte what protobuf serializes (fields in number order)."""
    head = length_delimited(1, version.encode()) if version else b""
    return head + names_fields[type_url] + length_delimited(4, type_url.encode()) + length_delimited(5, nonce.encode())


def parse_response(raw: bytes) -> tuple[str, str, str, list[tuple[int, int]]]:
    """version_info, type_url, nonce and the (start, end) of each resource (google.protobuf.Any)."""
    version = type_url = nonce = ""
    resources = []
    for number, start, end in fields(raw):
        if number == 1:
            version = raw[start:end].decode()
        elif number == 2:
            resources.append((start, end))
        elif number == 4:
            type_url = raw[start:end].decode()
        elif number == 5:
            nonce = raw[start:end].decode()
    return version, type_url, nonce, resources


def secret_digest(raw: bytes, resources: Sequence[tuple[int, int]], name: bytes) -> str | None:
    """Hash of the named Secret's bytes in an SDS response, None when it is not there."""
    for start, end in resources:
        any_bytes = raw[start:end]
        for number, s, e in fields(any_bytes):
            if number != 2:
                continue
            secret = any_bytes[s:e]
            for n2, s2, e2 in fields(secret):
                if n2 == 1 and secret[s2:e2] == name:
                    return hashlib.sha256(secret).hexdigest()[:16]
    return None


# -- streams -----------------------------------------------------------------------------------


class StreamState:
    __slots__ = ("index", "versions", "default", "ready", "closed", "error", "armed", "baseline", "hit_at", "hit_bytes")

    def __init__(self, index: int) -> None:
        self.index = index
        self.versions: dict[str, str] = {}
        self.default: str | None = None
        self.ready = False
        self.closed = False
        self.error: str | None = None
        self.armed: str | None = None
        self.baseline: str | None = None
        self.hit_at: float | None = None
        self.hit_bytes = 0

    def arm(self, kind: str) -> None:
        self.armed = kind
        self.hit_at = None
        self.hit_bytes = 0
        if kind == "secret:default":
            self.baseline = self.default
        elif kind.startswith("type:"):
            self.baseline = self.versions.get(kind[5:])
        else:
            self.baseline = None

    def observe(self, type_url: str, version: str, digest: str | None, at: float, size: int) -> None:
        if self.armed is None or self.hit_at is not None:
            return
        kind = self.armed
        if (
            kind == "any"
            or (kind == "secret:default" and digest is not None and digest != self.baseline)
            or (kind.startswith("type:") and kind[5:] == type_url and version != self.baseline)
        ):
            self.hit_at = at
            self.hit_bytes = size


def _secure_channel(port: int, root_pem: bytes) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=root_pem)
    options = [
        ("grpc.use_local_subchannel_pool", 1),  # one TCP+TLS connection per channel
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 60_000),
    ]
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


class StreamLoad:
    """Holds many streams on a few channels and answers arm/collect/status commands."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self.states: list[StreamState] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.calls: list[Any] = []
        self.errors: dict[str, int] = {}
        self._hit = asyncio.Event()
        self.dump_path: str | None = None  # the first change received is saved there (the baseline's bytes)
        self.hit_resources: int | None = None

    def _error(self, state: StreamState, text: str) -> None:
        state.error = text
        key = text[:120]
        self.errors[key] = self.errors.get(key, 0) + 1

    async def open_all(self) -> dict[str, Any]:
        args = self.args
        first, count = args["first"], args["count"]
        per_channel = args.get("streams_per_channel", 100)
        root_pem = Path(args["root"]).read_bytes()
        channels = [_secure_channel(args["port"], root_pem) for _ in range((count + per_channel - 1) // per_channel)]
        self.channels = channels
        gate = asyncio.Semaphore(args.get("connecting", 50))
        started = time.monotonic()
        if args["mode"] == "xds":
            tokens = self._tokens(first, count)
            runner = self._xds_stream
        else:
            tokens = [""] * count
            runner = self._raw_stream
        for k in range(count):
            state = StreamState(first + k)
            self.states.append(state)
            self.tasks.append(asyncio.create_task(runner(state, channels[k // per_channel], tokens[k], gate)))
        deadline = started + args.get("ready_timeout", 600)
        while time.monotonic() < deadline:
            if all(s.ready or s.closed for s in self.states):
                break
            await asyncio.sleep(0.1)
        return {
            "event": "ready",
            "streams": count,
            "ready": sum(s.ready for s in self.states),
            "closed": sum(s.closed for s in self.states),
            "errors": self.errors,
            "seconds": time.monotonic() - started,
            "channels": len(channels),
            "pid": os.getpid(),
        }

    def _tokens(self, first: int, count: int) -> list[str]:
        from benchmarks.meshgen import NAMESPACE, Layout
        from meshca.dev.tokens import mint_token

        layout = Layout.from_json(self.args["layout"])
        key = Path(self.args["signing_key"]).read_bytes()
        now = datetime.now(timezone.utc)
        return [
            mint_token(key, namespace=NAMESPACE, service_account=layout.service_account(first + k), now=now)
            for k in range(count)
        ]

    async def _xds_stream(
        self, state: StreamState, channel: grpc.aio.Channel, token: str, gate: asyncio.Semaphore
    ) -> None:
        from benchmarks.meshgen import SDS, TYPES, Layout
        from meshca.v1 import xds_wire_pb2 as wire

        layout = Layout.from_json(self.args["layout"])
        subscriptions = layout.subscriptions(state.index)
        request_class = wire.DiscoveryRequest
        await gate.acquire()
        holding = True
        try:
            call = channel.stream_stream(ADS_METHOD)(metadata=[("authorization", f"Bearer {token}")])
            self.calls.append(call)
            for position, type_url in enumerate(TYPES):
                request = request_class(type_url=type_url, resource_names=subscriptions[type_url])
                if position == 0:
                    request.node.id = f"bench-{state.index}"
                    request.node.cluster = "bench"
                await call.write(request.SerializeToString())
            # An ACK repeats the stream's names (1,000+ for EDS): encoded once, so that building ACKs
            # does not take the CPU the server under test shares with this process.
            names_fields = {t: names_field(subscriptions.get(t, ())) for t in TYPES}
            pending = set(TYPES)
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    break
                at = time.monotonic()
                version, type_url, nonce, resources = parse_response(raw)
                digest = None
                if type_url == SDS:
                    digest = secret_digest(raw, resources, b"default")
                    if digest is not None:
                        state.default = digest
                state.observe(type_url, version, digest, at, len(raw))
                state.versions[type_url] = version
                ack = ack_bytes(version, names_fields, type_url, nonce)
                await call.write(ack)
                if holding:
                    pending.discard(type_url)
                    if not pending:
                        state.ready = True
                        holding = False
                        gate.release()
                if state.hit_at is not None and state.hit_at == at:
                    self._hit.set()
                    if self.dump_path is not None:
                        Path(self.dump_path).write_bytes(raw)
                        Path(self.dump_path).with_suffix(".ack").write_bytes(ack)
                        self.hit_resources = len(resources)
                        self.dump_path = None
            code = await call.code()
            self._error(state, f"stream ended: {code}")
        except grpc.aio.AioRpcError as error:
            self._error(state, f"{error.code()}: {error.details()}")
        except asyncio.CancelledError:
            raise
        except Exception as error:  # counted and reported; the benchmark fails on it
            self._error(state, f"{type(error).__name__}: {error}")
        finally:
            state.closed = True
            if holding:
                gate.release()

    async def _raw_stream(
        self, state: StreamState, channel: grpc.aio.Channel, token: str, gate: asyncio.Semaphore
    ) -> None:
        ack = Path(self.args["ack"]).read_bytes() if self.args.get("ack") else None  # answer every message
        await gate.acquire()
        holding = True
        try:
            call = channel.stream_stream(RAW_METHOD)()
            self.calls.append(call)
            await call.write(b"hello")
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    break
                at = time.monotonic()
                state.observe("", "", None, at, len(raw))
                if ack is not None:
                    await call.write(ack)
                if holding:
                    state.ready = True
                    holding = False
                    gate.release()
                if state.hit_at == at:
                    self._hit.set()
            self._error(state, f"stream ended: {await call.code()}")
        except grpc.aio.AioRpcError as error:
            self._error(state, f"{error.code()}: {error.details()}")
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._error(state, f"{type(error).__name__}: {error}")
        finally:
            state.closed = True
            if holding:
                gate.release()

    async def arm(self, cmd: dict[str, Any]) -> dict[str, Any]:
        for state in self.states:
            state.arm(cmd["kind"])
        self.dump_path = cmd.get("dump")
        self.hit_resources = None
        return {"armed": len(self.states)}

    async def collect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + cmd.get("timeout", 60)
        while time.monotonic() < deadline:
            if all(s.hit_at is not None or s.closed for s in self.states):
                break
            self._hit.clear()
            try:
                await asyncio.wait_for(self._hit.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
        hits = [s.hit_at for s in self.states if s.hit_at is not None]
        sizes = [s.hit_bytes for s in self.states if s.hit_at is not None]
        return {
            "hits": hits,
            "missing": sum(1 for s in self.states if s.hit_at is None),
            "closed": sum(s.closed for s in self.states),
            "bytes_median": sorted(sizes)[len(sizes) // 2] if sizes else None,
            "hit_resources": self.hit_resources,
            "errors": self.errors,
        }

    async def status(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return {
            "open": sum(not s.closed for s in self.states),
            "closed": sum(s.closed for s in self.states),
            "ready": sum(s.ready for s in self.states),
            "errors": self.errors,
            "cpu_seconds": cpu_seconds(os.getpid()),
        }

    async def close(self) -> None:
        for call in self.calls:
            call.cancel()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in getattr(self, "channels", []):
            await channel.close()


# -- request/response load (CSR service, OpenBao) -----------------------------------------------


def _csr_pool(size: int, uri: str | None = None) -> list[str]:
    from meshca.ca.crypto import build_csr_pem, generate_private_key_pem

    uris = [uri] if uri else []
    return [build_csr_pem(generate_private_key_pem(), uris=uris).decode() for _ in range(size)]


def _summary(done: list[tuple[float, float]], errors: dict[str, int], start: float, end: float) -> dict[str, Any]:
    window = [(t, lat) for t, lat in done if start <= t <= end]
    latencies = [lat for _, lat in window]
    return {
        "completed": len(window),
        "completed_total": len(done),
        "seconds": end - start,
        "rate": len(window) / (end - start),
        "latency_p50_ms": percentile(latencies, 50) * 1000 if latencies else None,
        "latency_p99_ms": percentile(latencies, 99) * 1000 if latencies else None,
        "errors": errors,
        "client_cpu_seconds": cpu_seconds(os.getpid()),
    }


async def _closed_loop(
    concurrency: int, duration: float, warmup: float, call: Callable[[int, int], Awaitable[object]]
) -> dict[str, Any]:
    """`concurrency` clients, each calling `call(client, i)` back to back; counted after `warmup` for `duration`."""
    done: list[tuple[float, float]] = []
    errors: dict[str, int] = {}
    start = time.monotonic() + warmup
    end = start + duration

    async def client(k: int) -> None:
        i = k
        while True:
            t = time.monotonic()
            if t >= end:
                return
            try:
                await call(k, i)
            except grpc.aio.AioRpcError as error:
                errors[str(error.code())] = errors.get(str(error.code()), 0) + 1
                continue
            finished = time.monotonic()
            done.append((finished, finished - t))
            i += concurrency

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return _summary(done, errors, start, end)


async def csr_load(args: dict[str, Any]) -> dict[str, Any]:
    from meshca.dev.tokens import mint_token
    from meshca.v1 import certificate_pb2, certificate_pb2_grpc

    concurrency = args["concurrency"]
    csrs = _csr_pool(args.get("pool", 64))
    key = Path(args["signing_key"]).read_bytes()
    now = datetime.now(timezone.utc)
    tokens = [mint_token(key, namespace="bench", service_account=f"csr-{k}", now=now) for k in range(concurrency)]
    root_pem = Path(args["root"]).read_bytes()
    channels = [_secure_channel(args["port"], root_pem) for _ in range(concurrency)]
    stubs = [certificate_pb2_grpc.CertificateServiceStub(c) for c in channels]
    requests = [certificate_pb2.SignRequest(csr_pem=c) for c in csrs]
    check = await stubs[0].Sign(requests[0], metadata=[("authorization", f"Bearer {tokens[0]}")])
    if check.spiffe_id != f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/csr-0" or len(check.certificate_chain) < 2:
        raise RuntimeError(f"unexpected Sign answer: {check}")
    metadata = [[("authorization", f"Bearer {token}")] for token in tokens]

    def sign(k: int, i: int) -> Awaitable[object]:
        return stubs[k].Sign(requests[i % len(requests)], metadata=metadata[k])

    result = await _closed_loop(concurrency, args["seconds"], args["warmup"], sign)
    for channel in channels:
        await channel.close()
    # What one call carries, for the transport floor (benchmarks.csr_throughput, unary mode).
    result["message_sizes"] = {
        "request_bytes": requests[0].ByteSize(),
        "response_bytes": check.ByteSize(),
        "authorization_bytes": len(metadata[0][0][1]),
    }
    return result


async def unary_load(args: dict[str, Any]) -> dict[str, Any]:
    """The CSR load's calls against benchmarks.rawserver's empty unary handler: same N, TLS, sizes."""
    concurrency, sizes = args["concurrency"], args["message_sizes"]
    root_pem = Path(args["root"]).read_bytes()
    channels = [_secure_channel(args["port"], root_pem) for _ in range(concurrency)]
    calls = [c.unary_unary(RAW_UNARY_METHOD) for c in channels]
    request = b"q" * sizes["request_bytes"]
    # A distinct header value per client, as each CSR client has its own token.
    metadata = [
        [("authorization", f"{k:08d}".ljust(sizes["authorization_bytes"], "x"))] for k in range(concurrency)
    ]
    answer = await calls[0](request, metadata=metadata[0])
    if len(answer) != sizes["response_bytes"]:
        raise RuntimeError(f"rawserver answered {len(answer)} bytes, not {sizes['response_bytes']}")

    def call(k: int, i: int) -> Awaitable[object]:
        return calls[k](request, metadata=metadata[k])

    result = await _closed_loop(concurrency, args["seconds"], args["warmup"], call)
    for channel in channels:
        await channel.close()
    return result


def bao_load(args: dict[str, Any]) -> dict[str, Any]:
    import hvac

    concurrency, duration, warmup = args["concurrency"], args["seconds"], args["warmup"]
    csrs = _csr_pool(args.get("pool", 64))
    done: list[tuple[float, float]] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    start = time.monotonic() + warmup
    end = start + duration

    def sign(client: Any, csr: str, k: int) -> Any:
        return client.secrets.pki.sign_certificate(
            name=args["role"],
            csr=csr,
            common_name="",
            extra_params={
                "uri_sans": f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/csr-{k}",
                "ttl": "3600s",
                "exclude_cn_from_sans": True,
                "format": "pem",
            },
            mount_point=args["mount"],
        )

    check = sign(hvac.Client(url=args["address"], token=args["token"]), csrs[0], 0)
    if "certificate" not in (check.get("data") or {}):
        raise RuntimeError(f"unexpected OpenBao answer: {check}")

    def worker(k: int) -> None:
        client = hvac.Client(url=args["address"], token=args["token"], timeout=30)
        i = k
        local: list[tuple[float, float]] = []
        while True:
            t = time.monotonic()
            if t >= end:
                break
            try:
                sign(client, csrs[i % len(csrs)], k)
            except Exception as error:  # counted per kind
                with lock:
                    errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
                continue
            finished = time.monotonic()
            local.append((finished, finished - t))
            i += concurrency
        with lock:
            done.extend(local)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return _summary(done, errors, start, end)


# -- main --------------------------------------------------------------------------------------


async def main() -> None:
    args = child_args()
    mode = args["mode"]
    if mode in ("xds", "raw"):
        load = StreamLoad(args)
        emit(await load.open_all())
        try:
            await serve_commands({"arm": load.arm, "collect": load.collect, "status": load.status})
        finally:
            await load.close()
        return
    emit({"event": "ready", "pid": os.getpid()})

    async def run(cmd: dict[str, Any]) -> dict[str, Any]:
        merged = {**args, **cmd}
        if mode == "csr":
            return await csr_load(merged)
        if mode == "unary":
            return await unary_load(merged)
        return await asyncio.get_running_loop().run_in_executor(None, bao_load, merged)

    await serve_commands({"run": run})


if __name__ == "__main__":
    asyncio.run(main())
