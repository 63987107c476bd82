"""Prometheus metrics read at scrape time, the admin HTTP endpoint, and the `meshca status` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshca.clock import Clock
from meshca.listen import format_address, listen_error
from meshca.xds.snapshot import ResourceType
from meshca.xds.status import ProxyStatus, RegistryTotals

DEFAULT_ADMIN_HOST = "127.0.0.1"
DEFAULT_ADMIN_URL = "http://127.0.0.1:15011"

# Column order of `meshca status` and label order of per-type metrics.
STATUS_TYPES: tuple[ResourceType, ...] = (
    ResourceType.CLUSTER,
    ResourceType.ENDPOINT,
    ResourceType.LISTENER,
    ResourceType.ROUTE,
    ResourceType.SECRET,
)
_SHORT_VERSION = 8


class ProxySource(Protocol):
    """What metrics and /status read from the xDS server's registry (ProxyRegistry)."""

    def snapshot(self) -> list[ProxyStatus]: ...

    def totals(self) -> RegistryTotals: ...


class HeldCertificate(Protocol):
    @property
    def not_after(self) -> datetime: ...


class CertificateSource(Protocol):
    """What metrics read from SDS (WorkloadSecrets); never anything holding a private key."""

    def certificates(self) -> Sequence[HeldCertificate]: ...

    def issued_total(self) -> int: ...


class MeshVersionSource(Protocol):
    """What metrics read from the mesh publisher."""

    def mesh_version(self) -> str: ...

    def mesh_updates_total(self) -> int: ...

    def mesh_rejected_total(self) -> int: ...


class MeshcaCollector(Collector):
    """Builds every `meshca_*` metric family from live state at scrape time; holds no counters itself."""

    def __init__(
        self, proxies: ProxySource, certificates: CertificateSource, mesh: MeshVersionSource, clock: Clock
    ) -> None:
        self._proxies = proxies
        self._certificates = certificates
        self._mesh = mesh
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        yield from self._xds_metrics()
        yield from self._certificate_metrics()
        yield from self._mesh_metrics()

    def _xds_metrics(self) -> Iterator[Metric]:
        streams = self._proxies.snapshot()
        totals = self._proxies.totals()
        yield GaugeMetricFamily("meshca_connected_streams", "Open xDS streams (all types).", value=len(streams))
        connected = GaugeMetricFamily(
            "meshca_connected_proxies", "Open xDS streams that were sent or ACKed this resource type.", labels=["type"]
        )
        pushes = CounterMetricFamily("meshca_xds_pushes", "xDS responses sent, per resource type.", labels=["type"])
        nacks = CounterMetricFamily("meshca_xds_nacks", "xDS NACKs received, per resource type.", labels=["type"])
        for resource_type in STATUS_TYPES:
            label = [resource_type.short_name]
            count = sum(1 for s in streams if resource_type in s.sent or resource_type in s.acked)
            connected.add_metric(label, count)
            pushes.add_metric(label, totals.pushes.get(resource_type, 0))
            nacks.add_metric(label, totals.nacks.get(resource_type, 0))
        yield connected
        yield pushes
        yield nacks
        yield CounterMetricFamily(
            "meshca_xds_send_timeouts",
            "xDS streams closed because the proxy did not read a response within the send timeout.",
            value=totals.send_timeouts,
        )

    def _certificate_metrics(self) -> Iterator[Metric]:
        held = self._certificates.certificates()
        yield CounterMetricFamily(
            "meshca_certificates_issued",
            "Workload certificates issued (first issues and renewals).",
            value=self._certificates.issued_total(),
        )
        yield GaugeMetricFamily(
            "meshca_workload_certificates", "Workload certificates currently served as `default`.", value=len(held)
        )
        expiry = GaugeMetricFamily(
            "meshca_certificate_earliest_expiry_seconds",
            "Seconds until the earliest not_after among held workload certificates (absent when none).",
        )
        if held:
            earliest = min(certificate.not_after for certificate in held)
            expiry.add_metric([], (earliest - self._clock()).total_seconds())
        yield expiry

    def _mesh_metrics(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "meshca_mesh_version_info", "The mesh version being served (always 1).", labels=["version"]
        )
        info.add_metric([self._mesh.mesh_version()], 1)
        yield info
        yield CounterMetricFamily(
            "meshca_mesh_updates", "Mesh updates accepted and published.", value=self._mesh.mesh_updates_total()
        )
        yield CounterMetricFamily(
            "meshca_mesh_rejected",
            "Mesh updates rejected (the last good snapshot kept serving).",
            value=self._mesh.mesh_rejected_total(),
        )


