"""The mesh config in etcd: `meshca mesh apply` validates like the file source and writes one transaction;
EtcdMeshSource applies every stored change on every replica, keeps the last good on a bad one, and
survives an etcd restart. Against a real etcd member."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from etcd_store import connected
from meshca_harness import TRUST_DOMAIN, make_ca
from test_sources import mesh_text

from meshca.cli.main import main
from meshca.dev.etcd_process import EtcdProcess
from meshca.fields import ConfigError
from meshca.mesh.model import MeshConfig
from meshca.store.mesh import MESH_APPLIED_KEY, MESH_KEY, AppliedMesh, EtcdMeshSource, sha256_hex

pytestmark = pytest.mark.e2e

LOGGER = "meshca.test.store-mesh"


@dataclass
class RecordingSink:
    """A MeshConfigSink test double: records the configs it is given."""

    applied: list[MeshConfig] = field(default_factory=list)
    rejected: int = 0

    def apply_mesh_config(self, config: MeshConfig) -> str:
        self.applied.append(config)
        return f"v{len(self.applied)}"

    def record_rejected(self) -> None:
        self.rejected += 1

    def inbound_port(self) -> int:
        backend = self.applied[-1].service("backend")
        assert backend is not None and backend.inbound is not None
        return backend.inbound.port



@pytest.fixture
def prefix(etcd_prefix: str) -> str:
    return etcd_prefix


async def until(condition: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def serve_settings(tmp_path: Path, endpoint: str, prefix: str, **extra: object) -> Path:
    path = tmp_path / "meshca.yaml"
    data = {"state_dir": "ca", "store": {"etcd": {"endpoints": [endpoint], "prefix": prefix}}, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def read_back(endpoint: str, prefix: str, key: str) -> bytes | None:
    async def get() -> bytes | None:
        async with connected(endpoint, prefix) as store:
            value = await store.get(key)
            return None if value is None else value.value

    return asyncio.run(get())


# --- meshca mesh apply / get ---------------------------------------------------------------------------


def test_apply_writes_the_file_as_given_and_get_prints_it(
    tmp_path: Path, etcd: EtcdProcess, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_ca(tmp_path)  # the trust domain comes from the CA in state_dir
    settings = serve_settings(tmp_path, etcd.endpoint, prefix)
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("# the operator's comment stays\n" + mesh_text())
    assert main(["mesh", "apply", "-f", str(mesh), "--config", str(settings)]) == 0
    assert "applied: 2 services" in capsys.readouterr().out
    assert read_back(etcd.endpoint, prefix, MESH_KEY) == mesh.read_bytes()
    record = AppliedMesh.from_json(read_back(etcd.endpoint, prefix, MESH_APPLIED_KEY) or b"")
    assert record is not None and record.sha256 == sha256_hex(mesh.read_bytes()) and "@" in record.applied_by
    assert main(["mesh", "get", "--config", str(settings)]) == 0
    assert capsys.readouterr().out == mesh.read_text()


@pytest.mark.parametrize(
    ("text", "field_name"),
    [
        (mesh_text(inbound_port=70000), "services.backend.inbound.port"),
        (mesh_text().replace("namespace: shop\n    inbound", "namespaec: shop\n    inbound"), "services.backend.namespaec"),
        (mesh_text(trust_domain="other.test"), "trust_domain"),
        ("trust_domain: [unclosed\n", "invalid YAML"),
    ],
)
def test_a_refused_config_writes_nothing_and_names_the_field(
    tmp_path: Path, etcd: EtcdProcess, prefix: str, capsys: pytest.CaptureFixture[str], text: str, field_name: str
) -> None:
    settings = serve_settings(tmp_path, etcd.endpoint, prefix)
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(mesh_text())
    bad.write_text(text)
    apply = ["mesh", "apply", "--config", str(settings), "--trust-domain", TRUST_DOMAIN]
    assert main([*apply, "-f", str(good)]) == 0
    capsys.readouterr()
    assert main([*apply, "-f", str(bad)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"meshca: error: {bad}: ") and field_name in error and error.count("\n") == 1
    assert read_back(etcd.endpoint, prefix, MESH_KEY) == good.read_bytes()


def test_apply_without_a_store_or_etcd_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(mesh_text())
    plain = tmp_path / "plain.yaml"
    plain.write_text("state_dir: ca\n")
    assert main(["mesh", "apply", "-f", str(mesh), "--config", str(plain), "--trust-domain", TRUST_DOMAIN]) == 2
    assert "store: is not set" in capsys.readouterr().err
    with EtcdProcess() as gone:
        endpoint = gone.endpoint
    settings = serve_settings(tmp_path, endpoint, "/x")
    assert main(["mesh", "apply", "-f", str(mesh), "--config", str(settings), "--trust-domain", TRUST_DOMAIN]) == 2
    error = capsys.readouterr().err
    assert f"etcd at {endpoint} did not answer" in error and error.count("\n") == 1


def test_serve_settings_refuse_mesh_with_store(tmp_path: Path) -> None:
    from meshca.config import parse_serve_settings

    data = {"state_dir": "ca", "mesh": "mesh.yaml", "store": {"etcd": {"endpoints": ["127.0.0.1:2379"]}},
            "issuers": [{"issuer": "x", "audiences": ["a"]}]}
    with pytest.raises(ConfigError, match=r"meshca.yaml: mesh: cannot be used with store.*meshca mesh apply"):
        parse_serve_settings(tmp_path / "meshca.yaml", data, TRUST_DOMAIN)


# --- EtcdMeshSource ------------------------------------------------------------------------------------


async def test_a_missing_config_serves_empty_and_says_how_to_add_one(
    etcd: EtcdProcess, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with connected(etcd.endpoint, prefix) as store:
        sink = RecordingSink()
        assert await EtcdMeshSource(store, sink, logging.getLogger(LOGGER)).load() is None
    assert sink.applied == []
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "meshca mesh apply" in lines[0]


async def test_an_invalid_stored_config_at_start_is_fatal(etcd: EtcdProcess, prefix: str) -> None:
    async with connected(etcd.endpoint, prefix) as store:
        await store.put(MESH_KEY, mesh_text(inbound_port=0).encode())
        with pytest.raises(ConfigError, match=rf"etcd:{prefix}/mesh/config: services.backend.inbound.port"):
            await EtcdMeshSource(store, RecordingSink(), logging.getLogger(LOGGER)).load()


async def test_every_replica_applies_a_change_and_keeps_the_last_good_on_a_bad_one(
    etcd: EtcdProcess, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with connected(etcd.endpoint, prefix) as writer, connected(etcd.endpoint, prefix) as a, \
            connected(etcd.endpoint, prefix) as b:
        await writer.put(MESH_KEY, mesh_text(15006).encode())
        sinks = [RecordingSink(), RecordingSink()]
        sources = [EtcdMeshSource(store, sink, logging.getLogger(LOGGER)) for store, sink in zip((a, b), sinks)]
        for source in sources:
            await source.load()
        tasks = [asyncio.create_task(source.run()) for source in sources]
        try:
            await writer.put(MESH_KEY, mesh_text(15007).encode())
            await until(lambda: all(s.applied and s.inbound_port() == 15007 for s in sinks))
            caplog.clear()
            await writer.put(MESH_KEY, (mesh_text(15008) + "\nbogus: [" + "x" * 5000 + "]\n").encode())
            await until(lambda: all(source.rejected == 1 for source in sources))
            assert all(s.rejected == 1 and s.inbound_port() == 15007 for s in sinks)
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 2 and all("bogus" in e and "\n" not in e and len(e) < 700 for e in errors)
            await writer.delete(MESH_KEY)
            await until(lambda: all(source.rejected == 2 for source in sources))
            await writer.put(MESH_KEY, mesh_text(15009).encode())
            await until(lambda: all(s.inbound_port() == 15009 for s in sinks))
        finally:
            for task in tasks:
                await stopped(task)


async def test_a_change_after_an_etcd_restart_still_arrives(prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with EtcdProcess() as member:
        async with connected(member.endpoint, prefix, timeout=1.0) as store:
            sink = RecordingSink()
            source = EtcdMeshSource(store, sink, logging.getLogger(LOGGER))
            await store.put(MESH_KEY, mesh_text(15006).encode())
            await source.load()
            task = asyncio.create_task(source.run())
            try:
                member.kill()
                await asyncio.sleep(3)  # the watch fails and retries meanwhile
                assert sink.inbound_port() == 15006 and sink.rejected == 0
                member.start()
                for _ in range(100):
                    with contextlib.suppress(Exception):
                        await store.put(MESH_KEY, mesh_text(15010).encode())
                        break
                    await asyncio.sleep(0.1)
                await until(lambda: sink.inbound_port() == 15010, timeout=15)
            finally:
                await stopped(task)
    # the mesh source logs the outage once, however often its watch is retried (the store's own "unreachable" line
    # for this test's puts while etcd is still starting is not the source's; etcd3aio's reconnect warnings are
    # quieted by meshca.logs.configure below debug)
    outage_lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == LOGGER]
    assert len(outage_lines) <= 1, outage_lines
