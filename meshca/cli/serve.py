"""`meshca serve`: load the settings, build the app, serve until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshca.clock import format_duration, system_clock
from meshca.config import load_serve_settings, read_store_settings
from meshca.fields import ConfigError
from meshca.listen import check_bindable

if TYPE_CHECKING:
    import logging

    from meshca.audit import AuditLog
    from meshca.ca.backends import CaBackend
    from meshca.ca.vault.crl import VaultCrls
    from meshca.cli.workers import WorkerRole
    from meshca.sds.crl import RevocationSource
    from meshca.store.etcd import EtcdStore
    from meshca.store.serving import StoreCa


async def _serve(config_path: Path, worker: WorkerRole | None = None) -> int:
    """One serving process; a `worker` of `meshca serve --workers N` shares the listening port (SO_REUSEPORT)
    and serves its admin endpoint on metrics_port + its index (the supervisor checked every port once)."""
    from meshca import logs
    from meshca.ca.backends import build_ca_backend
    from meshca.gcpolicy import tune_gc_for_serving

    tune_gc_for_serving()
    log = logs.configure("info")
    store, store_ca = await _open_store(config_path, log)
    audit = None
    try:
        backend = store_ca.backend if store_ca is not None else build_ca_backend(config_path, system_clock, log)
        if backend.mode == "vault-leaf" and (state_dir := read_state_dir_or_none(config_path)) is not None:
            # nothing creates vault-leaf's state dir (Vault holds its CA), yet its audit log and revocations live there
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        audit = _open_audit(config_path, worker, log)
        return await _serve_with(config_path, log, backend, store, store_ca, worker, audit)
    finally:
        if audit is not None:
            audit.close()
        if store_ca is not None:
            await store_ca.close()
        if store is not None:
            await store.close()


def _open_audit(config_path: Path, worker: WorkerRole | None, log: logging.Logger) -> AuditLog | None:
    """The process's audit log writer (None when `audit:` is off); worker i of --workers N writes its own file."""
    from meshca.audit import AuditError, AuditFileBusy, AuditLog, replica_path, worker_path
    from meshca.config import read_audit_settings
    from meshca.store.registry import default_replica_id

    settings = read_audit_settings(config_path)
    if settings.path is None:
        return None
    path = settings.path if worker is None else worker_path(settings.path, worker.index)
    replica = default_replica_id()

    def writer(path: Path) -> AuditLog:
        audit = AuditLog(path, replica, system_clock, log.getChild("audit"),
                         flush_interval=settings.flush_interval.total_seconds())
        audit.open()
        return audit

    try:
        try:
            return writer(path)
        except AuditFileBusy as busy:
            # e.g. a new serve started before the old one stopped: never two writers on one chain
            log.warning("%s; this process writes %s", busy, replica_path(path, replica))
            return writer(replica_path(path, replica))
    except AuditError as error:
        raise ConfigError(config_path, "audit.path", str(error)) from None


async def _open_store(config_path: Path, log: logging.Logger) -> tuple[EtcdStore | None, StoreCa | None]:
    """With `store:`, the process's one EtcdStore (connected on this loop: every store part shares it) and the CA
    built on it; (None, None) without."""
    from meshca.store.etcd import StoreUnavailable
    from meshca.store.registry import default_replica_id
    from meshca.store.serving import build_store_ca, connect_store

    settings = read_store_settings(config_path)
    if settings is None:
        return None, None
    try:
        store = await connect_store(settings, log.getChild("store"))
    except StoreUnavailable as error:
        raise ConfigError(config_path, "store.etcd.endpoints", str(error)) from None
    try:
        store_ca = await build_store_ca(config_path, store, system_clock, log, default_replica_id())
    except BaseException:
        await store.close()
        raise
    return store, store_ca