def proxy_status_json(status: ProxyStatus) -> dict[str, Any]:
    """One stream as the /status JSON object (stable shape; versions are null when absent)."""
    nack = status.last_nack
    return {
        "stream_id": status.stream_id,
        "node_id": status.node_id,
        "identity": status.identity,
        "snapshot_key": status.snapshot_key,
        "connected_at": status.connected_at.isoformat(),
        "types": {t.short_name: {"sent": status.sent.get(t), "acked": status.acked.get(t)} for t in STATUS_TYPES},
        "last_nack": None
        if nack is None
        else {
            "type": nack.type.short_name,
            "rejected_version": nack.rejected_version,
            "message": nack.message,
            "at": nack.at.isoformat(),
        },
        "nacks": status.nacks,
    }


def status_json(proxies: ProxySource) -> list[dict[str, Any]]:
    return [proxy_status_json(s) for s in sorted(proxies.snapshot(), key=lambda s: (s.node_id, s.stream_id))]


class _AdminHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], routes: _AdminRoutes) -> None:
        self.routes = routes
        super().__init__(address, _AdminHandler)


class _AdminRoutes:
    def __init__(self, registry: CollectorRegistry, proxies: ProxySource, logger: logging.Logger) -> None:
        self.registry = registry
        self.proxies = proxies
        self.log = logger

    def get(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/status":
            body = json.dumps(status_json(self.proxies), indent=2).encode() + b"\n"
            return HTTPStatus.OK, "application/json", body
        if path == "/healthz":
            return HTTPStatus.OK, "text/plain; charset=utf-8", b"ok\n"
        return HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found: try /metrics, /status, /healthz\n"


class _AdminHandler(BaseHTTPRequestHandler):
    server: _AdminHTTPServer

    def do_GET(self) -> None:
        routes = self.server.routes
        try:
            code, content_type, body = routes.get(urlsplit(self.path).path)
        except Exception:
            routes.log.exception("admin request %s failed", self.path)
            code, content_type, body = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", b"error\n"
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        self.server.routes.log.debug("admin %s: " + format, self.address_string(), *args)


class AdminServer:
    """Serves /metrics, /status and /healthz over HTTP from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, proxies: ProxySource, logger: logging.Logger) -> None:
        self._routes = _AdminRoutes(registry, proxies, logger)
        self._log = logger
        self._server: _AdminHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self, host: str = DEFAULT_ADMIN_HOST, port: int = 0) -> int:
        """Bind (loopback unless told otherwise) and serve; returns the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("admin server already started")
        try:
            server = _AdminHTTPServer((host, port), self._routes)
        except OSError as error:
            raise listen_error("metrics_port", host, port, error) from None
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="meshca-admin", daemon=True
        )
        thread.start()
        self._server, self._thread = server, thread
        self.port = server.server_address[1]
        self._log.info("admin endpoint (metrics, status) on http://%s:%d", host, self.port)
        return self.port

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None
        self.port = None


class CaSlotView(Protocol):
    kind: str
    id: str
    state: str
    not_before: datetime
    not_after: datetime


class CaStatusView(Protocol):
    @property
    def slots(self) -> Sequence[CaSlotView]: ...


class CaStatusSource(Protocol):
    def status(self) -> CaStatusView: ...


class RotationCountersView(Protocol):
    leaf_rotations: int
    leaf_rotations_failed: int


class RotationSource(Protocol):
    def counters(self) -> RotationCountersView: ...


class CaWatchSource(Protocol):
    def ca_rotations(self) -> int: ...

    def failures(self) -> int: ...


