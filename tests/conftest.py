"""Shared fixtures; the doubles themselves are in fakes.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fakes import FakeClock, FakeLoopTime


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at T0 (test modules whose code meets a real server's time override it)."""
    return FakeClock()


@pytest.fixture
async def loop_time() -> AsyncIterator[FakeLoopTime]:
    """The running event loop's clock replaced by a FakeLoopTime for the test, restored afterwards."""
    loop = asyncio.get_running_loop()
    fake = FakeLoopTime(loop)
    loop.time = fake  # type: ignore[method-assign]
    try:
        yield fake
    finally:
        del loop.time
