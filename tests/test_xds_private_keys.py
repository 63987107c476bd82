"""meshca counts the private keys its xDS server sends (meshca_xds_private_keys_sent): one per `default` Secret written
to a normal node, over SotW and delta; none to an agent-mode node, and none for trust bundles (`ROOTCA`)."""

from __future__ import annotations

import re
from pathlib import Path

from meshca_harness import RunningMeshca, running_meshca
from xds_client import ROOTCA_AND_DEFAULT, DeltaXdsClient, XdsClient

from meshca.mesh.resources import AGENT_METADATA_KEY, AGENT_METADATA_VALUE
from meshca.xds.snapshot import ResourceType

SDS = ResourceType.SECRET.type_url
CDS = ResourceType.CLUSTER.type_url
AGENT_NODE = {AGENT_METADATA_KEY: AGENT_METADATA_VALUE}


def exposed(meshca: RunningMeshca) -> float:
    """The counter as /metrics shows it."""
    text = meshca.app.observability.metrics_text().decode()
    (value,) = re.findall(r"^meshca_xds_private_keys_sent_total (\S+)$", text, re.MULTILINE)
    return float(value)


def keys_in(secrets: list[bytes]) -> int:
    return sum(b"PRIVATE KEY" in secret for secret in secrets)


async def test_private_keys_are_counted_as_sent_to_normal_nodes_and_none_to_agent_mode_nodes(tmp_path: Path) -> None:
    async with running_meshca(tmp_path) as meshca:
        channel = meshca.channel()
        assert meshca.app.registry.totals().private_keys_sent == 0 and exposed(meshca) == 0

        # an agent-mode node asks for everything a sidecar asks for, secrets included: it gets none
        agent = XdsClient(channel, meshca.token("shop", "frontend", node_id="frontend-1"))
        await agent.send(CDS, node_id="frontend-1", node_metadata=AGENT_NODE)
        await agent.recv()
        await agent.send(SDS, ROOTCA_AND_DEFAULT)
        assert await agent.silent_for(0.5)
        assert meshca.app.registry.totals().private_keys_sent == 0

        # a normal node over SotW: `default` (a key) and `ROOTCA` (none) in one response
        sotw = XdsClient(channel, meshca.token("shop", "backend", node_id="backend-1"))
        await sotw.send(SDS, ROOTCA_AND_DEFAULT, node_id="backend-1")
        response = await sotw.recv()
        assert len(response.resources) == 2 and keys_in([r.value for r in response.resources]) == 1
        assert meshca.app.registry.totals().private_keys_sent == 1

        # and over delta
        delta = DeltaXdsClient(channel, meshca.token("shop", "audit", node_id="audit-1"))
        await delta.send(SDS, ROOTCA_AND_DEFAULT, node_id="audit-1")
        delta_response = await delta.recv()
        assert keys_in([r.resource.value for r in delta_response.resources]) == 1
        assert meshca.app.registry.totals().private_keys_sent == 2 and exposed(meshca) == 2

        assert await agent.silent_for(0.2)
        assert meshca.app.registry.totals().private_keys_sent == 2  # still none to the agent-mode node
        for client in (agent, sotw, delta):
            client.close()
        await channel.close()
