"""The mesh config in etcd: `meshca mesh apply` writes `mesh/config` in one transaction, every replica watches it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
from etcd3aio import EtcdError

from meshca.fields import ConfigError, parse_yaml_mapping
from meshca.mesh.model import MeshConfig, parse_mesh_config
from meshca.mesh.source import MeshConfigSink
from meshca.store.etcd import EtcdStore, StoredValue
from meshca.xds.snapshot import InconsistentSnapshot

MESH_KEY = "mesh/config"  # the mesh YAML, byte for byte as applied
MESH_APPLIED_KEY = "mesh/applied"  # who applied it, when, its sha256 (written in the same transaction)
_MAX_LOGGED_REASON = 500  # characters of a rejection reason in one log line


@dataclass(frozen=True)
class AppliedMesh:
    """What `mesh/applied` records next to the config."""

    sha256: str
    applied_by: str
    applied_at: datetime
    source: str  # the file it was applied from

    def to_json(self) -> bytes:
        return json.dumps(
            {"sha256": self.sha256, "applied_by": self.applied_by, "applied_at": self.applied_at.isoformat(),
             "source": self.source},
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> AppliedMesh | None:
        try:
            data = json.loads(raw)
            return cls(str(data["sha256"]), str(data["applied_by"]), datetime.fromisoformat(data["applied_at"]),
                       str(data.get("source", "")))
        except (ValueError, KeyError, TypeError):
            return None


def stored_mesh_name(store: EtcdStore) -> Path:
    """How errors name the stored config: `etcd:/meshca/mesh/config`."""
    return Path(f"etcd:{store.full_key(MESH_KEY).decode()}")


def parse_stored_mesh(where: Path, raw: bytes) -> MeshConfig:
    """The mesh config in `raw`, parsed and validated exactly as a mesh file is (ConfigError otherwise)."""
    return parse_mesh_config(where, parse_yaml_mapping(where, raw))


def check_trust_domain(config: MeshConfig, trust_domain: str, where: Path) -> None:
    """The check MeshcaApp.apply_mesh_config makes, as a ConfigError naming the field."""
    if config.trust_domain != trust_domain:
        raise ConfigError(where, "trust_domain", f"{config.trust_domain!r} is not the CA's trust domain {trust_domain!r}")


async def write_mesh(store: EtcdStore, raw: bytes, applied: AppliedMesh) -> int:
    """Write the config and its record in one transaction; returns the revision it has."""
    kv = store.kv
    _, revision = await store.txn(
        [],
        [kv.txn_op_put(store.full_key(MESH_KEY), raw), kv.txn_op_put(store.full_key(MESH_APPLIED_KEY), applied.to_json())],
    )
    return revision


def sha256_hex(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _bounded(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_LOGGED_REASON else text[: _MAX_LOGGED_REASON - 3] + "..."


class EtcdMeshSource:
    """FileMeshSource's contract on etcd: `load()` once at start, then `run()` applies every new value of
    `mesh/config` from the revision loaded on.

    No stored config at start serves an empty mesh (one log line says how to add one); an invalid one
    at start raises, as an invalid file does. Later an invalid value is logged in one bounded line,
    counted rejected, and the last good config keeps serving. The watch resumes by itself after etcd
    comes back (EtcdStore.watch_prefix re-creates it after the last revision seen), so an unreachable etcd changes nothing.
    """

    def __init__(
        self,
        store: EtcdStore,
        sink: MeshConfigSink,
        logger: logging.Logger,
        retry: float = 2.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """`retry`: seconds between attempts when the watch itself fails (not the transient errors
        the store's watch resumes from by itself)."""
        self._store = store
        self._retry = retry
        self._sleep = sleep
        self._sink = sink
        self._log = logger
        self._where = stored_mesh_name(store)
        self._revision = 0  # the store revision the applied config was read at
        self.applied = 0  # values applied by run() (tests wait on it)
        self.rejected = 0

    async def load(self) -> str | None:
        """Read and apply the stored config now; returns the applied version, None when none is stored."""
        stored = await self._store.get(MESH_KEY)
        self._revision = await self._store.revision() if stored is None else stored.mod_revision
        if stored is None:
            self._log.info(
                "no mesh config in etcd (%s): serving an empty mesh until `meshca mesh apply -f FILE --config SETTINGS` "
                "writes one", self._where
            )
            return None
        version = self._sink.apply_mesh_config(parse_stored_mesh(self._where, stored.value))
        self._log.info("mesh config %s applied (revision %d, sha256 %s): version %s", self._where, stored.mod_revision,
                       sha256_hex(stored.value)[:12], version)
        return version

    def apply(self, raw: bytes | None, revision: int) -> bool:
        """Apply one stored value (None: the key was deleted); True when it is now serving."""
        if raw is None:
            self._log.error("mesh config %s was deleted (revision %d); keeping the last good config", self._where,
                            revision)
            return self._reject()
        try:
            version = self._sink.apply_mesh_config(parse_stored_mesh(self._where, raw))
        except ConfigError as error:
            self._log.error("mesh config rejected (revision %d), the last good config keeps serving: %s", revision,
                            _bounded(str(error)))
            return self._reject()
        except InconsistentSnapshot as error:
            self._log.error("mesh config %s rejected (revision %d), the last good config keeps serving: %s",
                            self._where, revision, _bounded("; ".join(error.problems)))
            return self._reject()
        self.applied += 1
        self._log.info("mesh config %s changed (revision %d, sha256 %s): version %s applied", self._where, revision,
                       sha256_hex(raw)[:12], version)
        return True

    def _reject(self) -> bool:
        self.rejected += 1
        self._sink.record_rejected()
        return False

    async def run(self) -> None:
        """Watch `mesh/config` after the loaded revision; apply the newest value of each batch of changes."""
        failing = False
        while True:
            try:
                async for events in self._store.watch_prefix(MESH_KEY, self._revision + 1):
                    failing = False
                    mine = [event for event in events if event.key == MESH_KEY and event.revision > self._revision]
                    if not mine:
                        continue
                    last = mine[-1]  # a batch carrying several puts: only the newest matters
                    self._revision = last.revision
                    self.apply(last.value, last.revision)
            except (grpc.aio.AioRpcError, EtcdError) as error:  # transient ones the client retries itself
                if not failing:
                    self._log.error("watching %s failed, retrying every %gs: %s", self._where, self._retry,
                                    _bounded(str(error)))
                failing = True
            await self._sleep(self._retry)


async def read_mesh(store: EtcdStore) -> tuple[bytes, int, AppliedMesh | None] | None:
    """The stored config, its revision and its `mesh/applied` record (None when nothing is stored)."""
    values, _ = await store.get_prefix("mesh/")
    found: dict[str, StoredValue] = {value.key: value for value in values}
    config = found.get(MESH_KEY)
    if config is None:
        return None
    record = found.get(MESH_APPLIED_KEY)
    return config.value, config.mod_revision, AppliedMesh.from_json(record.value) if record is not None else None


