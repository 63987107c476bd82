"""Baseline server: a bare grpc.aio server (same TLS, same options as meshca's) holding idle bidi streams.

    python -m benchmarks.rawserver '{"cert": ..., "key": ...}'

Each stream echoes its first message, then writes whatever is queued for it; `fanout` queues the
same bytes to every stream — the least any server must do to deliver a change. With
`"read_acks": true` it also reads (and drops) everything its clients send after that. `Unary`
answers any request with `unary_response_bytes` bytes and does nothing else (the CSR benchmark's
transport floor).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks.common import child_args, cpu_seconds, emit, rss_kb, serve_commands


async def main() -> None:
    args = child_args()
    queues: set[asyncio.Queue[bytes]] = set()

    async def drain(context: grpc.aio.ServicerContext) -> None:
        """Read what the client sends (its ACKs) and drop it, as meshca must read and handle them."""
        try:
            while await context.read() is not grpc.aio.EOF:
                pass
        except Exception:  # the stream ended
            pass

    async def hold(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        await context.write(first)
        reader = asyncio.ensure_future(drain(context)) if args.get("read_acks") else None
        inbox: asyncio.Queue[bytes] = asyncio.Queue()
        queues.add(inbox)
        try:
            while True:
                await context.write(await inbox.get())
        finally:
            queues.discard(inbox)
            if reader is not None:
                reader.cancel()

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    )
    unary_response = b"r" * args.get("unary_response_bytes", 0)

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return unary_response

    handler = grpc.method_handlers_generic_handler(
        "bench.Raw",
        {
            "Hold": grpc.stream_stream_rpc_method_handler(hold),
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
        },
    )
    server.add_generic_rpc_handlers([handler])
    credentials = grpc.ssl_server_credentials([(Path(args["key"]).read_bytes(), Path(args["cert"]).read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    gc.collect()

    async def fanout(cmd: dict[str, Any]) -> dict[str, Any]:
        payload = Path(cmd["payload"]).read_bytes()
        t0 = time.monotonic()
        for inbox in list(queues):
            inbox.put_nowait(payload)
        return {"t0": t0, "streams": len(queues), "bytes": len(payload)}

    async def stats(cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd.get("gc"):
            gc.collect()
        return {"rss_kb": rss_kb(os.getpid()), "cpu_seconds": cpu_seconds(os.getpid()), "streams": len(queues)}

    emit({"event": "ready", "port": port, "pid": os.getpid(), "rss_kb": rss_kb(os.getpid())})
    try:
        await serve_commands({"fanout": fanout, "stats": stats})
    finally:
        await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main())
