"""FileMeshSource: a watched file; good edits are applied, bad ones logged and counted, the last good keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from envoy_data_plane.envoy.config.listener.v3 import Listener
from meshca_harness import TRUST_DOMAIN, running_meshca

from meshca.fields import ConfigError
from meshca.identity.spiffe import SpiffeId
from meshca.mesh.model import MeshConfig
from meshca.mesh.source import FileMeshSource
from meshca.xds.snapshot import InconsistentSnapshot, ResourceType, Snapshot

LOGGER = "meshca.test.sources"


def mesh_text(inbound_port: int = 15006, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"""\
trust_domain: {trust_domain}
services:
  backend:
    namespace: shop
    inbound:
      port: {inbound_port}
      app: 127.0.0.1:8080
    allow: [spiffe://{trust_domain}/ns/shop/sa/frontend]
  frontend:
    namespace: shop
    outbound:
      port: 15001
routes:
  - prefix: /
    to: backend
"""


def edit(path: Path, text: str) -> None:
    """Rewrite the file in place and move its mtime forward a full second, so the change is always visible."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    later = max(path.stat().st_mtime_ns, before + 1_000_000_000)
    os.utime(path, ns=(later, later))


@dataclass
class RecordingSink:
    """A MeshConfigSink test double: records what it is given; `refuse` makes it raise InconsistentSnapshot."""

    applied: list[MeshConfig] = field(default_factory=list)
    rejected: int = 0
    refuse: str | None = None

    def apply_mesh_config(self, config: MeshConfig) -> str:
        if self.refuse is not None:
            raise InconsistentSnapshot([self.refuse])
        self.applied.append(config)
        return f"v{len(self.applied)}"

    def record_rejected(self) -> None:
        self.rejected += 1


def inbound_port(config: MeshConfig) -> int:
    backend = config.service("backend")
    assert backend is not None and backend.inbound is not None
    return backend.inbound.port


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> logging.Logger:
    caplog.set_level(logging.INFO, logger=LOGGER)
    return logging.getLogger(LOGGER)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]


