"""CollectorPause: automatic garbage collection is off while a push is written, and never for long."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
from fakes import FakeLoopTime
from meshca_harness import running_meshca
from prometheus_client.parser import text_string_to_metric_families
from test_xds_server import CDS, mesh, open_stream

from meshca.gcpolicy import CollectorPause
from meshca.xds.snapshot import ResourceType


def metric(text: bytes, name: str) -> float:
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not exported")


class RecordingCollector:
    """Stands in for the `gc` module: records what the pause switches, touches nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.calls: list[str] = []

    def isenabled(self) -> bool:
        return self.enabled

    def enable(self) -> None:
        self.calls.append("enable")
        self.enabled = True

    def disable(self) -> None:
        self.calls.append("disable")
        self.enabled = False


async def test_nested_holds_pause_once_and_resume_at_the_last_release() -> None:
    collector = RecordingCollector()
    pause = CollectorPause(collector=collector)
    pause.hold()
    pause.hold()
    assert collector.calls == ["disable"]
    pause.release()
    assert not collector.enabled
    pause.release()
    assert collector.calls == ["disable", "enable"]
    assert pause.holds == 0 and pause.pauses == 1 and pause.expired == 0


async def test_a_hold_that_outlives_the_bound_lets_collection_resume(loop_time: FakeLoopTime) -> None:
    collector = RecordingCollector()
    pause = CollectorPause(max_pause_seconds=10, collector=collector)
    pause.hold()
    await loop_time.advance(9.9)
    assert not collector.enabled and pause.expired == 0
    await loop_time.advance(0.2)
    assert collector.enabled and pause.expired == 1
    pause.hold()  # still inside the expired pause: the collector stays on
    pause.release()
    pause.release()
    assert collector.calls == ["disable", "enable"]
    pause.hold()  # a new pause after every hold was released
    assert collector.calls == ["disable", "enable", "disable"]
    pause.release()


async def test_a_collector_switched_off_by_someone_else_is_left_off() -> None:
    collector = RecordingCollector(enabled=False)
    pause = CollectorPause(collector=collector)
    pause.hold()
    pause.release()
    assert collector.calls == [] and not collector.enabled


async def test_the_real_collector_is_restored() -> None:
    assert gc.isenabled()
    pause = CollectorPause()
    pause.hold()
    assert not gc.isenabled()
    pause.release()
    assert gc.isenabled()


def test_release_without_hold_and_bad_bound_are_refused() -> None:
    with pytest.raises(RuntimeError, match="without a hold"):
        CollectorPause(collector=RecordingCollector()).release()
    with pytest.raises(ValueError, match="max_pause_seconds"):
        CollectorPause(max_pause_seconds=0)


async def test_a_push_to_idle_streams_is_written_in_one_pause(tmp_path: Path) -> None:
    collector = RecordingCollector()
    pause = CollectorPause(collector=collector)
    async with running_meshca(tmp_path, collector_pause=pause) as meshca:
        meshca.app.publisher.set_mesh(mesh({"backend": 8080}))
        clients = [await open_stream(meshca, "shop", f"sa-{i}", node_id=f"node-{i}") for i in range(3)]
        for client in clients:
            await client.ack(await client.recv())
        for _ in range(200):  # every stream idle: its CDS ACK processed
            statuses = meshca.app.registry.snapshot()
            if len(statuses) == 3 and all(ResourceType.CLUSTER in s.acked for s in statuses):
                break
            await asyncio.sleep(0.01)
        collector.calls.clear()
        pauses_before = metric(meshca.app.observability.metrics_text(), "meshca_gc_push_pauses_total")

        meshca.app.publisher.set_mesh(mesh({"backend": 8080, "payments": 8081}))
        for client in clients:
            response = await client.recv()
            assert response.type_url == CDS and len(response.resources) == 2
        for _ in range(200):
            if collector.enabled:
                break
            await asyncio.sleep(0.01)
        assert collector.calls == ["disable", "enable"]  # one pause for the three streams
        assert pause.holds == 0 and pause.expired == 0
        metrics = meshca.app.observability.metrics_text()
        assert metric(metrics, "meshca_gc_push_pauses_total") == pauses_before + 1
        assert metric(metrics, "meshca_gc_push_pauses_expired_total") == 0
        for client in clients:
            client.close()
