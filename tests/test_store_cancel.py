"""Stopping what talks to etcd, against a real etcd member: a cancelled task always ends, a watch leaves nothing
pending when etcd ends its stream, closing the store ends its watches, and a stuck task cannot hang a shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshca.dev.etcd_process import EtcdProcess
from meshca.store.etcd import EtcdSettings, EtcdStore, StoreUnavailable
from meshca.store.tasks import stop_tasks

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def etcd() -> EtcdProcess:
    with EtcdProcess() as member:
        yield member


@pytest.fixture
async def store(etcd: EtcdProcess) -> AsyncIterator[EtcdStore]:
    store = EtcdStore(EtcdSettings((etcd.endpoint,), prefix="/cancel"), logging.getLogger("test.store"))
    await store.connect()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop reports of a leaked stream: "Task was destroyed but it is pending", an async generator
    closed while it runs. (Not grpc's "Event loop is closed" for calls of an earlier test's loop: the one grpc
    poller serves every loop of the process, and only tests run several.)"""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()

    def handler(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        text = f"{context.get('message')} {context.get('exception')!r}"
        if "destroyed but it is pending" in text or "asynchronous generator" in text:
            errors.append(context)

    loop.set_exception_handler(handler)
    try:
        yield errors
    finally:
        loop.set_exception_handler(None)


async def test_a_task_cancelled_as_its_etcd_call_answers_ends_cancelled(store: EtcdStore) -> None:
    """The cancellation lands after etcd answered, before the caller resumed: Python 3.11's wait_for returned the
    answer then, and a cancelled watch or election loop went on (whoever awaited it waited forever)."""
    await store.put("k", b"v")
    caller = None

    async def answer_then_cancel() -> Any:
        response = await store.kv.get(store.full_key("k"))
        assert caller is not None
        caller.cancel()  # the caller is asked to stop just as the answer is there
        return response

    async def get() -> None:
        await store._rpc("get k", answer_then_cancel)
        await asyncio.sleep(30)  # a loop that goes on after a lost cancellation

    caller = asyncio.create_task(get())
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, 5)


async def test_a_cancellation_at_any_point_of_an_etcd_call_ends_the_task(store: EtcdStore) -> None:
    """Cancel a `get` after 0, 1, 2... turns of the event loop: every cancelled task ends cancelled."""
    await store.put("k", b"v")
    lost = cancelled = 0
    for _ in range(60):
        for turns in range(40):
            task = asyncio.create_task(store.get("k"))
            for _ in range(turns):
                await asyncio.sleep(0)
            if task.done():
                await task
                break
            task.cancel()
            try:
                await task
                lost += 1
            except asyncio.CancelledError:
                cancelled += 1
    assert cancelled > 500 and lost == 0


async def test_a_watch_whose_stream_etcd_ended_leaves_nothing_pending_and_resumes(
    loop_errors: list[dict[str, Any]],
) -> None:
    with EtcdProcess() as member:
        store = EtcdStore(EtcdSettings((member.endpoint,), prefix="/w", timeout=1.0), logging.getLogger("test.store"))
        await store.connect()
        try:
            start = await store.revision() + 1
            seen: list[str] = []

            async def follow() -> None:
                async for events in store.watch_prefix("k/", start):
                    seen.extend(e.key for e in events)

            watcher = asyncio.create_task(follow(), name="follow")
            await store.put("k/1", b"x")
            await _until(lambda: seen == ["k/1"])
            member.kill()  # etcd ends the stream; the watch tries again every 0.25 s, then 0.5 s...
            await asyncio.sleep(1.5)
            gc.collect()
            await asyncio.sleep(0.1)
            others = [t for t in asyncio.all_tasks() if t not in (asyncio.current_task(), watcher)]
            assert others == [] and loop_errors == []
            member.start()
            for _ in range(50):
                try:
                    await store.put("k/2", b"y")
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.2)
            await _until(lambda: seen == ["k/1", "k/2"])  # resumed after k/1: nothing twice, nothing lost
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher
        finally:
            await store.close()
        gc.collect()
        await asyncio.sleep(0.1)
        assert loop_errors == []


async def test_closing_the_store_ends_its_watches_and_later_calls_fail_clearly(etcd: EtcdProcess) -> None:
    store = EtcdStore(EtcdSettings((etcd.endpoint,), prefix="/c"), logging.getLogger("test.store"))
    await store.connect()
    start = await store.revision() + 1

    async def follow() -> int:
        count = 0
        async for events in store.watch_prefix("k/", start):
            count += len(events)
        return count

    watcher = asyncio.create_task(follow())
    await store.put("k/1", b"x")
    await asyncio.sleep(0.2)
    await store.close()
    assert await asyncio.wait_for(watcher, 2) == 1  # the watch ended; the task was not cancelled
    with pytest.raises(StoreUnavailable, match="etcd client closed"):
        await store.get("k/1")


async def test_stopping_tasks_is_bounded_and_names_a_task_that_ignores_its_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass  # the bug stop_tasks must survive

    async def failing() -> None:
        raise RuntimeError("boom")

    obedient = asyncio.create_task(asyncio.sleep(10), name="obedient")
    stuck = asyncio.create_task(stubborn(), name="stuck")
    broken = asyncio.create_task(failing(), name="broken")
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await stop_tasks([obedient, stuck, broken], logging.getLogger("test.stop"), timeout=0.3)
    assert loop.time() - began < 1.0
    assert obedient.cancelled() and not stuck.done()
    messages = [r.getMessage() for r in caplog.records if r.name == "test.stop"]
    assert any("task stuck did not end within 0.3s" in m and "test_store_cancel.py" in m for m in messages)
    assert any("task broken ended with an error: boom" in m for m in messages)
    release.set()
    stuck.cancel()
    await asyncio.wait_for(stuck, 1)


async def _until(condition: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
