"""Integration: how meshca ends xDS streams (token expiry, maximum age, shutdown), with the real gRPC server."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from meshca_harness import TRUST_DOMAIN, RunningMeshca, running_meshca
from xds_client import DeltaXdsClient, XdsClient

from meshca.dev.tokens import mint_token
from meshca.identity.spiffe import SpiffeId
from meshca.xds.server import PER_TYPE_METHODS
from meshca.xds.snapshot import ResourceType

CDS = ResourceType.CLUSTER.type_url
SDS = ResourceType.SECRET.type_url
FRONTEND = SpiffeId.for_service_account(TRUST_DOMAIN, "shop", "frontend")


def short_token(meshca: RunningMeshca, ttl: timedelta) -> tuple[str, float]:
    """A frontend token living `ttl`, and its `exp` as a timestamp."""
    now = datetime.now(timezone.utc)
    token = mint_token(meshca.signing_key_pem, namespace="shop", service_account="frontend", now=now, ttl=ttl)
    return token, float(int((now + ttl).timestamp()))


async def secrets_stream(meshca: RunningMeshca, token: str) -> XdsClient:
    client = XdsClient(meshca.channel(), token)
    await client.send(SDS, ["default"], node_id="frontend-1")
    first = await client.recv()
    await client.ack(first, ["default"])
    return client


async def test_stream_ends_when_its_token_expires_and_renewals_stop_flowing(tmp_path: Path) -> None:
    leeway = 1.0
    async with running_meshca(tmp_path, leeway=timedelta(seconds=leeway)) as meshca:
        token, exp = short_token(meshca, timedelta(seconds=2))
        client = await secrets_stream(meshca, token)
        # while the token is valid, a renewed certificate reaches the stream
        meshca.app.rotator.renew(FRONTEND)
        renewed = await client.recv()
        assert renewed.type_url == SDS
        await client.ack(renewed, ["default"])

        code, details = await client.status(timeout=exp + leeway + 3 - time.time())
        ended = time.time()
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "token expired at" in details and "reconnect with a fresh token" in details
        assert exp + leeway - 0.1 <= ended <= exp + leeway + 1.5  # the leeway is honoured, then no longer
        assert meshca.app.registry.snapshot() == []
        # a renewal after expiry has nowhere to go, and a new stream with that token is refused
        meshca.app.rotator.renew(FRONTEND)
        again = XdsClient(meshca.channel(), token)
        await again.send(SDS, ["default"], node_id="frontend-1")
        code, details = await again.status()
        assert code == grpc.StatusCode.UNAUTHENTICATED and "expired" in details


async def test_delta_stream_ends_when_its_token_expires(tmp_path: Path) -> None:
    async with running_meshca(tmp_path, leeway=timedelta(0)) as meshca:
        token, exp = short_token(meshca, timedelta(seconds=2))
        client = DeltaXdsClient(meshca.channel(), token)
        await client.send(CDS, node_id="frontend-1")
        await client.recv()
        code, details = await client.status(timeout=exp + 3 - time.time())
        assert code == grpc.StatusCode.UNAUTHENTICATED and "token expired at" in details


async def test_stream_reaching_its_maximum_age_is_closed_with_unavailable(tmp_path: Path) -> None:
    async with running_meshca(tmp_path, xds_max_stream_age=timedelta(seconds=1)) as meshca:
        started = time.monotonic()
        clients = [await secrets_stream(meshca, meshca.token("shop", "frontend")) for _ in range(3)]
        for client in clients:
            code, details = await client.status(timeout=5)
            assert code == grpc.StatusCode.UNAVAILABLE and "maximum stream age reached" in details
            assert 0.85 <= time.monotonic() - started <= 3.0  # 1 s ±10%, plus scheduling slack
        # the token is long-lived: the proxy simply reconnects
        again = await secrets_stream(meshca, meshca.token("shop", "frontend"))
        again.close()


async def test_stop_ends_every_stream_at_once_with_unavailable_and_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_meshca(tmp_path) as meshca:
        clients: list[XdsClient] = [await secrets_stream(meshca, meshca.token("shop", "frontend")) for _ in range(3)]
        delta = DeltaXdsClient(meshca.channel(), meshca.token("shop", "frontend"))
        await delta.send(CDS, node_id="n")
        await delta.recv()
        per_type = XdsClient(meshca.channel(), meshca.token("shop", "frontend"), PER_TYPE_METHODS[ResourceType.SECRET])
        await per_type.send("", ["default"], node_id="n")
        await per_type.recv()
        unadmitted = XdsClient(meshca.channel(), meshca.token("shop", "frontend"))  # no first request yet
        await asyncio.sleep(0.1)
        clients += [delta, per_type, unadmitted]

        started = time.monotonic()
        await meshca.app.stop(grace=5)
        took = time.monotonic() - started

        statuses = [await client.status(timeout=2) for client in clients]
    assert took < 1.0
    assert all(code == grpc.StatusCode.UNAVAILABLE for code, _ in statuses), statuses
    assert all("shutting down" in details for _, details in statuses), statuses
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert bad == []


async def test_first_request_after_the_token_expired_is_refused(tmp_path: Path) -> None:
    async with running_meshca(tmp_path, leeway=timedelta(0)) as meshca:
        token, exp = short_token(meshca, timedelta(seconds=1))
        client = XdsClient(meshca.channel(), token)  # authenticated at open, while the token is valid
        await asyncio.sleep(exp + 0.2 - time.time())
        await client.send(SDS, ["default"], node_id="frontend-1")
        with pytest.raises(EOFError, match="token expired at"):
            await client.recv()  # no certificate first


async def test_a_stream_that_never_sends_its_first_request_is_closed(tmp_path: Path) -> None:
    """Authenticated but silent: no node, so no identity, token deadline or maximum age applies yet."""
    async with running_meshca(tmp_path, xds_first_request_timeout=timedelta(seconds=0.5)) as meshca:
        channel = meshca.channel()
        silent = XdsClient(channel, meshca.token("shop", "frontend"))  # sends nothing
        code, details = await silent.status(timeout=5)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no first request within 0.5 s" in details
        prompt = await secrets_stream(meshca, meshca.token("shop", "frontend"))  # a normal one is untouched
        await asyncio.sleep(1.0)
        assert meshca.app.registry.snapshot()  # still open after the first-request timeout
        prompt.close()
        await channel.close()
