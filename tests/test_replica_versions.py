"""Two independent meshca replicas with the same CA and mesh config give the same resource versions, so a
delta client that moves from one to the other with `initial_resource_versions` gets only what differs: its
identity's certificate, which each replica issues itself."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import yaml
from meshca_harness import TRUST_DOMAIN, RunningMeshca, running_meshca
from test_meshbuild import MESH
from xds_client import DeltaXdsClient, XdsClient

from meshca.identity.spiffe import SpiffeId
from meshca.mesh.model import parse_mesh_config
from meshca.xds.snapshot import ResourceType

IDENTITY = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"
MESH_TYPES = (ResourceType.CLUSTER, ResourceType.ENDPOINT, ResourceType.LISTENER, ResourceType.ROUTE)


@contextlib.asynccontextmanager
async def two_replicas(directory: Path) -> AsyncIterator[tuple[RunningMeshca, RunningMeshca]]:
    config = parse_mesh_config(directory / "mesh.yaml", yaml.safe_load(MESH))
    async with running_meshca(directory) as first, running_meshca(directory) as second:
        assert first.app.ca is not second.app.ca
        for replica in (first, second):
            replica.app.apply_mesh_config(config)
            replica.app.publisher.ensure_identity(SpiffeId.parse(IDENTITY))  # as the frontend's first stream would
        yield first, second


def names_of(replica: RunningMeshca, resource_type: ResourceType) -> list[str]:
    snapshot = replica.app.cache.get(IDENTITY)
    assert snapshot is not None
    return sorted(snapshot.of_type(resource_type).resources)


async def fetch_all(replica: RunningMeshca, held: dict[ResourceType, dict[str, str]] | None = None) -> tuple[
    dict[ResourceType, dict[str, str]], DeltaXdsClient
]:
    """Subscribe to everything the frontend's node uses (with `held` as initial_resource_versions) and ACK
    what comes until the stream is quiet: name -> version of every resource sent, per type."""
    client = DeltaXdsClient(replica.channel(), replica.token("shop", "frontend", node_id="frontend-1"))
    received: dict[ResourceType, dict[str, str]] = {t: {} for t in (ResourceType.SECRET, *MESH_TYPES)}
    for index, resource_type in enumerate(received):
        names = () if resource_type in (ResourceType.CLUSTER, ResourceType.LISTENER) else names_of(replica, resource_type)
        await client.send(
            resource_type.type_url,
            names,
            initial_versions=(held or {}).get(resource_type, {}),
            node_id="frontend-1" if index == 0 else None,
        )
    while True:
        try:
            response = await client.recv(timeout=1.0)
        except TimeoutError:
            return received, client
        resource_type = ResourceType.from_type_url(response.type_url)
        assert resource_type is not None and not response.removed_resources
        received[resource_type].update({r.name: r.version for r in response.resources})
        await client.ack(response)


async def test_same_content_gives_the_same_versions_on_every_replica(tmp_path: Path) -> None:
    async with two_replicas(tmp_path) as (first, second):
        for resource_type in (ResourceType.SECRET, *MESH_TYPES):
            assert names_of(first, resource_type) == names_of(second, resource_type)
        on_first, client = await fetch_all(first)
        client.close()
        on_second, client = await fetch_all(second)
        client.close()
        for resource_type in MESH_TYPES:
            assert on_first[resource_type], resource_type  # the frontend uses every kind
            assert on_first[resource_type] == on_second[resource_type], resource_type.short_name
        # the trust bundle is the same; the certificate is each replica's own (another key)
        assert on_first[ResourceType.SECRET]["ROOTCA"] == on_second[ResourceType.SECRET]["ROOTCA"]
        assert on_first[ResourceType.SECRET]["default"] != on_second[ResourceType.SECRET]["default"]
        # state of the world: the version of each type is the same too
        snapshots = [replica.app.cache.get(IDENTITY) for replica in (first, second)]
        assert snapshots[0] is not None and snapshots[1] is not None
        for resource_type in MESH_TYPES:
            assert snapshots[0].version(resource_type) == snapshots[1].version(resource_type)
        assert first.app.publisher.mesh_version() == second.app.publisher.mesh_version()


async def test_a_delta_client_moving_to_another_replica_is_sent_only_its_new_certificate(tmp_path: Path) -> None:
    async with two_replicas(tmp_path) as (first, second):
        held, client = await fetch_all(first)
        client.close()  # its replica goes away; it keeps what it holds
        again, client = await fetch_all(second, held)
        client.close()
        assert {t.short_name: sorted(v) for t, v in again.items() if v} == {"SDS": ["default"]}


async def test_sotw_client_moving_to_another_replica_sees_the_versions_it_holds(tmp_path: Path) -> None:
    async with two_replicas(tmp_path) as (first, second):
        versions = []
        for replica in (first, second):
            client = XdsClient(replica.channel(), replica.token("shop", "frontend", node_id="frontend-1"))
            await client.send(ResourceType.CLUSTER.type_url, node_id="frontend-1")
            clusters = await client.recv()
            await client.send(ResourceType.LISTENER.type_url)
            listeners = await client.recv()
            versions.append((clusters.version_info, listeners.version_info))
            client.close()
        assert versions[0] == versions[1]


_VERSIONS_SCRIPT = """
import json, sys
from pathlib import Path
import yaml
sys.path.insert(0, sys.argv[1])
from test_meshbuild import MESH
from meshca.mesh.build import build_mesh
from meshca.mesh.model import parse_mesh_config
mesh = build_mesh(parse_mesh_config(Path("mesh.yaml"), yaml.safe_load(MESH)))
versions = {f"{r.type.name}/{r.name}": r.version for r in mesh.shared}
for spiffe_id, resources in mesh.per_identity.items():
    versions.update({f"{spiffe_id.uri} {r.type.name}/{r.name}": r.version for r in resources})
print(json.dumps(versions, sort_keys=True))
"""


def test_versions_do_not_depend_on_the_process_hash_seed() -> None:
    """Replicas are separate processes, each with its own str hash seed: no set or dict order may leak into bytes."""
    tests = str(Path(__file__).parent)
    outputs = {
        subprocess.run(
            [sys.executable, "-c", _VERSIONS_SCRIPT, tests],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1 and len(json.loads(outputs.pop())) > 20