async def _serve_with(
    config_path: Path,
    log: logging.Logger,
    backend: CaBackend,
    store: EtcdStore | None,
    store_ca: StoreCa | None,
    worker: WorkerRole | None,
    audit: AuditLog | None = None,
) -> int:
    """`store`/`store_ca`: the connected EtcdStore and its StoreCa with `store:` (None without)."""
    from meshca import logs
    from meshca.app import MeshcaApp
    from meshca.cli.replica import ReplicaParts, attach_store
    from meshca.sds.server_tls import FileServerCertificate, IssuedServerCertificate, ServerTlsError
    from meshca.store.registry import default_replica_id

    ca = backend.ca
    settings = load_serve_settings(config_path, ca.trust_domain)
    if settings.leaf_ttl is not None and not (
        ca.settings.leaf_ttl_min <= settings.leaf_ttl <= ca.settings.leaf_ttl_max
    ):
        raise ConfigError(
            config_path,
            "leaf_ttl",
            f"{format_duration(settings.leaf_ttl)} is outside the CA's leaf TTL bounds "
            f"[{format_duration(ca.settings.leaf_ttl_min)}, {format_duration(ca.settings.leaf_ttl_max)}] "
            "(set at `meshca ca init`)",
        )
    log = logs.configure(settings.log_level)
    admin_port = settings.metrics_port if worker is None else worker.admin_port(settings.metrics_port)
    if worker is None:
        # a taken port fails now, before the mesh is loaded and logged (MeshcaApp.start checks again when it binds)
        check_bindable("listen", settings.listen_host, settings.listen_port)
    if admin_port is not None:
        check_bindable("metrics_port", settings.admin_address, admin_port)
    from meshca.app import crl_publishing

    revocation_source = await _revocation_source(backend, store, log, read_state_dir_or_none(config_path))
    app = MeshcaApp(
        ca,
        settings.issuers,
        system_clock,
        log,
        settings.leaf_ttl,
        settings.rotation,
        backend.vault,
        xds_send_timeout=settings.xds_send_timeout,
        identity_grace=settings.identity_grace,
        xds_max_stream_age=settings.xds_max_stream_age,
        revocations=(crl_publishing(revocation_source, external=_vault_crls(backend, log))
                     if revocation_source is not None else None),
        audit=audit,
        registration=settings.registration,
    )
    # Served through grpc's dynamic credentials: a renewed certificate (at 2/3 of its 30 days, or when the
    # signing intermediate changes) or changed `tls:` files reach new connections without a restart.
    credentials: FileServerCertificate | IssuedServerCertificate
    if settings.server_tls is not None:
        try:
            credentials = FileServerCertificate(
                settings.server_tls.certificate_chain, settings.server_tls.private_key, log.getChild("tls")
            )
        except ServerTlsError as error:
            raise ConfigError(config_path, error.field, error.reason) from None
    else:
        credentials = IssuedServerCertificate(
            ca, settings.server_names, timedelta(days=30), system_clock, log.getChild("tls"),
            trust_propagation=settings.rotation.trust_propagation,
        )
    source_task = None
    replica: ReplicaParts | None = None
    if store is not None:
        replica = await attach_store(store, app, log, default_replica_id())
    elif settings.mesh_file is not None:
        from meshca.mesh.source import FileMeshSource

        source = FileMeshSource(settings.mesh_file, app, log.getChild("mesh-source"))
        source.load()  # an invalid mesh at start is an error: there is no last good config yet
        source_task = asyncio.create_task(source.run())
    if audit is not None:
        log.info("audit log: %s", audit.path)
    else:
        log.warning("audit log off (`audit: false`, or `store:` without audit.path): issuances are not recorded")
    await app.start(
        settings.listen_host,
        settings.listen_port,
        credentials,
        admin_port,
        settings.admin_address,
        share_port=worker is not None,
    )
    if store_ca is not None:
        store_ca.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    orphan_watch = None
    if worker is not None:
        log.info("worker %d of supervisor pid %d", worker.index, worker.supervisor_pid)
        orphan_watch = asyncio.create_task(_stop_when_orphaned(worker.supervisor_pid, stop))
    await stop.wait()
    if orphan_watch is not None:
        orphan_watch.cancel()
    log.info("signal received: stopping gracefully")
    if source_task is not None:
        source_task.cancel()
    if replica is not None:
        await replica.stop()
    await app.stop(grace=5)
    if revocation_source is not None and hasattr(revocation_source, "close"):
        await revocation_source.close()
    return 0


