"""The internal CA's state in etcd, shared by every replica: its state-directory files under `ca/files/`, CA keys
sealed with the KEK, a private mirror each replica serves from, and transitions committed in one fenced txn."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from etcd3aio.kv import Compare

from meshca.ca import crypto
from meshca.ca.api import CaError, CaEvent, CaSettings, CaStateError, CaStatus, IssuedCertificate, MeshCa
from meshca.ca.internal import CertificateAuthority
from meshca.ca.policy import as_utc, scheduled_step
from meshca.ca.state import (
    METADATA_FILE,
    StateRecord,
    is_ca_state_file,
    read_key_file,
    read_state_file,
    state_lock,
)
from meshca.clock import Clock
from meshca.files import write_atomic
from meshca.identity.spiffe import SpiffeId
from meshca.store.etcd import KEK_ENV, EtcdStore, StoreUnavailable
from meshca.store.leader import Fence, LeaderElection
from meshca.store.tasks import follow_prefix, stop_tasks

CA_PREFIX = "ca/"
FILES_PREFIX = "ca/files/"
_TRANSITION_TIMEOUT = 120.0  # seconds: a root rotation generates keys (RSA-3072 takes a while)
_MIRROR_BASE = Path("/dev/shm")  # memory, not disk: the mirror holds the CA keys in clear

T = TypeVar("T")
Files = Mapping[str, bytes]


class CommitRefused(CaError):
    """A CA transition was not committed: the CA state in etcd changed under it, or this replica no longer
    leads. Nothing was written; the mirror follows what etcd holds."""


def is_key_file(name: str) -> bool:
    return name.endswith("-key.pem")


def missing_kek_message(prefix: str) -> str:
    return (f"the CA keys in etcd ({prefix}/{FILES_PREFIX}) are sealed with a key-encryption key: "
            f"set store.etcd.kek_file or the environment variable {KEK_ENV}")


def read_state_files(directory: Path) -> dict[str, bytes]:
    """Every CA file of a state directory (keys checked like the CA checks them), by name."""
    files = {}
    for name in sorted(os.listdir(directory)):
        if is_ca_state_file(name):
            path = directory / name
            files[name] = read_key_file(path) if is_key_file(name) else read_state_file(path)
    return files


def make_private_dir(prefix: str, base: Path | None = None) -> Path:
    """A new 0700 directory, in memory (/dev/shm) when there is one, so decrypted CA keys never reach a disk."""
    if base is None and _MIRROR_BASE.is_dir() and os.access(_MIRROR_BASE, os.W_OK):
        base = _MIRROR_BASE
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def write_state_files(directory: Path, files: Files, previous: Files) -> None:
    """Make `directory` hold exactly `files` (key files 0600), ca.json last, then remove what is not in them."""
    for name, data in files.items():
        if name != METADATA_FILE and previous.get(name) != data:
            write_atomic(directory / name, data, 0o600 if is_key_file(name) else 0o644)
    if METADATA_FILE in files and previous.get(METADATA_FILE) != files[METADATA_FILE]:
        write_atomic(directory / METADATA_FILE, files[METADATA_FILE], 0o644)
    for name in os.listdir(directory):
        if is_ca_state_file(name) and name not in files:
            (directory / name).unlink(missing_ok=True)


def seal_files(kek: bytes, files: Files) -> dict[str, bytes]:
    return {name: crypto.seal(kek, data, name.encode()) if is_key_file(name) else data for name, data in files.items()}


async def read_store_files(store: EtcdStore, kek: bytes | None) -> tuple[dict[str, bytes], int]:
    """The CA files in etcd (keys unsealed) and ca.json's mod_revision; CaStateError naming the key when a
    key cannot be unsealed, or when the store holds no CA."""
    values, _ = await store.get_prefix(FILES_PREFIX)
    prefix = store.settings.prefix
    files: dict[str, bytes] = {}
    revision = 0
    for value in values:
        name = value.key[len(FILES_PREFIX):]
        if name == METADATA_FILE:
            revision = value.mod_revision
        if is_key_file(name):
            if kek is None:
                raise CaStateError(missing_kek_message(prefix))
            try:
                files[name] = crypto.unseal(kek, value.value, name.encode())
            except crypto.CryptoError as error:
                where = f"{prefix}/{value.key}"
                if "wrong key-encryption key" in str(error):
                    raise CaStateError(
                        f"{where}: cannot unseal the CA key: the key-encryption key (store.etcd.kek_file or "
                        f"{KEK_ENV}) is not the one it was sealed with, or the value was altered"
                    ) from None
                raise CaStateError(f"{where}: {error}") from None
        else:
            files[name] = value.value
    if METADATA_FILE not in files:
        raise CaStateError(
            f"etcd holds no CA under {prefix}/{CA_PREFIX}: upload one with "
            "`meshca ca import --config <serve.yaml> --state-dir <dir>`"
        )
    return files, revision


async def import_state_dir(store: EtcdStore, kek: bytes | None, state_dir: Path, clock: Clock) -> CaStatus:
    """Upload an internal CA's state directory to etcd in one transaction; refused when etcd already holds a CA."""
    from meshca.ca.vault.intermediate import is_vault_state_dir

    prefix = store.settings.prefix
    if kek is None:
        raise CaError(missing_kek_message(prefix))
    if is_vault_state_dir(state_dir):
        raise CaError(f"{state_dir} is a vault-intermediate CA: its intermediate key stays in each replica's state_dir "
                      "and never enters etcd")
    ca = await asyncio.to_thread(CertificateAuthority.load, state_dir, clock)  # checked (and a format 1 migrated)
    files = await asyncio.to_thread(read_state_files, state_dir)
    existing, _ = await store.get_prefix(CA_PREFIX)
    if existing:
        raise CaError(f"etcd already holds a CA under {prefix}/{CA_PREFIX} ({existing[0].key}, ...); "
                      "refusing to overwrite it")
    kv = store.kv
    sealed = seal_files(kek, files)
    ok, _ = await store.txn(
        [kv.txn_compare_create_revision(store.full_key(FILES_PREFIX + METADATA_FILE), 0)],
        [kv.txn_op_put(store.full_key(FILES_PREFIX + name), data) for name, data in sealed.items()],
    )
    if not ok:
        raise CaError(f"another import reached etcd first: a CA now exists under {prefix}/{CA_PREFIX}")
    return ca.status()


