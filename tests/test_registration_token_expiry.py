"""A registration stream ends at its token's expiry (as xDS streams do): its endpoints are removed, and the agent's
client registers again at once with the token file as it is then. Real JWTs with a 3 s lifetime, a real meshca."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from meshca_harness import RunningMeshca, running_meshca
from test_e2e_endpoints import agent_only_mesh

from meshca.agent.registration import Endpoint, keep_registered
from meshca.dev.tokens import mint_token
from meshca.files import write_atomic
from meshca.mesh.endpoints import RegistrationTiming

TOKEN_TTL = timedelta(seconds=3)


def write_token(meshca: RunningMeshca, path: Path) -> datetime:
    """A fresh frontend token in `path`; returns its expiry."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    token = mint_token(meshca.signing_key_pem, namespace="shop", service_account="frontend", now=now, ttl=TOKEN_TTL)
    write_atomic(path, token.encode(), 0o600)
    return now + TOKEN_TTL


async def test_a_registration_ends_at_its_token_expiry_and_the_agent_registers_again_with_the_new_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # no grace: what is measured is how soon the agent registers again, not what the grace would hide
    async with running_meshca(tmp_path, leeway=timedelta(0), registration=RegistrationTiming(grace=timedelta(0))) as meshca:
        meshca.app.apply_mesh_config(agent_only_mesh(15006, 15001, 8080))
        token_file = tmp_path / "frontend.jwt"
        first_expiry = write_token(meshca, token_file)
        loop = asyncio.get_running_loop()
        lost: list[str] = []
        changes: list[tuple[float, str]] = []  # when the servicer put and removed registrations
        endpoints = meshca.app.endpoints
        put, remove = endpoints.put, endpoints.remove

        async def recorded_put(*args: object) -> None:
            await put(*args)  # type: ignore[arg-type]
            changes.append((loop.time(), "put"))

        async def recorded_remove(*args: object) -> None:
            await remove(*args)  # type: ignore[arg-type]
            changes.append((loop.time(), "remove"))

        endpoints.put, endpoints.remove = recorded_put, recorded_remove  # type: ignore[method-assign]
        registered: list[float] = []
        async with meshca.channel() as channel:
            agent = asyncio.create_task(keep_registered(
                [channel], token_file, [Endpoint("echo", "10.0.0.5", 15006)], logging.getLogger("test.agent"),
                on_registered=lambda r: registered.append(loop.time()), on_lost=lost.append,
            ))
            try:
                while not registered:
                    await asyncio.sleep(0.01)
                assert meshca.app.endpoints.count() == 1
                await asyncio.sleep(1.1)
                write_token(meshca, token_file)  # the node's token rotates before the old one expires (a later exp)
                deadline = loop.time() + TOKEN_TTL.total_seconds() + 3
                while loop.time() < deadline and len(registered) < 2:
                    await asyncio.sleep(0.01)
                assert len(registered) == 2, "the agent did not register again after its token expired"
                await asyncio.sleep(0.05)
                assert meshca.app.endpoints.count() == 1
                assert len(lost) == 1 and lost[0].startswith("UNAUTHENTICATED: token expired at "), lost
                assert first_expiry.isoformat(timespec="seconds") in lost[0]
                removed = next(t for t, what in changes if what == "remove")
                again = next(t for t, what in changes if what == "put" and t > removed)
                print(f"\ntoken expiry: the endpoint was out of the registrations for {(again - removed) * 1000:.1f} ms")
                assert again - removed < 1.0

                # the token file goes stale: the next stream is refused, the endpoint stays removed
                await asyncio.sleep(TOKEN_TTL.total_seconds() + 0.5)
                assert meshca.app.endpoints.count() == 0
                assert len(lost) == 2
            finally:
                agent.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await agent
    ended = [r.getMessage() for r in caplog.records if "its token expired at" in r.getMessage()]
    assert len(ended) == 2, ended
    assert not any("eyJ" in r.getMessage() for r in caplog.records)  # tokens never logged
