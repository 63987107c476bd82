"""Observability: real scrapes of the admin endpoint, /status JSON, and the `meshca status` command."""

from __future__ import annotations

import argparse
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from fakes import T0, FakeClock
from prometheus_client.parser import text_string_to_metric_families

from meshca.admin.server import Observability
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.cli.status import add_status_parser, format_status
from meshca.dev.envoy_process import free_port
from meshca.identity.spiffe import SpiffeId
from meshca.sds.workloads import WorkloadSecrets
from meshca.xds.snapshot import ResourceType
from meshca.xds.status import ProxyRegistry

TRUST_DOMAIN = "mesh.test"
LOG = logging.getLogger("meshca.test.observability")


@dataclass
class FakeMesh:
    """Stands in for MeshPublisher's MeshVersionSource methods."""

    version: str = "0000000000000000"
    updates: int = 0
    rejected: int = 0

    def mesh_version(self) -> str:
        return self.version

    def mesh_updates_total(self) -> int:
        return self.updates

    def mesh_rejected_total(self) -> int:
        return self.rejected


@dataclass
class Admin:
    url: str
    obs: Observability
    registry: ProxyRegistry
    secrets: WorkloadSecrets
    mesh: FakeMesh
    clock: FakeClock

    def get(self, path: str) -> tuple[int, str, str]:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, content_type, body = self.get("/metrics")
        assert status == 200
        assert content_type.startswith("text/plain")
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }

    def status(self) -> list[dict[str, object]]:
        status, content_type, body = self.get("/status")
        assert status == 200 and content_type == "application/json"
        return json.loads(body)


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    clock = FakeClock()
    ca = CertificateAuthority.init(tmp_path / "ca", CaSettings(trust_domain=TRUST_DOMAIN), clock)
    registry = ProxyRegistry(clock)
    secrets = WorkloadSecrets(ca, clock, LOG.getChild("sds"))
    mesh = FakeMesh()
    obs = Observability(registry, secrets, mesh, clock, LOG)
    port = obs.start()
    try:
        yield Admin(f"http://127.0.0.1:{port}", obs, registry, secrets, mesh, clock)
    finally:
        obs.stop()


def spiffe(sa: str) -> SpiffeId:
    return SpiffeId(TRUST_DOMAIN, f"/ns/default/sa/{sa}")


def test_xds_metrics_follow_the_registry_and_counters_survive_stream_close(admin: Admin) -> None:
    before = admin.scrape()
    assert value(before, "meshca_connected_streams") == 0
    for short in ("CDS", "EDS", "LDS", "RDS", "SDS"):
        assert value(before, "meshca_connected_proxies", type=short) == 0
        assert value(before, "meshca_xds_pushes_total", type=short) == 0
        assert value(before, "meshca_xds_nacks_total", type=short) == 0
    assert value(before, "meshca_xds_send_timeouts_total") == 0
    admin.registry.record_send_timeout()
    assert value(admin.scrape(), "meshca_xds_send_timeouts_total") == 1

    reg = admin.registry
    a = reg.open("node-a", "spiffe://mesh.test/ns/default/sa/a", "key-a")
    b = reg.open("node-b", "spiffe://mesh.test/ns/default/sa/b", "key-b")
    reg.record_sent(a, ResourceType.CLUSTER, "c1")
    reg.record_ack(a, ResourceType.CLUSTER, "c1")
    reg.record_sent(a, ResourceType.CLUSTER, "c2")
    reg.record_nack(a, ResourceType.CLUSTER, "c2", "bad cluster")
    reg.record_sent(b, ResourceType.SECRET, "s1")
    reg.record_sent(b, ResourceType.CLUSTER, "c2")

    during = admin.scrape()
    assert value(during, "meshca_connected_streams") == 2
    assert value(during, "meshca_connected_proxies", type="CDS") == 2
    assert value(during, "meshca_connected_proxies", type="SDS") == 1
    assert value(during, "meshca_connected_proxies", type="LDS") == 0
    assert value(during, "meshca_xds_pushes_total", type="CDS") == 3
    assert value(during, "meshca_xds_pushes_total", type="SDS") == 1
    assert value(during, "meshca_xds_nacks_total", type="CDS") == 1

    reg.close(a)
    reg.close(b)
    after = admin.scrape()
    assert value(after, "meshca_connected_streams") == 0
    assert value(after, "meshca_connected_proxies", type="CDS") == 0
    assert value(after, "meshca_xds_pushes_total", type="CDS") == 3
    assert value(after, "meshca_xds_nacks_total", type="CDS") == 1