def test_load_applies_the_file(tmp_path: Path, log: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mesh.yaml"
    edit(path, mesh_text())
    sink = RecordingSink()
    assert FileMeshSource(path, sink, log).load() == "v1"
    assert [inbound_port(c) for c in sink.applied] == [15006] and sink.rejected == 0
    assert any(str(path) in m and "v1" in m for m in caplog.messages)


def test_load_raises_on_an_invalid_file_and_applies_nothing(tmp_path: Path, log: logging.Logger) -> None:
    """At start there is no last good config: the caller fails fast."""
    path = tmp_path / "mesh.yaml"
    edit(path, mesh_text(inbound_port=0))
    sink = RecordingSink()
    with pytest.raises(ConfigError, match=r"services\.backend\.inbound\.port: 0 is not a port"):
        FileMeshSource(path, sink, log).load()
    assert sink.applied == []


def test_poll_without_change_does_nothing(tmp_path: Path, log: logging.Logger) -> None:
    path = tmp_path / "mesh.yaml"
    edit(path, mesh_text())
    sink = RecordingSink()
    source = FileMeshSource(path, sink, log)
    source.load()
    assert source.poll_once() is False
    assert source.poll_once() is False
    assert len(sink.applied) == 1 and sink.rejected == 0


def test_an_edit_is_applied(tmp_path: Path, log: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mesh.yaml"
    edit(path, mesh_text())
    sink = RecordingSink()
    source = FileMeshSource(path, sink, log)
    source.load()
    edit(path, mesh_text(inbound_port=15016))
    assert source.poll_once() is True
    assert [inbound_port(c) for c in sink.applied] == [15006, 15016]
    assert source.poll_once() is False  # applied once, not on every poll
    assert sink.rejected == 0 and errors(caplog) == []
    assert any("changed" in m and "v2" in m for m in caplog.messages)


def test_an_invalid_edit_is_rejected_logged_and_the_last_good_stays(
    tmp_path: Path, log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mesh.yaml"
    edit(path, mesh_text())
    sink = RecordingSink()
    source = FileMeshSource(path, sink, log)
    source.load()

    edit(path, mesh_text(inbound_port=70000))
    assert source.poll_once() is False
    assert sink.rejected == 1
    assert [inbound_port(c) for c in sink.applied] == [15006]  # nothing new reached the sink
    [message] = errors(caplog)
    assert f"{path}: services.backend.inbound.port: 70000 is not a port" in message
    assert "last good config keeps serving" in message

    assert source.poll_once() is False  # the same bad file is not rejected (or logged) again
    assert sink.rejected == 1 and len(errors(caplog)) == 1

    edit(path, mesh_text(inbound_port=15016))  # the fix is picked up
    assert source.poll_once() is True
    assert [inbound_port(c) for c in sink.applied] == [15006, 15016] and sink.rejected == 1


def test_invalid_yaml_edit_is_rejected(tmp_path: Path, log: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mesh.yaml"
    edit(path, mesh_text())
    sink = RecordingSink()
    source = FileMeshSource(path, sink, log)
    source.load()
    edit(path, "services: [unclosed\n")
    assert source.poll_once() is False
    assert sink.rejected == 1 and len(sink.applied) == 1
    [message] = errors(caplog)
    assert f"{path}: invalid YAML" in message


def test_a_refusing_sink_counts_as_rejected(
    tmp_path: Path, log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mesh.yaml"
    edit(path, mesh_text())
    sink = RecordingSink()
    source = FileMeshSource(path, sink, log)
    source.load()
    sink.refuse = "LDS 'x' references SDS 'y', which does not exist"
    edit(path, mesh_text(inbound_port=15016))
    assert source.poll_once() is False
    assert sink.rejected == 1 and len(sink.applied) == 1
    [message] = errors(caplog)
    assert "LDS 'x' references SDS 'y'" in message


def test_a_deleted_file_is_rejected_and_logged(
    tmp_path: Path, log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mesh.yaml"
    edit(path, mesh_text())
    sink = RecordingSink()
    source = FileMeshSource(path, sink, log)
    source.load()
    path.unlink()
    assert source.poll_once() is False
    assert sink.rejected == 1 and len(sink.applied) == 1
    [message] = errors(caplog)
    assert str(path) in message and "disappeared" in message
    assert source.poll_once() is False and sink.rejected == 1  # still gone: counted once

    edit(path, mesh_text(inbound_port=15016))  # it comes back
    assert source.poll_once() is True
    assert [inbound_port(c) for c in sink.applied] == [15006, 15016]


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """A bounded wait for something the background loop does (not a timing assertion)."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def running(source: FileMeshSource) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_run_picks_up_edits(tmp_path: Path, log: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mesh.yaml"
    edit(path, mesh_text())
    sink = RecordingSink()
    source = FileMeshSource(path, sink, log, interval=0.02)
    source.load()
    async with running(source) as task:
        edit(path, mesh_text(inbound_port=15016))
        await eventually(lambda: len(sink.applied) == 2)
        assert inbound_port(sink.applied[-1]) == 15016

        edit(path, mesh_text(inbound_port=-1))
        await eventually(lambda: sink.rejected == 1)
        assert len(sink.applied) == 2
        assert any("services.backend.inbound.port" in m for m in errors(caplog))
        assert not task.done()  # a rejected edit does not stop the loop

        edit(path, mesh_text(inbound_port=15026))
        await eventually(lambda: len(sink.applied) == 3)
        assert inbound_port(sink.applied[-1]) == 15026


# -- with a real meshca ---------------------------------------------------------------------------

BACKEND = SpiffeId.for_service_account(TRUST_DOMAIN, "shop", "backend")


def served_inbound_port(snapshot: Snapshot | None) -> int:
    assert snapshot is not None
    listeners = snapshot.of_type(ResourceType.LISTENER).resources
    assert set(listeners) == {"inbound|backend"}
    return Listener.parse(listeners["inbound|backend"].payload).address.socket_address.port_value


async def test_file_source_drives_a_real_meshca(
    tmp_path: Path, log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mesh.yaml"
    edit(path, mesh_text())
    async with running_meshca(tmp_path) as meshca:
        app = meshca.app
        source = FileMeshSource(path, app, log)
        first = source.load()
        assert app.publisher.mesh_version() == first and app.publisher.mesh_updates_total() == 1
        key = app.publisher.ensure_identity(BACKEND)
        assert served_inbound_port(app.cache.get(key)) == 15006

        edit(path, mesh_text(inbound_port=15016))
        assert source.poll_once() is True
        second = app.publisher.mesh_version()
        assert second != first and app.publisher.mesh_updates_total() == 2
        served = app.cache.get(key)
        assert served_inbound_port(served) == 15016  # pushed to the identity already connected

        edit(path, mesh_text(inbound_port=70000))
        assert source.poll_once() is False
        assert app.publisher.mesh_version() == second
        assert app.publisher.mesh_rejected_total() == 1 and app.publisher.mesh_updates_total() == 2
        assert app.cache.get(key) is served  # the last good snapshot keeps serving, untouched
        assert any(f"{path}: services.backend.inbound.port" in m for m in errors(caplog))


async def test_a_foreign_trust_domain_is_rejected_naming_both(
    tmp_path: Path, log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mesh.yaml"
    edit(path, mesh_text())
    async with running_meshca(tmp_path) as meshca:
        app = meshca.app
        source = FileMeshSource(path, app, log)
        good = source.load()
        key = app.publisher.ensure_identity(BACKEND)
        served = app.cache.get(key)

        edit(path, mesh_text(trust_domain="other.test"))
        assert source.poll_once() is False
        assert app.publisher.mesh_version() == good and app.publisher.mesh_updates_total() == 1
        assert app.publisher.mesh_rejected_total() == 1  # counted once (by the source, not again by the app)
        assert app.cache.get(key) is served
        [message] = errors(caplog)
        assert "'other.test'" in message and f"'{TRUST_DOMAIN}'" in message

        # at start (no last good config) the same file is an error for the caller
        edit(path, mesh_text(trust_domain="other.test"))
        with pytest.raises(InconsistentSnapshot, match="'other.test'.*'mesh.test'"):
            FileMeshSource(path, app, log).load()
        assert app.publisher.mesh_version() == good
