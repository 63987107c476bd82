"""The store parts' background tasks (watches, leases, the election): following a key prefix; stopping them, bounded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from meshca.store.etcd import EtcdStore

STOP_TIMEOUT = 5.0  # seconds a cancelled task may take to end before the shutdown goes on without it


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], logger: logging.Logger, timeout: float = STOP_TIMEOUT) -> None:
    """Cancel `tasks` and wait until they have ended, at most `timeout` seconds.

    A task still running then (it ignored its cancellation: a bug) is logged with the line it waits at and
    left behind, so a shutdown never hangs on it; an error a task ended with is logged, not raised."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        frames = task.get_stack(limit=1)
        where = f"{frames[-1].f_code.co_filename}:{frames[-1].f_lineno}" if frames else "?"
        logger.error("task %s did not end within %gs of being cancelled (waiting at %s); shutting down without it",
                     task.get_name(), timeout, where)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s ended with an error: %s", task.get_name(), task.exception())


async def follow_prefix(
    store: EtcdStore,
    prefix: str,
    revision: Callable[[], int],
    sync: Callable[[], Awaitable[object]],
    watch_ended: Callable[[Exception], None],
) -> None:
    """Run `sync` on every change under `prefix` after `revision()`, until cancelled. A watch that ends (etcd gone
    long enough for the client to give up) is told to `watch_ended`; a second later `sync` runs and a new watch
    starts from the revision then adopted, so an etcd outage is waited out and nothing written meanwhile is missed."""
    while True:
        try:
            watch = store.watch_prefix(prefix, revision() + 1)
            try:
                async for _ in watch:
                    await sync()
            finally:
                await cast(AsyncGenerator[Any, None], watch).aclose()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            watch_ended(error)
        await asyncio.sleep(1.0)
        await sync()