def test_certificate_metrics_follow_issuance_and_the_clock(admin: Admin) -> None:
    empty = admin.scrape()
    assert value(empty, "meshca_certificates_issued_total") == 0
    assert value(empty, "meshca_workload_certificates") == 0
    assert not any(name == "meshca_certificate_earliest_expiry_seconds" for name, _ in empty)

    admin.secrets.default_secret(spiffe("a"))
    admin.clock.now += timedelta(minutes=5)
    admin.secrets.default_secret(spiffe("b"))
    admin.secrets.default_secret(spiffe("a"))  # still fresh: reused, not issued
    held = {c.spiffe_id: c for c in admin.secrets.certificates()}
    earliest = held[spiffe("a")].not_after

    samples = admin.scrape()
    assert value(samples, "meshca_certificates_issued_total") == 2
    assert value(samples, "meshca_workload_certificates") == 2
    expiry = value(samples, "meshca_certificate_earliest_expiry_seconds")
    assert expiry == (earliest - admin.clock.now).total_seconds()
    assert 0 < expiry <= 3600

    admin.clock.now += timedelta(minutes=10)
    later = value(admin.scrape(), "meshca_certificate_earliest_expiry_seconds")
    assert later == expiry - 600

    # Past a's renewal point: a renewal counts as an issue; the held count stays 2.
    admin.clock.now = earliest - timedelta(seconds=30)
    admin.secrets.default_secret(spiffe("a"))
    renewed = admin.scrape()
    assert value(renewed, "meshca_certificates_issued_total") == 3
    assert value(renewed, "meshca_workload_certificates") == 2
    new_earliest = min(c.not_after for c in admin.secrets.certificates())
    assert new_earliest == held[spiffe("b")].not_after
    assert (
        value(renewed, "meshca_certificate_earliest_expiry_seconds") == (new_earliest - admin.clock.now).total_seconds()
    )


def test_mesh_metrics_read_the_version_source(admin: Admin) -> None:
    samples = admin.scrape()
    assert value(samples, "meshca_mesh_version_info", version="0000000000000000") == 1
    assert value(samples, "meshca_mesh_updates_total") == 0
    assert value(samples, "meshca_mesh_rejected_total") == 0

    admin.mesh.version, admin.mesh.updates, admin.mesh.rejected = "abcdef0123456789", 3, 1
    samples = admin.scrape()
    assert value(samples, "meshca_mesh_version_info", version="abcdef0123456789") == 1
    assert value(samples, "meshca_mesh_version_info", version="0000000000000000") is None
    assert value(samples, "meshca_mesh_updates_total") == 3
    assert value(samples, "meshca_mesh_rejected_total") == 1


def test_each_app_has_its_own_registry(tmp_path: Path, admin: Admin) -> None:
    other = Observability(ProxyRegistry(admin.clock), admin.secrets, FakeMesh(), admin.clock, LOG)
    admin.registry.open("node-a", "id", "key")
    assert b"meshca_connected_streams 1.0" in admin.obs.metrics_text()
    assert b"meshca_connected_streams 0.0" in other.metrics_text()
    assert other.registry is not admin.obs.registry


