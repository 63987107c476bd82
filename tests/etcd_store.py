"""A connected EtcdStore for the tests that run against a real etcd member (the `etcd` fixture in conftest.py)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from meshca.store.etcd import EtcdSettings, EtcdStore


@contextlib.asynccontextmanager
async def connected(endpoint: str, prefix: str, **settings: Any) -> AsyncIterator[EtcdStore]:
    """An EtcdStore on `endpoint` under `prefix` (`settings`: more EtcdSettings fields), closed afterwards."""
    store = EtcdStore(EtcdSettings((endpoint,), prefix=prefix, **settings), logging.getLogger("meshca.test.store"))
    await store.connect()
    try:
        yield store
    finally:
        await store.close()
