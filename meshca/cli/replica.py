"""What `meshca serve` runs beside the app when its settings have `store:`: the mesh config from etcd, the
registry summary this replica publishes, the fleet view and the store's metrics."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from meshca.admin.metrics import StoreCollector
from meshca.admin.server import status_json
from meshca.app import MeshcaApp
from meshca.cli.errors import CliError
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

    async def stop(self) -> None:
        await stop_tasks(self.tasks, self.log)
        await self.registry.close()


async def attach_store(store: EtcdStore, app: MeshcaApp, logger: logging.Logger, replica_id: str | None = None,
                       registry_interval: float = 1.0) -> ReplicaParts:
    """Load the stored mesh config into `app` (an invalid one raises, as an invalid mesh file does), then watch
    it and publish the registry summary; /status and `meshca status` show the fleet."""
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
    parts = ReplicaParts(store, mesh, registry, logger)
    parts.tasks = [asyncio.create_task(mesh.run(), name="mesh-store-watch"),
                   asyncio.create_task(registry.run(), name="registry-publisher")]
    logger.info("replica %s on etcd %s (prefix %s)", registry.replica_id, ", ".join(store.settings.endpoints),
                store.settings.prefix)
    return parts