def test_status_json_shape(admin: Admin) -> None:
    assert admin.status() == []
    reg = admin.registry
    stream = reg.open("node-a", "spiffe://mesh.test/ns/default/sa/a", "key-a")
    reg.record_sent(stream, ResourceType.CLUSTER, "c1")
    reg.record_ack(stream, ResourceType.CLUSTER, "c1")
    reg.record_sent(stream, ResourceType.LISTENER, "l2")
    admin.clock.now += timedelta(seconds=7)
    reg.record_nack(stream, ResourceType.LISTENER, "l2", "listener rejected")

    (proxy,) = admin.status()
    assert proxy == {
        "stream_id": stream,
        "node_id": "node-a",
        "identity": "spiffe://mesh.test/ns/default/sa/a",
        "snapshot_key": "key-a",
        "connected_at": T0.isoformat(),
        "types": {
            "CDS": {"sent": "c1", "acked": "c1"},
            "EDS": {"sent": None, "acked": None},
            "LDS": {"sent": "l2", "acked": None},
            "RDS": {"sent": None, "acked": None},
            "SDS": {"sent": None, "acked": None},
        },
        "last_nack": {
            "type": "LDS",
            "rejected_version": "l2",
            "message": "listener rejected",
            "at": (T0 + timedelta(seconds=7)).isoformat(),
        },
        "nacks": 1,
    }


def test_healthz_not_found_and_loopback_binding(admin: Admin) -> None:
    assert admin.get("/healthz")[::2] == (200, "ok\n")
    with pytest.raises(urllib.error.HTTPError) as raised:
        admin.get("/nope")
    assert raised.value.code == 404
    assert admin.get("/metrics?name[]=meshca_connected_streams")[0] == 200


def test_stop_closes_the_port(tmp_path: Path) -> None:
    clock = FakeClock()
    registry = ProxyRegistry(clock)

    class NoCertificates:
        def certificates(self) -> list[object]:
            return []

        def issued_total(self) -> int:
            return 0

    obs = Observability(registry, NoCertificates(), FakeMesh(), clock, LOG)  # type: ignore[arg-type]
    port = obs.start("127.0.0.1", 0)
    assert obs.port == port
    obs.stop()
    obs.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_no_private_key_in_metrics_or_status(admin: Admin) -> None:
    for sa in ("a", "b", "c"):
        admin.secrets.default_secret(spiffe(sa))
    stream = admin.registry.open("node-a", spiffe("a").uri, spiffe("a").uri)
    admin.registry.record_sent(stream, ResourceType.SECRET, "s1")
    admin.registry.record_nack(stream, ResourceType.SECRET, "s1", "bad secret")
    for path in ("/metrics", "/status", "/healthz"):
        body = admin.get(path)[2]
        assert "PRIVATE KEY" not in body
        assert "BEGIN" not in body


def row(rendered: str, node: str) -> list[str]:
    (line,) = [line for line in rendered.splitlines() if line.startswith(node)]
    return line.split("  ")


def test_format_status_marks_synced_stale_and_nack() -> None:
    def types(**entries: tuple[str | None, str | None]) -> dict[str, dict[str, str | None]]:
        result = {t: {"sent": None, "acked": None} for t in ("CDS", "EDS", "LDS", "RDS", "SDS")}
        for name, (sent, acked) in entries.items():
            result[name] = {"sent": sent, "acked": acked}
        return result

    proxies = [
        {
            "node_id": "node-a",
            "identity": "spiffe://mesh.test/ns/default/sa/a",
            "types": types(CDS=("0123456789abcdef", "0123456789abcdef"), LDS=("ffff000011112222", "aaaa000011112222")),
            "last_nack": {
                "type": "LDS",
                "rejected_version": "ffff000011112222",
                "message": "bad\n  listener",
                "at": T0.isoformat(),
            },
            "nacks": 2,
        },
        {
            "node_id": "node-b",
            "identity": "spiffe://mesh.test/ns/default/sa/b",
            "types": types(CDS=("0123456789abcdef", "99999999aaaaaaaa"), SDS=("5555666677778888", None)),
            "last_nack": None,
            "nacks": 0,
        },
    ]
    rendered = format_status(proxies)
    lines = rendered.splitlines()
    assert lines[0].split() == ["NODE", "IDENTITY", "CDS", "EDS", "LDS", "RDS", "SDS"]
    a = [cell.strip() for cell in row(rendered, "node-a") if cell.strip()]
    assert a == ["node-a", "spiffe://mesh.test/ns/default/sa/a", "SYNCED (01234567)", "-", "NACK (aaaa0000)", "-", "-"]
    b = [cell.strip() for cell in row(rendered, "node-b") if cell.strip()]
    assert b == ["node-b", "spiffe://mesh.test/ns/default/sa/b", "STALE (99999999)", "-", "-", "-", "STALE (-)"]
    nack_lines = [line for line in lines if "last NACK" in line]
    assert nack_lines == ["  -> last NACK LDS (version ffff000011112222, 2 total): bad listener"]
    assert lines.index(nack_lines[0]) == lines.index(row_line(lines, "node-a")) + 1
    assert format_status([]) == "no proxies connected"


