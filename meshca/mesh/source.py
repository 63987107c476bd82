"""Config sources: where mesh configs come from. The file source polls one YAML file."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from meshca.fields import ConfigError
from meshca.mesh.model import MeshConfig, load_mesh_config
from meshca.xds.snapshot import InconsistentSnapshot


class MeshConfigSink(Protocol):
    """Where a source delivers configs (the composition root's apply step)."""

    def apply_mesh_config(self, config: MeshConfig) -> str:
        """Build and publish; return the mesh version. Raise ConfigError or InconsistentSnapshot."""
        ...

    def record_rejected(self) -> None: ...


Signature = tuple[int, int, int]


def _signature(path: Path) -> Signature | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class FileMeshSource:
    """Watches a mesh config file by polling; each change is parsed, validated and applied.

    An invalid change is logged with the file, field and reason, counted as rejected, and the last
    good config keeps serving. An etcd source implements the same loop with a watch instead.
    """

    def __init__(
        self,
        path: Path,
        sink: MeshConfigSink,
        logger: logging.Logger,
        interval: float = 0.25,
        sleep: Callable[[float], object] = asyncio.sleep,
    ) -> None:
        self._path = path
        self._sink = sink
        self._log = logger
        self._interval = interval
        self._sleep = sleep
        self._seen: Signature | None = None

    def load(self) -> str:
        """Load the file now; return the applied version or raise (used at start: fail fast)."""
        self._seen = _signature(self._path)
        version = self._sink.apply_mesh_config(load_mesh_config(self._path))
        self._log.info("mesh config %s applied: version %s", self._path, version)
        return version

    def poll_once(self) -> bool:
        """Apply the file if it changed since the last look; True when a new config was applied."""
        signature = _signature(self._path)
        if signature == self._seen:
            return False
        self._seen = signature
        if signature is None:
            self._log.error("mesh config %s disappeared; keeping the last good config", self._path)
            self._sink.record_rejected()
            return False
        try:
            version = self._sink.apply_mesh_config(load_mesh_config(self._path))
        except ConfigError as error:
            self._log.error("mesh config rejected, the last good config keeps serving: %s", error)
            self._sink.record_rejected()
            return False
        except InconsistentSnapshot as error:
            self._log.error(
                "mesh config %s rejected, the last good config keeps serving: %s", self._path, "; ".join(error.problems)
            )
            self._sink.record_rejected()
            return False
        self._log.info("mesh config %s changed: version %s applied", self._path, version)
        return True

    async def run(self) -> None:
        while True:
            await self._sleep(self._interval)
            if _signature(self._path) != self._seen:
                # let a writer finish: wait until the file stops changing for one short interval
                before = _signature(self._path)
                await self._sleep(min(self._interval, 0.1))
                if _signature(self._path) != before:
                    continue
                self.poll_once()
