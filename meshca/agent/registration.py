"""The agent's side of meshca.v1.EndpointService: keeps a workload's endpoints registered while the agent lives."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc

from meshca.backoff import backoff_delay
from meshca.files import read_no_follow
from meshca.mesh.endpoints import RegisteredEndpoint as Endpoint  # the one endpoint value type, both sides
from meshca.v1 import endpoints_pb2, endpoints_pb2_grpc

DEFAULT_INITIAL_BACKOFF = timedelta(milliseconds=200)
# Short: after a meshca restart the agents must be registered again within its warmup
# (meshca.mesh.endpoints.RegistrationTiming, 5 s), before proxies that come back are served.
DEFAULT_MAX_BACKOFF = timedelta(seconds=2)
# For the agent's channels to meshca: ping every 10 s, so a hung or unreachable replica is left within ~20 s
# (meshca allows pings every 5 s; meshca pings the agent too, which is how its death is noticed there).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # grpc's own reconnect backoff (1 s growing to 120 s by default) would keep a channel that failed through a long
    # meshca outage unconnected for many seconds after meshca is back, whatever keep_registered's delays are.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


@dataclass(frozen=True)
class Registered:
    """What meshca answered: the identity it saw and the services it accepted."""

    spiffe_id: str
    accepted_services: tuple[str, ...]


# The most the agent reads of a token or an endpoints.yaml: a JWT is a few KiB, and a file in a directory a workload
# writes (workloads_dir) is refused past this, not read.
TOKEN_LIMIT = 65536


class TokenUnreadable(Exception):
    """The token file cannot be read (its path and the reason; never its content)."""

    def __init__(self, path: Path, reason: str, unreadable: bool = True) -> None:
        super().__init__(f"token file {path}: cannot read it ({reason})" if unreadable else f"token file {path}: {reason}")
        self.path = path
        self.reason = reason  # the OS's reason, or what is wrong with the content


def read_token(path: Path, no_symlink: bool = False) -> str:
    """The JWT in `path`, read now (it rotates: never cached); surrounding whitespace (a trailing newline) is dropped. `no_symlink`: a
    file in a directory the workload writes (meshca.files.read_no_follow)."""
    try:
        raw = read_no_follow(path, TOKEN_LIMIT) if no_symlink else path.read_bytes()
        token = raw.decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise TokenUnreadable(path, reason) from None
    if not token:
        raise TokenUnreadable(path, "empty", unreadable=False)
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
    rng: random.Random | None = None,
    token_no_symlink: bool = False,
    withdraw: asyncio.Event | None = None,
) -> None:
    """Hold a Register stream open (to one of `channels`, the meshca replicas, the next one after each failure)
    until cancelled; the registration lives as long as the stream does.

    The token file is re-read for every new stream. A stream meshca ends at its token's expiry is opened again at
    once (a stale token file is then refused and retried as any failure). Failures (meshca unreachable, the stream ending, a refusal)
    are retried after a capped exponential backoff (each delay between half and all of it, so that agents whose
    streams a meshca restart ended together do not come back together), reset once a stream has been accepted. `on_registered` runs
    when meshca accepted the endpoints, `on_lost` (with one line why) when an accepted stream ended.

    Cancelled, the stream just ends: meshca keeps the endpoints for its grace (an agent restart leaves no gap).
    `withdraw` set: the endpoints are withdrawn at once (an empty request, answered within 2 s) and this returns —
    for a workload that is gone."""
    if not channels:
        raise ValueError("keep_registered needs at least one channel to meshca")
    request = endpoints_pb2.RegisterRequest(
        endpoints=[endpoints_pb2.Endpoint(service=e.service, address=e.address, port=e.port) for e in endpoints]
    )
    rng = rng if rng is not None else random.Random()
    attempt = 0
    replica = 0
    withdrawn = asyncio.Event() if withdraw is None else withdraw
    while not withdrawn.is_set():
        accepted = False
        token_expired = False
        try:
            token = read_token(token_file, token_no_symlink)
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
                # meshca answers only requests, so this read returns when the stream ends (or answers a withdrawal)
                reading = asyncio.ensure_future(call.read())
                if await _withdrawn_first(reading, withdrawn):
                    await call.write(endpoints_pb2.RegisterRequest())
                    await asyncio.wait_for(reading, 2.0)
                    logger.info("endpoints of %s withdrawn", ", ".join(registered.accepted_services))
                    return
                reading.result()
                why = "meshca ended the registration stream"
            finally:
                call.cancel()
        except TokenUnreadable as error:
            why = str(error)
        except grpc.aio.AioRpcError as error:
            why = f"{error.code().name}: {error.details()}"
            token_expired = accepted and error.code() is grpc.StatusCode.UNAUTHENTICATED
        except (ConnectionError, asyncio.TimeoutError) as error:
            why = str(error) or "meshca did not answer the withdrawal"
        if withdrawn.is_set():
            return
        if accepted and on_lost is not None:
            on_lost(why)
        if token_expired:  # meshca ended an accepted stream at its token's expiry: again at once, same replica
            logger.info("endpoint registration: %s; registering again with the token file read now", why)
            continue
        attempt += 1
        replica += 1
        delay = backoff_delay(attempt, initial_backoff, max_backoff) * rng.uniform(0.5, 1.0)
        logger.warning("endpoint registration: %s; retrying in %.1f s", why, delay.total_seconds())
        await sleep(delay.total_seconds())



async def _withdrawn_first(reading: asyncio.Future[object], withdraw: asyncio.Event) -> bool:
    """Wait until `reading` (the stream's next read) is done (False) or `withdraw` is set first (True; the read goes
    on: cancelling it would cancel the whole call, and it is the withdrawal's answer)."""
    waiting = asyncio.ensure_future(withdraw.wait())
    try:
        done, _ = await asyncio.wait((reading, waiting), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        reading.cancel()
        raise
    finally:
        waiting.cancel()
    return reading not in done