def row_line(lines: list[str], node: str) -> str:
    return next(line for line in lines if line.startswith(node))


def parse_status_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meshca")
    add_status_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["status", *argv])


def test_status_command_prints_the_table_and_json(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    stream = admin.registry.open("node-a", spiffe("a").uri, spiffe("a").uri)
    admin.registry.record_sent(stream, ResourceType.CLUSTER, "0123456789abcdef")
    admin.registry.record_ack(stream, ResourceType.CLUSTER, "0123456789abcdef")

    args = parse_status_args("--admin", admin.url)
    assert args.admin == admin.url and args.json is False
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NODE", "IDENTITY", "CDS", "EDS", "LDS", "RDS", "SDS"]
    assert "SYNCED (01234567)" in row_line(out.splitlines(), "node-a")

    args = parse_status_args("--admin", admin.url + "/", "--json")
    assert args.handler(args) == 0
    (proxy,) = json.loads(capsys.readouterr().out)
    assert proxy["types"]["CDS"] == {"sent": "0123456789abcdef", "acked": "0123456789abcdef"}


def test_status_command_defaults_to_the_loopback_admin_port() -> None:
    args = parse_status_args()
    assert args.admin == "http://127.0.0.1:15011"


def test_status_command_connection_refused_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    args = parse_status_args("--admin", url)
    assert args.handler(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"meshca: error: cannot reach the meshca admin endpoint at {url}: connection refused")


def test_status_command_http_error_exits_2(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_status_args("--admin", admin.url + "/nope")
    assert args.handler(args) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "HTTP 404" in line


async def test_rotation_metrics_show_ca_and_leaf_expiry_and_rotation_counts(tmp_path: Path) -> None:
    from meshca_harness import running_meshca

    from meshca.identity.spiffe import SpiffeId

    async with running_meshca(tmp_path) as meshca:
        app = meshca.app
        alice = SpiffeId.for_service_account("mesh.test", "shop", "alice")
        app.publisher.ensure_identity(alice)
        app.rotator.renew(alice)
        text = app.observability.metrics_text().decode()
        assert 'meshca_ca_expiry_seconds{id="' in text and 'kind="intermediate",state="active"' in text
        assert 'meshca_workload_certificate_expiry_seconds{identity="spiffe://mesh.test/ns/shop/sa/alice"}' in text
        assert "meshca_leaf_rotations_total 1.0" in text
        app.ca.rotate_intermediate(now=True)
        app.ca_watcher.check()
        text = app.observability.metrics_text().decode()
        assert "meshca_ca_rotations_total 1.0" in text
        assert 'state="old"' in text  # the retired intermediate is still listed until pruned


def test_status_versions_tell_proxies_apart_by_their_own_part() -> None:
    shared, own_a, own_b = "a" * 16, "b" * 16, "c" * 16
    proxies = [
        {"node_id": node, "identity": f"spiffe://mesh.test/ns/default/sa/{node}",
         "types": {"SDS": {"sent": f"{shared}+{own}", "acked": f"{shared}+{own}"}}}
        for node, own in (("node-a", own_a), ("node-b", own_b))
    ]
    lines = format_status(proxies).splitlines()
    assert "SYNCED (aaaaaaaa+bbbbbbbb)" in row_line(lines, "node-a")
    assert "SYNCED (aaaaaaaa+cccccccc)" in row_line(lines, "node-b")