class RotationCollector(Collector):
    """Age and expiry of every CA certificate and workload leaf, and rotation counts."""

    def __init__(
        self,
        ca: CaStatusSource,
        leaves: CertificateSource,
        rotator: RotationSource,
        watcher: CaWatchSource,
        clock: Clock,
    ) -> None:
        self._ca = ca
        self._leaves = leaves
        self._rotator = rotator
        self._watcher = watcher
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        labels = ["kind", "state", "id"]
        expiry = GaugeMetricFamily(
            "meshca_ca_expiry_seconds", "Seconds until each CA certificate expires.", labels=labels
        )
        age = GaugeMetricFamily(
            "meshca_ca_age_seconds", "Seconds since each CA certificate's not_before.", labels=labels
        )
        for slot in self._ca.status().slots:
            label = [str(slot.kind), str(slot.state), slot.id]
            expiry.add_metric(label, (slot.not_after - now).total_seconds())
            age.add_metric(label, (now - slot.not_before).total_seconds())
        yield expiry
        yield age
        leaf_expiry = GaugeMetricFamily(
            "meshca_workload_certificate_expiry_seconds",
            "Seconds until each identity's current workload certificate expires.",
            labels=["identity"],
        )
        for leaf in self._leaves.certificates():
            identity = getattr(leaf, "spiffe_id", "")
            leaf_expiry.add_metric([str(identity)], (leaf.not_after - now).total_seconds())
        yield leaf_expiry
        counters = self._rotator.counters()
        yield CounterMetricFamily(
            "meshca_leaf_rotations", "Workload certificates renewed by rotation.", value=counters.leaf_rotations
        )
        yield CounterMetricFamily(
            "meshca_leaf_rotations_failed",
            "Renewals that failed (retried; the old one kept serving).",
            value=counters.leaf_rotations_failed,
        )
        yield CounterMetricFamily(
            "meshca_ca_rotations",
            "Changes of the signing intermediate seen by this server.",
            value=self._watcher.ca_rotations(),
        )
        yield CounterMetricFamily(
            "meshca_ca_rotations_failed",
            "CA transitions that failed (the current CA kept issuing).",
            value=self._watcher.failures(),
        )


class VaultStatusView(Protocol):
    authenticated: bool
    token_expires_at: datetime | None
    consecutive_failures: int
    logins_total: int
    renewals_total: int
    failures_total: int


class VaultStatusSource(Protocol):
    def status(self) -> VaultStatusView: ...


class VaultCollector(Collector):
    """The Vault session: logged in or not, token expiry, logins, renewals and failures."""

    def __init__(self, session: VaultStatusSource, clock: Clock) -> None:
        self._session = session
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        status = self._session.status()
        yield GaugeMetricFamily(
            "meshca_vault_authenticated", "1 while meshca holds a valid Vault token.", value=int(status.authenticated)
        )
        expiry = GaugeMetricFamily(
            "meshca_vault_token_expiry_seconds",
            "Seconds until the Vault token expires (absent for non-expiring tokens).",
        )
        if status.token_expires_at is not None:
            expiry.add_metric([], (status.token_expires_at - self._clock()).total_seconds())
        yield expiry
        yield GaugeMetricFamily(
            "meshca_vault_consecutive_failures",
            "Vault calls failed in a row (0 once Vault answers again).",
            value=status.consecutive_failures,
        )
        yield CounterMetricFamily(
            "meshca_vault_failures", "Failed Vault calls and renewals.", value=status.failures_total
        )
        yield CounterMetricFamily(
            "meshca_vault_logins", "Vault logins (first and after a failed renewal).", value=status.logins_total
        )
        yield CounterMetricFamily("meshca_vault_renewals", "Vault token renewals.", value=status.renewals_total)


class PauseSource(Protocol):
    """What metrics read from the xDS server's meshca.gcpolicy.CollectorPause."""

    @property
    def pauses(self) -> int: ...

    @property
    def expired(self) -> int: ...


class GcPauseCollector(Collector):
    """How often garbage collection was deferred for a push, and how often a deferral hit its bound."""

    def __init__(self, pause: PauseSource) -> None:
        self._pause = pause

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "meshca_gc_push_pauses",
            "Pushes during which automatic garbage collection was deferred until every woken stream had written.",
            value=self._pause.pauses,
        )
        yield CounterMetricFamily(
            "meshca_gc_push_pauses_expired",
            "Deferrals ended by their bound (10 s) before every woken stream had written.",
            value=self._pause.expired,
        )


