"""The admin HTTP endpoint (/metrics, /status, /healthz) and the per-app metrics registry behind it."""

from __future__ import annotations

import json
import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from meshca.admin.metrics import (
    STATUS_TYPES,
    CertificateSource,
    MeshcaCollector,
    MeshVersionSource,
    ProxySource,
)
from meshca.clock import Clock
from meshca.listen import listen_error
from meshca.xds.status import ProxyStatus

DEFAULT_ADMIN_HOST = "127.0.0.1"


class FleetSource(Protocol):
    """Replicas sharing a store: every replica's proxies, each with a `replica` field (meshca.store.registry)."""

    def fleet(self, local: list[dict[str, Any]]) -> list[dict[str, Any]]: ...


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


class HttpRoutes(Protocol):
    """What an HttpEndpoint serves: the answer to a GET of `path` (status, content type, body)."""

    def get(self, path: str) -> tuple[HTTPStatus, str, bytes]: ...


class _RoutesHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], routes: HttpRoutes, logger: logging.Logger) -> None:
        self.routes = routes
        self.log = logger
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _RoutesHandler)


class _RoutesHandler(BaseHTTPRequestHandler):
    server: _RoutesHTTPServer

    def do_GET(self) -> None:
        try:
            code, content_type, body = self.server.routes.get(urlsplit(self.path).path)
        except Exception:
            self.server.log.exception("admin request %s failed", self.path)
            code, content_type, body = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", b"error\n"
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log.debug("admin %s: " + format, self.address_string(), *args)


class HttpEndpoint:
    """Serves `routes` (GET) over HTTP from a daemon thread: meshca's admin endpoint and the node agent's.

    The routes run on the server's threads: what they read of state that changes elsewhere, they copy."""

    def __init__(self, routes: HttpRoutes, logger: logging.Logger, setting: str, thread_name: str) -> None:
        """`setting`: the setting a bind failure names (ListenError), e.g. `metrics_port`."""
        self._routes = routes
        self._log = logger
        self._setting = setting
        self._thread_name = thread_name
        self._server: _RoutesHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self, host: str, port: int) -> int:
        """Bind and serve; returns the bound port (useful with port 0). ListenError when it cannot bind."""
        if self._server is not None:
            raise RuntimeError(f"{self._thread_name} already started")
        try:
            server = _RoutesHTTPServer((host, port), self._routes, self._log)
        except OSError as error:
            raise listen_error(self._setting, host, port, error) from None
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=self._thread_name, daemon=True
        )
        thread.start()
        self._server, self._thread = server, thread
        self.port = server.server_address[1]
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


class _AdminRoutes:
    def __init__(self, registry: CollectorRegistry, proxies: ProxySource) -> None:
        self.registry = registry
        self.proxies = proxies
        self.fleet: FleetSource | None = None

    def status(self) -> list[dict[str, Any]]:
        local = status_json(self.proxies)
        return local if self.fleet is None else self.fleet.fleet(local)

    def get(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/status":
            body = json.dumps(self.status(), indent=2).encode() + b"\n"
            return HTTPStatus.OK, "application/json", body
        if path == "/healthz":
            return HTTPStatus.OK, "text/plain; charset=utf-8", b"ok\n"
        return HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found: try /metrics, /status, /healthz\n"


class AdminServer:
    """Serves /metrics, /status and /healthz over HTTP from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, proxies: ProxySource, logger: logging.Logger) -> None:
        self._routes = _AdminRoutes(registry, proxies)
        self._log = logger
        self._http = HttpEndpoint(self._routes, logger, "metrics_port", "meshca-admin")

    @property
    def port(self) -> int | None:
        return self._http.port

    def set_fleet(self, fleet: FleetSource | None) -> None:
        self._routes.fleet = fleet

    def status(self) -> list[dict[str, Any]]:
        """What /status answers."""
        return self._routes.status()

    def start(self, host: str = DEFAULT_ADMIN_HOST, port: int = 0) -> int:
        """Bind (loopback unless told otherwise) and serve; returns the bound port (useful with port 0)."""
        bound = self._http.start(host, port)
        self._log.info("admin endpoint (metrics, status) on http://%s:%d", host, bound)
        return bound

    def stop(self) -> None:
        self._http.stop()


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

    def set_fleet(self, fleet: FleetSource | None) -> None:
        """With replicas on a store, /status shows every replica's proxies."""
        self.admin.set_fleet(fleet)

    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

    def status(self) -> list[dict[str, Any]]:
        return self.admin.status()

    @property
    def port(self) -> int | None:
        return self.admin.port

    def start(self, host: str = DEFAULT_ADMIN_HOST, port: int = 0) -> int:
        return self.admin.start(host, port)

    def stop(self) -> None:
        self.admin.stop()