def _mod_revision_is(store: EtcdStore, name: str, revision: int) -> Compare:
    return Compare(result=Compare.EQUAL, target=Compare.MOD, key=store.full_key(FILES_PREFIX + name),
                   mod_revision=revision)


def _run_in_scratch(
    files: Files, operation: Callable[[CertificateAuthority], list[CaEvent]], clock: Clock, base: Path | None
) -> tuple[list[CaEvent], dict[str, bytes]]:
    """Run `operation` on a CA loaded from a private copy of `files`; its events and the files after it."""
    scratch = make_private_dir("meshca-ca-txn-", base)
    try:
        write_state_files(scratch, files, {})
        ca = CertificateAuthority.load(scratch, clock)
        events = operation(ca)
        return events, read_state_files(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class ReplicatedCa:
    """The internal CA of a replica whose state lives in etcd (a MeshCa).

    Issuance and every accessor are the mirror's CertificateAuthority's: no etcd call, so an unreachable etcd
    changes nothing there. The mirror (a private 0700 directory, in /dev/shm when it exists) only ever holds
    committed states: a watch on `ca/files/` rewrites it after every commit (ca.json last) and the CA reloads.
    A transition runs on a scratch copy and is published in one transaction conditioned on ca.json's
    mod_revision (the state it started from) and, for the scheduled ones, on this replica's leader key.

    Create with `await ReplicatedCa.open(...)` on the store's event loop; the synchronous MeshCa methods that
    reach etcd (tick, rotate_*, reload_if_changed after a refused commit) run on worker threads.
    """

    def __init__(self, store: EtcdStore, kek: bytes | None, mirror: Path, files: dict[str, bytes], revision: int,
                 ca: CertificateAuthority, clock: Clock, logger: logging.Logger,
                 leader: LeaderElection | None, scratch_base: Path | None) -> None:
        """Internal: use `open`."""
        self._store = store
        self._kek = kek
        self._mirror = mirror
        self._files = files
        self._revision = revision
        self._ca = ca
        self._clock = clock
        self._log = logger
        self._leader = leader
        self._scratch_base = scratch_base
        self._lock = threading.Lock()
        self._stale = False
        self._watch_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failing = False

    @classmethod
    async def open(cls, store: EtcdStore, kek: bytes | None, clock: Clock, logger: logging.Logger, *,
                   leader: LeaderElection | None = None, mirror_base: Path | None = None,
                   watch: bool = True) -> ReplicatedCa:
        """Read the CA from etcd into a new mirror and load it; with `watch`, follow every commit."""
        files, revision = await read_store_files(store, kek)
        mirror = make_private_dir("meshca-ca-", mirror_base)
        try:
            ca = await asyncio.to_thread(cls._first_load, mirror, files, clock)
        except BaseException:
            shutil.rmtree(mirror, ignore_errors=True)
            raise
        replica = cls(store, kek, mirror, files, revision, ca, clock, logger, leader, mirror_base)
        replica._loop = asyncio.get_running_loop()
        if watch:
            replica._watch_task = asyncio.create_task(replica.follow(), name="ca-store-watch")
        return replica

    @staticmethod
    def _first_load(mirror: Path, files: Files, clock: Clock) -> CertificateAuthority:
        write_state_files(mirror, files, {})
        return CertificateAuthority.load(mirror, clock)

    async def close(self) -> None:
        if self._watch_task is not None:
            await stop_tasks([self._watch_task], self._log)
            self._watch_task = None
        shutil.rmtree(self._mirror, ignore_errors=True)

    # --- following etcd ------------------------------------------------------------------------

    @property
    def mirror(self) -> Path:
        return self._mirror

    @property
    def revision(self) -> int:
        """ca.json's mod_revision in etcd that the mirror holds."""
        return self._revision

    @property
    def leader(self) -> LeaderElection | None:
        return self._leader

    async def sync(self) -> bool:
        """Read etcd and adopt its state if newer than the mirror's; True when it was."""
        files, revision = await read_store_files(self._store, self._kek)
        changed = await asyncio.to_thread(self._adopt, files, revision)
        self._stale = False
        return changed

    def _adopt(self, files: dict[str, bytes], revision: int) -> bool:
        """Write a committed state (ca.json at `revision`) into the mirror unless it holds a newer one; reload.

        The reload is under the lock too: a commit's own adopt that finds the watch's got there first returns only
        once the CA serves that state."""
        with self._lock:
            if revision <= self._revision:
                return False
            with state_lock(self._mirror, exclusive=True):
                write_state_files(self._mirror, files, self._files)
            self._files, self._revision = files, revision
            self._ca.reload_if_changed()
        return True

    async def follow(self) -> None:
        """Watch `ca/files/` and adopt every commit (runs until cancelled; etcd outages are waited out)."""
        await follow_prefix(self._store, FILES_PREFIX, lambda: self._revision, self._sync_logged, self._watch_ended)

    def _watch_ended(self, error: Exception) -> None:
        self._stale = True
        self._log.debug("CA watch ended: %s", error)

    async def _sync_logged(self) -> None:
        try:
            if await self.sync():
                self._log.info("CA state from etcd adopted: generation %d, signing with %s",
                               self._ca.generation, self._ca.active_intermediate_id)
            if self._failing:
                self._log.info("CA state readable in etcd again")
            self._failing = False
        except (StoreUnavailable, CaError) as error:
            self._stale = True
            if not self._failing:
                self._log.error("cannot read the CA state from etcd; issuing goes on with generation %d: %s",
                                self._ca.generation, error)
            self._failing = True

    # --- transitions ---------------------------------------------------------------------------

    async def transition(self, operation: Callable[[CertificateAuthority], list[CaEvent]], *,
                         fenced: bool) -> list[CaEvent]:
        """Run `operation` on a scratch copy of the mirror and commit its changes in one transaction, conditioned
        on ca.json still being the mirror's and (`fenced`) on this replica still holding the leader key.

        CommitRefused when a condition failed (nothing written; the mirror re-synced); StoreUnavailable when
        etcd did not answer. Only a committed state ever reaches the mirror."""
        fence = None
        if fenced:
            fence = self._leader.fence() if self._leader is not None else None
            if fence is None:
                raise CommitRefused("this replica is not the leader: the CA transition is left to the leader")
        if self._kek is None:
            raise CaError(missing_kek_message(self._store.settings.prefix))
        with self._lock:
            base, base_revision = dict(self._files), self._revision
        events, after = await asyncio.to_thread(_run_in_scratch, base, operation, self._clock, self._scratch_base)
        if after == base:
            return events
        store, kv = self._store, self._store.kv
        changed = {name: data for name, data in after.items() if base.get(name) != data}
        ops = [kv.txn_op_put(store.full_key(FILES_PREFIX + name), data)
               for name, data in seal_files(self._kek, changed).items()]
        ops += [kv.txn_op_delete(store.full_key(FILES_PREFIX + name)) for name in base if name not in after]
        compares = [_mod_revision_is(store, METADATA_FILE, base_revision)]
        if fence is not None:
            compares += fence.compares(store)
        try:
            ok, revision = await store.txn(compares, ops)
        except StoreUnavailable:
            self._stale = True  # it may have committed all the same: the watch or the next check tells
            raise
        if not ok:
            why = f"the CA state in etcd is no longer the one at revision {base_revision}"
            if fence is not None and not await self._holds(fence):
                why = "this replica no longer holds the leader key"
            self._log.warning("CA transition not committed (%s): nothing written; following etcd", why)
            self._stale = True
            try:
                await self.sync()
            except (StoreUnavailable, CaError):
                pass
            raise CommitRefused(f"CA transition not committed: {why}")
        await asyncio.to_thread(self._adopt, after, revision)
        return events

    async def _holds(self, fence: Fence) -> bool:
        try:
            held = await self._store.get(fence.key)
        except StoreUnavailable:
            return False
        return held is not None and held.create_revision == fence.create_revision

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a store coroutine from a worker thread (never from the store's loop: it would wait on itself)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is self._loop:
            coroutine.close()
            raise RuntimeError("ReplicatedCa: call tick/rotate from a worker thread, not the event loop")
        try:
            return self._store.call(coroutine, timeout=_TRANSITION_TIMEOUT)
        except StoreUnavailable as error:
            raise CaError(f"CA transition waits for etcd: {error}") from None
        except concurrent.futures.TimeoutError:
            raise CaError(f"CA transition waits for etcd: no answer within {_TRANSITION_TIMEOUT:.0f}s") from None

    # --- MeshCa: transitions and reloading -----------------------------------------------------

    def reload_if_changed(self) -> bool:
        """Adopt what etcd holds when the mirror may be behind (a refused commit, a broken watch); then the
        mirror CA's own check."""
        changed = False
        if self._stale and self._store.reachable:
            try:
                changed = self._call(self.sync())
            except CaError:
                pass  # etcd down: the mirror's state goes on serving; the watch adopts what changed once it is back
        return self._ca.reload_if_changed() or changed

    def tick(self, now: datetime | None = None) -> list[CaEvent]:
        """On the leader: the due scheduled transitions, committed fenced; [] on the other replicas (they follow
        the watch), and when a commit was refused (the mirror then holds the new leader's state)."""
        self.reload_if_changed()
        if self._leader is None or not self._leader.is_leader:
            return []
        at = as_utc(now if now is not None else self._clock())
        record = StateRecord.from_json(json.loads(self._files[METADATA_FILE]))
        if scheduled_step(record.slots, self._ca.settings, at) is None:
            return []
        try:
            return self._call(self.transition(lambda ca: ca.tick(at), fenced=True))
        except CommitRefused:
            return []

    def rotate_intermediate(self, now: bool = False) -> list[CaEvent]:
        """Committed conditioned on ca.json's revision only (and the leader key when this replica campaigns)."""
        return self._call(self.transition(lambda ca: ca.rotate_intermediate(now=now), fenced=self._leader is not None))

    def rotate_root(self, now: bool = False) -> list[CaEvent]:
        return self._call(self.transition(lambda ca: ca.rotate_root(now=now), fenced=self._leader is not None))

    # --- MeshCa: the mirror CA's ---------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self._ca.trust_domain

    @property
    def settings(self) -> CaSettings:
        return self._ca.settings

    @property
    def generation(self) -> int:
        return self._ca.generation

    @property
    def active_intermediate_id(self) -> str:
        return self._ca.active_intermediate_id

    @property
    def intermediate_certificate_pem(self) -> bytes:
        return self._ca.intermediate_certificate_pem

    @property
    def intermediate_not_after(self) -> datetime:
        return self._ca.intermediate_not_after

    @property
    def signs_remotely(self) -> bool:
        return False

    @property
    def can_rotate_intermediate(self) -> bool:
        return True

    @property
    def can_rotate_root(self) -> bool:
        return True

    def trust_bundle_pem(self) -> bytes:
        return self._ca.trust_bundle_pem()

    def crl_signers(self) -> list[tuple[Any, Any]]:
        return self._ca.crl_signers()

    def status(self) -> CaStatus:
        return self._ca.status()

    def journal(self) -> list[Any]:
        return self._ca.journal()

    def issue_workload(self, spiffe_id: SpiffeId, ttl: timedelta | None = None) -> IssuedCertificate:
        return self._ca.issue_workload(spiffe_id, ttl)

    def sign_csr(self, csr_pem: bytes, spiffe_id: SpiffeId, ttl: timedelta | None = None) -> IssuedCertificate:
        return self._ca.sign_csr(csr_pem, spiffe_id, ttl)

    def issue_server_certificate(
        self, dns_names: Sequence[str], ip_addresses: Sequence[str], ttl: timedelta | None = None
    ) -> IssuedCertificate:
        return self._ca.issue_server_certificate(dns_names, ip_addresses, ttl)


def _conforms(ca: ReplicatedCa) -> MeshCa:
    """The replicated CA is a MeshCa: tests/test_ca_api.py has mypy check this."""
    return ca
