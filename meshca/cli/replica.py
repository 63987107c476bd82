"""What `meshca serve` runs beside the app when its settings have `store:`: the mesh config from etcd, the
registry summary this replica publishes, the fleet view, the registered endpoints and the store's metrics."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from meshca.admin.metrics import StoreCollector
from meshca.admin.server import status_json
from meshca.app import MeshcaApp
from meshca.cli.errors import CliError
from meshca.store.endpoints import StoredRegistrations
from meshca.store.etcd import EtcdStore, StoreUnavailable
from meshca.store.mesh import EtcdMeshSource
from meshca.store.registry import RegistryPublisher
from meshca.store.tasks import stop_tasks


@dataclass
class ReplicaParts:
    store: EtcdStore
    mesh: EtcdMeshSource
    registry: RegistryPublisher
    log: logging.Logger
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    endpoints: StoredRegistrations | None = None

    async def stop(self) -> None:
        await stop_tasks(self.tasks, self.log)
        if self.endpoints is not None:  # before the app stops: its ending streams leave the keys to the lease
            await self.endpoints.stop()
        await self.registry.close()


async def attach_store(store: EtcdStore, app: MeshcaApp, logger: logging.Logger, replica_id: str | None = None,
                       registry_interval: float = 1.0) -> ReplicaParts:
    """Load the stored mesh config into `app` (an invalid one raises, as an invalid mesh file does), then watch
    it and publish the registry summary; /status and `meshca status` show the fleet. Registered endpoints go to
    etcd and come from it (meshca.store.endpoints): call before `app.start()`."""
    app.observability.add_collector(StoreCollector(store))
    mesh = EtcdMeshSource(store, app, logger.getChild("mesh-source"))
    try:
        await mesh.load()
    except StoreUnavailable as error:
        raise CliError(f"store.etcd: {error}") from None
    registry = RegistryPublisher(
        store, lambda: status_json(app.registry), app.registry.changes, app.clock, logger.getChild("registry"),
        replica_id=replica_id, interval=registry_interval,
    )
    app.observability.set_fleet(registry)
    try:  # before app.start(): the EndpointService writes registrations to etcd, and EDS follows endpoints/
        endpoints = await StoredRegistrations.open(store, registry.replica_id, app.endpoints, lambda: app.mesh_config,
                                                   logger.getChild("endpoints-store"))
    except StoreUnavailable as error:
        raise CliError(f"store.etcd: {error}") from None
    app.registration_sink = endpoints
    parts = ReplicaParts(store, mesh, registry, logger, endpoints=endpoints)
    parts.tasks = [asyncio.create_task(mesh.run(), name="mesh-store-watch"),
                   asyncio.create_task(registry.run(), name="registry-publisher")]
    logger.info("replica %s on etcd %s (prefix %s)", registry.replica_id, ", ".join(store.settings.endpoints),
                store.settings.prefix)
    return parts
