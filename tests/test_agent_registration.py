"""meshca.agent.registration.keep_registered against a real EndpointService: token re-read, backoff, removal."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from fakes import FakeClock, FakeTokenAuthenticator
from meshca_harness import running_meshca
from test_endpoint_registration import BACKEND, TD, mesh

from meshca.agent.registration import Endpoint, Registered, TokenUnreadable, keep_registered, read_token
from meshca.agent.service import NodeAgent
from meshca.agent.settings import AgentSettings, WorkloadSettings
from meshca.clock import system_clock
from meshca.dev.envoy_process import wait_until
from meshca.mesh.endpoints import EndpointServicer, RegisteredEndpoint, RegisteredEndpoints, add_to_server

LOG = logging.getLogger("test.agent.registration")


@pytest.fixture
async def server() -> AsyncIterator[tuple[RegisteredEndpoints, grpc.aio.Channel]]:
    endpoints = RegisteredEndpoints(lambda: None)
    served = grpc.aio.server()
    add_to_server(served, EndpointServicer(FakeTokenAuthenticator({"good": BACKEND}), endpoints, mesh, LOG,
                                           clock=FakeClock()))  # the fake tokens expire an hour after T0
    port = served.add_insecure_port("127.0.0.1:0")
    await served.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield endpoints, channel
    finally:
        await served.stop(None)


async def test_the_token_file_is_re_read_and_failures_back_off_up_to_the_cap(
    server: tuple[RegisteredEndpoints, grpc.aio.Channel], tmp_path: Path
) -> None:
    endpoints, channel = server
    token_file = tmp_path / "token"
    token_file.write_text("stale\n")
    delays: list[float] = []
    registered: list[Registered] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 4:
            token_file.write_text("good\n")  # the token rotated

    task = asyncio.create_task(keep_registered(
        [channel], token_file, [Endpoint("backend", "10.0.0.7", 15006)], LOG,
        on_registered=registered.append, initial_backoff=timedelta(seconds=1), max_backoff=timedelta(seconds=4),
        sleep=sleep,
    ))
    try:
        for _ in range(500):
            if registered:
                break
            await asyncio.sleep(0.01)
        assert registered == [Registered(BACKEND.uri, ("backend",))]
        # capped doubling 1, 2, 4, 4, each delay jittered down to no less than half of it
        for delay, base in zip(delays, [1, 2, 4, 4], strict=True):
            assert base / 2 <= delay <= base
        assert len(set(delays)) == 4  # jittered: two agents that failed together do not retry together
        (registration,) = endpoints.snapshot()
        assert registration.spiffe_id == BACKEND and registration.endpoints == (
            RegisteredEndpoint("backend", "10.0.0.7", 15006),
        )
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    for _ in range(500):  # the agent's end closes the stream: meshca removes what it registered
        if not endpoints.snapshot():
            break
        await asyncio.sleep(0.01)
    assert endpoints.snapshot() == ()


async def test_a_refusal_is_retried_and_says_why(
    server: tuple[RegisteredEndpoints, grpc.aio.Channel], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, channel = server
    token_file = tmp_path / "token"
    token_file.write_text("good")
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 2:
            raise asyncio.CancelledError

    with caplog.at_level(logging.WARNING), pytest.raises(asyncio.CancelledError):
        await keep_registered([channel], token_file, [Endpoint("frontend", "10.0.0.7", 15008)], LOG, sleep=sleep)
    assert f"PERMISSION_DENIED: endpoints[0]: service 'frontend' is served by spiffe://{TD}/ns/shop/sa/frontend" in (
        caplog.text
    )
    assert "good" not in caplog.text


def test_read_token_names_the_file_never_the_content(tmp_path: Path) -> None:
    with pytest.raises(TokenUnreadable, match=r"token file .*missing: cannot read it \(No such file"):
        read_token(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TokenUnreadable, match="empty"):
        read_token(tmp_path / "empty")


async def test_the_agent_keeps_its_workloads_endpoints_registered_and_a_refusal_harms_nothing_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """NodeAgent registers each workload's `endpoints:` over TLS to meshca with the workload's token; a workload
    claiming a service its identity does not serve is refused (one line, retried), the agent and SDS carry on."""
    sockets = Path(tempfile.mkdtemp(prefix="agentreg", dir="/tmp"))  # a Unix socket path is short; tmp_path may not be
    try:
        async with running_meshca(tmp_path / "meshca") as meshca:
            meshca.app.apply_mesh_config(mesh())
            (tmp_path / "root.pem").write_bytes(meshca.root_pem)
            (tmp_path / "backend.jwt").write_text(meshca.token("shop", "backend"))
            (tmp_path / "frontend.jwt").write_text(meshca.token("shop", "frontend"))
            settings = AgentSettings(
                meshca=(("127.0.0.1", meshca.port),), server_name="localhost", ca=tmp_path / "root.pem",
                workloads=(
                    WorkloadSettings("backend", tmp_path / "backend.jwt", sockets / "backend.sock",
                                     endpoints=(Endpoint("agent-only", "10.0.0.7", 15007),)),
                    WorkloadSettings("frontend", tmp_path / "frontend.jwt", sockets / "frontend.sock",
                                     endpoints=(Endpoint("backend", "10.0.0.8", 15006),)),
                ),
            )
            agent = NodeAgent(settings, system_clock, logging.getLogger("test.agent"))
            with caplog.at_level(logging.WARNING):
                await agent.start()
                try:
                    await asyncio.to_thread(
                        wait_until, lambda: meshca.app.endpoints.count() == 1, 10, 0.05, "the backend registered"
                    )
                    (registration,) = meshca.app.endpoints.snapshot()
                    assert registration.spiffe_id == BACKEND
                    assert registration.endpoints == (RegisteredEndpoint("agent-only", "10.0.0.7", 15007),)
                    refusal = "endpoint registration: PERMISSION_DENIED: endpoints[0]: service 'backend' is served by"
                    await asyncio.to_thread(wait_until, lambda: refusal in caplog.text, 10, 0.05, "the refusal logged")
                    await agent.wait_served(10)  # both workloads still get certificates over SDS
                finally:
                    await agent.stop()
            await asyncio.to_thread(
                wait_until, lambda: meshca.app.endpoints.count() == 0, 10, 0.05, "the registration gone with the agent"
            )
            assert "eyJ" not in caplog.text  # no token in the logs
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


async def test_a_withdrawn_registration_leaves_at_once_a_cancelled_one_after_the_grace(
    server: tuple[RegisteredEndpoints, grpc.aio.Channel], tmp_path: Path
) -> None:
    endpoints, channel = server  # the fixture's servicer keeps ended registrations for the default grace (3 s)
    token_file = tmp_path / "token"
    token_file.write_text("good\n")
    withdraw = asyncio.Event()
    registered: list[Registered] = []
    task = asyncio.create_task(keep_registered(
        [channel], token_file, [Endpoint("backend", "10.0.0.7", 15006)], LOG, on_registered=registered.append,
        withdraw=withdraw,
    ))
    await asyncio.to_thread(wait_until, lambda: len(endpoints.snapshot()) == 1 and registered, 5, 0.01, "registered")
    withdraw.set()  # the workload is gone: its endpoints go now, not after the grace
    await asyncio.wait_for(task, 3)
    assert [r.endpoints for r in endpoints.snapshot()] == [()]

    restarting = asyncio.create_task(keep_registered([channel], token_file, [Endpoint("backend", "10.0.0.8", 15006)], LOG))
    await asyncio.to_thread(wait_until, lambda: endpoints.count() == 1, 5, 0.01, "registered again")
    restarting.cancel()  # an agent stopping (maybe to restart): the endpoints stay for the grace
    with pytest.raises(asyncio.CancelledError):
        await restarting
    await asyncio.sleep(0.5)
    assert endpoints.count() == 1
