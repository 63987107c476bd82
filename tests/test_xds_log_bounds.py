"""Integration: what clients send reaches meshca's log bounded and escaped, and refusal floods stay a few lines."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from meshca_harness import running_meshca
from xds_client import XdsClient

from meshca.xds.snapshot import ResourceType

CDS = ResourceType.CLUSTER.type_url
SDS = ResourceType.SECRET.type_url
HUGE = 1_000_000


async def test_megabyte_node_id_and_nack_message_give_bounded_escaped_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    node_id = "evil\n{\"level\": \"error\"}" + "n" * HUGE
    async with running_meshca(tmp_path) as meshca:
        client = XdsClient(meshca.channel(), meshca.token("shop", "frontend"))  # no node_id claim: any id binds
        await client.send(SDS, ["default"], node_id=node_id)
        response = await client.recv()
        await client.send(SDS, ["default"], "", response.nonce, error="bad\r\nsecret" + "m" * HUGE)
        for _ in range(100):
            if any("NACK" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.02)
        client.close()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("meshca")]
    assert any("NACK" in line and "bad\\r\\nsecret" in line for line in lines)
    assert any("xds stream opened" in line and "evil\\n" in line for line in lines)
    assert all(len(line) < 1500 and "\n" not in line and "\r" not in line for line in lines), max(map(len, lines))
    assert any(f"({len(node_id)} bytes)" in line for line in lines)  # the size of what was cut is said


async def test_flood_of_refused_streams_gives_a_bounded_number_of_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_meshca(tmp_path) as meshca:
        channel = meshca.channel()
        for _ in range(150):
            client = XdsClient(channel, "not.a.jwt")
            await client.send(CDS, node_id="n")
            assert (await client.status())[0] == grpc.StatusCode.UNAUTHENTICATED
        impostor = meshca.token("shop", "frontend", node_id="frontend-1")
        for _ in range(150):
            client = XdsClient(channel, impostor)
            await client.send(CDS, node_id="backend-1")
            assert (await client.status())[0] == grpc.StatusCode.PERMISSION_DENIED
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert 2 <= len(refused) <= 4, refused
