"""A registration stream cancelled while its put waits for the coalesced rebuild (meshca.mesh.endpoints): its
endpoints leave after the grace, and the other registrations waiting for the same rebuild are not cancelled."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

import grpc
from fakes import FakeClock, FakeTokenAuthenticator
from test_endpoint_registration import BACKEND, FRONTEND, TD, mesh

from meshca.dev.envoy_process import wait_until
from meshca.identity.spiffe import SpiffeId
from meshca.mesh.endpoints import (
    CoalescedWork,
    EndpointServicer,
    RegisteredEndpoint,
    RegisteredEndpoints,
    Registration,
    add_to_server,
)
from meshca.v1 import endpoints_pb2, endpoints_pb2_grpc

LOG = logging.getLogger("test.registration.cancelled")


def register(channel: grpc.aio.Channel, token: str) -> grpc.aio.StreamStreamCall:
    return endpoints_pb2_grpc.EndpointServiceStub(channel).Register(metadata=(("authorization", f"Bearer {token}"),))


async def test_a_stream_cancelled_during_the_rebuild_is_removed_after_the_grace_and_cancels_no_other() -> None:
    rebuilds = CoalescedWork(lambda: time.sleep(0.3), LOG)  # a slow rebuild, as with many services
    endpoints = RegisteredEndpoints(rebuilds.request)
    server = grpc.aio.server()
    add_to_server(server, EndpointServicer(FakeTokenAuthenticator({"b": BACKEND, "f": FRONTEND}), endpoints, mesh,
                                           LOG, grace=timedelta(seconds=0.2), clock=FakeClock()))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            # a rebuild is running: the two registrations below fold into the next one and wait for it together
            running = asyncio.create_task(endpoints.put("other", Registration(SpiffeId.parse(f"spiffe://{TD}/x"), ())))
            await asyncio.sleep(0.05)
            staying = register(channel, "b")
            leaving = register(channel, "f")
            await staying.write(endpoints_pb2.RegisterRequest(
                endpoints=[endpoints_pb2.Endpoint(service="backend", address="10.0.0.7", port=15006)]))
            await leaving.write(endpoints_pb2.RegisterRequest(
                endpoints=[endpoints_pb2.Endpoint(service="frontend", address="10.0.0.8", port=15008)]))
            await asyncio.to_thread(wait_until, lambda: endpoints.count() == 2, 5, 0.01, "both stored, rebuild pending")
            leaving.cancel()  # e.g. its agent stops now

            answer = await asyncio.wait_for(staying.read(), 5)  # not cancelled with it
            assert answer.spiffe_id == BACKEND.uri and list(answer.accepted_services) == ["backend"]
            await running
            await asyncio.to_thread(wait_until, lambda: endpoints.count() == 1, 5, 0.02,
                                    "the cancelled stream's endpoints removed after the grace")
            await asyncio.sleep(0.3)
            assert [r.endpoints for r in endpoints.snapshot() if r.endpoints] == [
                (RegisteredEndpoint("backend", "10.0.0.7", 15006),)
            ]
            assert not staying.done()  # still registered
            staying.cancel()
    finally:
        await server.stop(None)
