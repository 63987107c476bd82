"""The agent's side of meshca.v1.EndpointService: keeps a workload's endpoints registered while the agent lives."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc

from meshca.backoff import backoff_delay
from meshca.mesh.endpoints import RegisteredEndpoint as Endpoint  # the one endpoint value type, both sides
from meshca.v1 import endpoints_pb2, endpoints_pb2_grpc

DEFAULT_INITIAL_BACKOFF = timedelta(milliseconds=200)
DEFAULT_MAX_BACKOFF = timedelta(seconds=15)
# For the agent's channels to meshca: ping every 10 s, so a hung or unreachable replica is left within ~20 s
# (meshca allows pings every 5 s; meshca pings the agent too, which is how its death is noticed there).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


@dataclass(frozen=True)
class Registered:
    """What meshca answered: the identity it saw and the services it accepted."""

    spiffe_id: str
    accepted_services: tuple[str, ...]


class TokenUnreadable(Exception):
    """The token file cannot be read (its path and the OS reason; never its content)."""


def read_token(path: Path) -> str:
    """The JWT in `path`, read now (it rotates: never cached); one trailing newline is tolerated."""
    try:
        token = path.read_text(encoding="ascii").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise TokenUnreadable(f"token file {path}: cannot read it ({reason})") from None
    if not token:
        raise TokenUnreadable(f"token file {path}: empty")
    return token


async def keep_registered(
    channels: Sequence[grpc.aio.Channel],
    token_file: Path,
    endpoints: Sequence[Endpoint],
    logger: logging.Logger,
    *,
    on_registered: Callable[[Registered], object] | None = None,
    on_lost: Callable[[str], object] | None = None,
    initial_backoff: timedelta = DEFAULT_INITIAL_BACKOFF,
    max_backoff: timedelta = DEFAULT_MAX_BACKOFF,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Hold a Register stream open (to one of `channels`, the meshca replicas, the next one after each failure)
    until cancelled; the registration lives as long as the stream does.

    The token file is re-read for every new stream. A stream meshca ends at its token's expiry is opened again at
    once (a stale token file is then refused and retried as any failure). Failures (meshca unreachable, the stream ending, a refusal)
    are retried after a capped exponential backoff, reset once a stream has been accepted. `on_registered` runs
    when meshca accepted the endpoints, `on_lost` (with one line why) when an accepted stream ended."""
    if not channels:
        raise ValueError("keep_registered needs at least one channel to meshca")
    request = endpoints_pb2.RegisterRequest(
        endpoints=[endpoints_pb2.Endpoint(service=e.service, address=e.address, port=e.port) for e in endpoints]
    )
    attempt = 0
    replica = 0
    while True:
        accepted = False
        token_expired = False
        try:
            token = read_token(token_file)
            stub = endpoints_pb2_grpc.EndpointServiceStub(channels[replica % len(channels)])
            call = stub.Register(metadata=(("authorization", f"Bearer {token}"),))
            del token
            try:
                await call.write(request)
                answer = await call.read()
                if answer is grpc.aio.EOF:
                    raise ConnectionError("meshca ended the stream without an answer")
                accepted = True
                attempt = 0
                registered = Registered(answer.spiffe_id, tuple(answer.accepted_services))
                logger.info(
                    "endpoints of %s registered as %s", ", ".join(registered.accepted_services), registered.spiffe_id
                )
                if on_registered is not None:
                    on_registered(registered)
                await call.read()  # meshca answers only requests: this returns when the stream ends
                why = "meshca ended the registration stream"
            finally:
                call.cancel()
        except TokenUnreadable as error:
            why = str(error)
        except grpc.aio.AioRpcError as error:
            why = f"{error.code().name}: {error.details()}"
            token_expired = accepted and error.code() is grpc.StatusCode.UNAUTHENTICATED
        except ConnectionError as error:
            why = str(error)
        if accepted and on_lost is not None:
            on_lost(why)
        if token_expired:  # meshca ended an accepted stream at its token's expiry: again at once, same replica
            logger.info("endpoint registration: %s; registering again with the token file read now", why)
            continue
        attempt += 1
        replica += 1
        delay = backoff_delay(attempt, initial_backoff, max_backoff)
        logger.warning("endpoint registration: %s; retrying in %.1f s", why, delay.total_seconds())
        await sleep(delay.total_seconds())