class Observability:
    """A per-app CollectorRegistry with meshca's collector, plus the admin HTTP server that exposes it."""

    def __init__(
        self,
        proxies: ProxySource,
        certificates: CertificateSource,
        mesh: MeshVersionSource,
        clock: Clock,
        logger: logging.Logger,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(MeshcaCollector(proxies, certificates, mesh, clock))
        self._proxies = proxies
        self.admin = AdminServer(self.registry, proxies, logger)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

    def status(self) -> list[dict[str, Any]]:
        return status_json(self._proxies)

    @property
    def port(self) -> int | None:
        return self.admin.port

    def start(self, host: str = DEFAULT_ADMIN_HOST, port: int = 0) -> int:
        return self.admin.start(host, port)

    def stop(self) -> None:
        self.admin.stop()


# --- `meshca status` --------------------------------------------------------------------------


def short_version(version: str) -> str:
    """Each part of a layered version shortened ("<shared>+<identity's own>"): the first part alone is
    the same for every proxy, the rest is what tells them apart."""
    return "+".join(part[:_SHORT_VERSION] for part in version.split("+"))


def _cell(entry: Mapping[str, Any], short_name: str, last_nack: Mapping[str, Any] | None) -> str:
    sent, acked = entry.get("sent"), entry.get("acked")
    if sent is None and acked is None:
        return "-"
    shown = short_version(acked) if acked else "-"
    if acked == sent:
        state = "SYNCED"
    elif last_nack is not None and last_nack.get("type") == short_name:
        state = "NACK"
    else:
        state = "STALE"
    return f"{state} ({shown})"


def format_status(proxies_json: list[dict[str, Any]]) -> str:
    """A table like `istioctl proxy-status`: per type the ACKed version and SYNCED / STALE / NACK."""
    header = ["NODE", "IDENTITY", *(t.short_name for t in STATUS_TYPES)]
    if not proxies_json:
        return "no proxies connected"
    rows: list[tuple[list[str], str | None]] = []
    for proxy in proxies_json:
        types = proxy.get("types", {})
        nack = proxy.get("last_nack")
        cells = [
            str(proxy.get("node_id", "")),
            str(proxy.get("identity", "")),
            *(_cell(types.get(t.short_name, {}), t.short_name, nack) for t in STATUS_TYPES),
        ]
        note = None
        if nack is not None:
            message = " ".join(str(nack.get("message", "")).split())
            version = nack.get("rejected_version") or "-"
            note = f"  -> last NACK {nack.get('type')} (version {version}, {proxy.get('nacks', 0)} total): {message}"
        rows.append((cells, note))
    widths = [max(len(header[i]), *(len(cells[i]) for cells, _ in rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    out = [line(header)]
    for cells, note in rows:
        out.append(line(cells))
        if note is not None:
            out.append(note)
    return "\n".join(out)


def fetch_status(admin_url: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """GET <admin>/status; raises urllib.error.URLError when unreachable."""
    with urllib.request.urlopen(admin_url.rstrip("/") + "/status", timeout=timeout) as response:
        return json.loads(response.read())


def admin_url(text: str) -> str:
    """`--admin`: a URL, or host:port meaning http://host:port."""
    text = text.strip()
    return text if "://" in text else f"http://{text}"


def admin_url_from_config(path: Path) -> str:
    """The admin endpoint a `meshca serve` config file sets up (metrics_port on admin_address)."""
    from meshca.fields import ConfigError, FieldReader, read_yaml_mapping

    reader = FieldReader(path, read_yaml_mapping(path))
    port = reader.get("metrics_port", int, None)
    if port is None:
        raise ConfigError(path, "metrics_port", "is not set, so `meshca serve` with this file has no admin endpoint")
    host = reader.get("admin_address", str, DEFAULT_ADMIN_HOST)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"  # listening on every address: ask on loopback
    elif host == "::":
        host = "::1"
    return f"http://{format_address(host, port)}"


def cmd_status(args: argparse.Namespace) -> int:
    admin = admin_url_from_config(Path(args.config)) if args.config else admin_url(args.admin)
    try:
        proxies = fetch_status(admin)
    except urllib.error.HTTPError as error:
        print(f"meshca: error: {admin}/status answered HTTP {error.code}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, ConnectionRefusedError):
            reason = "connection refused"
        print(
            f"meshca: error: cannot reach the meshca admin endpoint at {admin}: {reason} "
            "(is `meshca serve` running with its metrics port there?)",
            file=sys.stderr,
        )
        return 2
    except ValueError as error:
        print(f"meshca: error: {admin}/status did not return JSON: {error}", file=sys.stderr)
        return 2
    print(json.dumps(proxies, indent=2) if args.json else format_status(proxies))
    return 0


def add_status_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `meshca status [--admin URL | --config FILE] [--json]` to the CLI's subparsers."""
    status = subparsers.add_parser("status", help="show each connected proxy's sync state (like proxy-status)")
    where = status.add_mutually_exclusive_group()
    where.add_argument(
        "--admin",
        default=DEFAULT_ADMIN_URL,
        metavar="URL|HOST:PORT",
        help=f"meshca admin endpoint (default {DEFAULT_ADMIN_URL})",
    )
    where.add_argument(
        "--config", metavar="FILE", help="a `meshca serve` config file: use its metrics_port and admin_address"
    )
    status.add_argument("--json", action="store_true", help="print the raw /status JSON")
    status.set_defaults(handler=cmd_status)
    return status
