"""`meshca serve`: load the settings, build the app, serve until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
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

    from meshca.ca.backends import CaBackend
    from meshca.store.etcd import EtcdStore
    from meshca.store.serving import StoreCa


async def _serve(config_path: Path) -> int:
    from meshca import logs
    from meshca.ca.backends import build_ca_backend
    from meshca.gcpolicy import tune_gc_for_serving

    tune_gc_for_serving()
    log = logs.configure("info")
    store, store_ca = await _open_store(config_path, log)
    try:
        backend = store_ca.backend if store_ca is not None else build_ca_backend(config_path, system_clock, log)
        return await _serve_with(config_path, log, backend, store, store_ca)
    finally:
        if store_ca is not None:
            await store_ca.close()
        if store is not None:
            await store.close()


async def _open_store(config_path: Path, log: logging.Logger) -> tuple[EtcdStore | None, StoreCa | None]:
    """With `store:`, the process's one EtcdStore (connected on this loop: every store part shares it) and the CA
    built on it; (None, None) without."""
    from meshca.store.etcd import StoreUnavailable
    from meshca.store.serving import build_store_ca, connect_store, replica_id

    settings = read_store_settings(config_path)
    if settings is None:
        return None, None
    try:
        store = await connect_store(settings, log.getChild("store"))
    except StoreUnavailable as error:
        raise ConfigError(config_path, "store.etcd.endpoints", str(error)) from None
    try:
        store_ca = await build_store_ca(config_path, store, system_clock, log, replica_id())
    except BaseException:
        await store.close()
        raise
    return store, store_ca


async def _serve_with(
    config_path: Path, log: logging.Logger, backend: CaBackend, store: EtcdStore | None, store_ca: StoreCa | None
) -> int:
    """`store`/`store_ca`: the connected EtcdStore and its StoreCa with `store:` (None without)."""
    from meshca import logs
    from meshca.app import MeshcaApp
    from meshca.cli.replica import ReplicaParts, attach_store
    from meshca.sds.server_tls import FileServerCertificate, IssuedServerCertificate, ServerTlsError
    from meshca.store.serving import replica_id

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
    # a taken port fails now, before the mesh is loaded and logged (MeshcaApp.start checks again when it binds)
    check_bindable("listen", settings.listen_host, settings.listen_port)
    if settings.metrics_port is not None:
        check_bindable("metrics_port", settings.admin_address, settings.metrics_port)
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
            ca, settings.server_names, timedelta(days=30), system_clock, log.getChild("tls")
        )
    source_task = None
    replica: ReplicaParts | None = None
    if store is not None:
        replica = await attach_store(store, app, log, replica_id())
    elif settings.mesh_file is not None:
        from meshca.mesh.source import FileMeshSource

        source = FileMeshSource(settings.mesh_file, app, log.getChild("mesh-source"))
        source.load()  # an invalid mesh at start is an error: there is no last good config yet
        source_task = asyncio.create_task(source.run())
    await app.start(
        settings.listen_host, settings.listen_port, credentials, settings.metrics_port, settings.admin_address
    )
    if store_ca is not None:
        store_ca.start()
    if store_ca is not None:
        store_ca.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("signal received: stopping gracefully")
    if source_task is not None:
        source_task.cancel()
    if replica is not None:
        await replica.stop()
    await app.stop(grace=5)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(Path(args.config)))


def add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the CA, identity gate and xDS/SDS server")
    serve.add_argument("--config", required=True, metavar="FILE", help="settings file (docs/configuration.md)")
    serve.set_defaults(handler=cmd_serve)