def read_state_dir_or_none(config_path: Path) -> Path | None:
    from meshca.config import read_state_dir

    try:
        return read_state_dir(config_path)
    except ConfigError:
        return None


def _vault_crls(backend: CaBackend, log: logging.Logger) -> VaultCrls | None:
    """The Vault modes: Vault's CRLs (its roots' and intermediates'), served with meshca's own."""
    if backend.vault is None or not hasattr(backend.ca, "vault_crl_issuers"):
        return None
    from meshca.ca.vault.crl import VaultCrls

    return VaultCrls(backend.vault, backend.crl_mounts or ("pki",), backend.ca.vault_crl_issuers, system_clock,
                     log.getChild("vault-crl"))


async def _revocation_source(
    backend: CaBackend, store: EtcdStore | None, log: logging.Logger, state_dir: Path | None = None
) -> RevocationSource | None:
    """The CA's revocation list: revocations.json in its state dir, or the key in etcd with `store:` (in the Vault
    modes too: identity revocation does not depend on who signs; vault-leaf's state dir is made if missing)."""
    if store is not None:
        from meshca.store.revocation import EtcdRevocations

        return await EtcdRevocations.open(store, log.getChild("revocations"))
    from meshca.ca.revocation import StateDirRevocations
    from meshca.ca.statedir import StateDirCa

    if isinstance(backend.ca, StateDirCa):
        return StateDirRevocations(backend.ca.state_dir)
    if state_dir is None:
        return None
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return StateDirRevocations(state_dir)


async def _stop_when_orphaned(supervisor_pid: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (kill -9) stops instead of holding the port forever."""
    while os.getppid() == supervisor_pid:
        await asyncio.sleep(1.0)
    stop.set()


def _supervise(config_path: Path, count: int) -> int:
    from meshca import logs
    from meshca.ca.backends import build_ca_backend
    from meshca.cli.workers import Supervisor, SupervisorSettings

    log = logs.configure("info")
    # A bad configuration fails here once, not in N restart loops. With `store:` the CA is in etcd: each worker
    # reads it; here the settings are checked with a placeholder trust domain (it only names the issuers' default).
    if read_store_settings(config_path) is None:
        trust_domain = build_ca_backend(config_path, system_clock, log).ca.trust_domain
    else:
        trust_domain = "workers.invalid"
    settings = load_serve_settings(config_path, trust_domain)
    log = logs.configure(settings.log_level)
    if settings.listen_port == 0:
        raise ConfigError(config_path, "listen", "port 0 cannot be shared by --workers: give a fixed port")
    check_bindable("listen", settings.listen_host, settings.listen_port)
    if settings.metrics_port is not None:
        if settings.metrics_port + count - 1 > 65535:
            raise ConfigError(
                config_path, "metrics_port", f"{settings.metrics_port} + {count - 1} workers is beyond port 65535"
            )
        for index in range(count):
            check_bindable("metrics_port", settings.admin_address, settings.metrics_port + index)
    log.info("supervising %d workers on %s:%d", count, settings.listen_host, settings.listen_port)
    return Supervisor(SupervisorSettings(count, config_path), log.getChild("workers")).run()


def cmd_serve(args: argparse.Namespace) -> int:
    config_path = Path(args.config)
    if args.worker_of is not None:
        from meshca.cli.workers import WorkerRole

        return asyncio.run(_serve(config_path, WorkerRole(args.worker_index, args.worker_of)))
    if args.workers > 1:
        return _supervise(config_path, args.workers)
    return asyncio.run(_serve(config_path))


def _worker_count(text: str) -> int:
    from meshca.cli.workers import MAX_WORKERS

    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes in 1..{MAX_WORKERS}")
    return int(text)


def add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the CA, identity gate and xDS/SDS server")
    serve.add_argument("--config", required=True, metavar="FILE", help="settings file (docs/configuration.md)")
    serve.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        metavar="N",
        help="serve from N processes sharing the listening port (SO_REUSEPORT), one per core; worker i serves "
        "its admin endpoint on metrics_port + i (default 1: this process serves)",
    )
    serve.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    serve.set_defaults(handler=cmd_serve)
