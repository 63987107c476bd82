"""What the demo and the e2e tests share: the demo mesh, its tiny apps, and what Envoys hold and serve."""

from __future__ import annotations

import base64
import json
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509

from meshca.ca import crypto
from meshca.dev.envoy_process import EnvoyProcess, dynamic_active_secrets, free_port

TRUST_DOMAIN = "mesh.local"

# An app: the (status, JSON body) to answer a request with.
Responder = Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, Any]]]


@dataclass(frozen=True)
class Workload:
    name: str
    namespace: str
    service_account: str

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def node_id(self) -> str:
        return f"{self.name}-1"


FRONTEND = Workload("frontend", "shop", "frontend")
BACKEND = Workload("backend", "shop", "backend")
INTRUDER = Workload("intruder", "attic", "intruder")


@dataclass
class Ports:
    meshca: int = field(default_factory=free_port)
    metrics: int = field(default_factory=free_port)
    backend_inbound: int = field(default_factory=free_port)
    backend_app: int = field(default_factory=free_port)
    frontend_app: int = field(default_factory=free_port)
    frontend_outbound: int = field(default_factory=free_port)
    intruder_outbound: int = field(default_factory=free_port)
    admin: dict[str, int] = field(default_factory=lambda: {w.name: free_port() for w in (FRONTEND, BACKEND, INTRUDER)})


def mesh_config(ports: Ports) -> dict[str, Any]:
    """The demo's mesh: backend accepts only frontend; intruder is in the mesh but not allowed."""
    return {
        "trust_domain": TRUST_DOMAIN,
        "services": {
            "backend": {
                "namespace": BACKEND.namespace,
                "service_account": BACKEND.service_account,
                "inbound": {
                    "port": ports.backend_inbound,
                    "app": f"127.0.0.1:{ports.backend_app}",
                    "listen_address": "127.0.0.1",
                },
                "allow": [FRONTEND.spiffe_id],
            },
            "frontend": {
                "namespace": FRONTEND.namespace,
                "service_account": FRONTEND.service_account,
                "outbound": {"port": ports.frontend_outbound},
            },
            "intruder": {
                "namespace": INTRUDER.namespace,
                "service_account": INTRUDER.service_account,
                "outbound": {"port": ports.intruder_outbound},
            },
        },
        "routes": [{"prefix": "/", "to": "backend"}],
    }


def _peer_from_xfcc(header: str) -> str | None:
    """The client's URI SAN from an x-forwarded-client-cert header set by the backend's sidecar."""
    for element in header.split(","):
        for pair in element.split(";"):
            key, _, value = pair.partition("=")
            if key.strip().lower() == "uri":
                return value.strip().strip('"')
    return None


def json_handler(respond: Responder) -> type:
    """A request handler class that answers every GET with `respond`'s status and JSON body."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            status, body = respond(self)
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    return Handler


class _AppServer(ThreadingHTTPServer):
    """The demo apps' HTTP server: a caller that went away (the demo stopping) is not an error to print."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


def serve_app(port: int, respond: Responder) -> ThreadingHTTPServer:
    """Serve `respond` on 127.0.0.1:`port` from a daemon thread; shut the returned server down when done."""
    server = _AppServer(("127.0.0.1", port), json_handler(respond))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def backend_app(name: str) -> Responder:
    """A tiny service that answers with its name and the caller identity its sidecar vouched for."""

    def respond(request: BaseHTTPRequestHandler) -> tuple[int, dict[str, Any]]:
        xfcc = request.headers.get("x-forwarded-client-cert", "")
        return 200, {"service": name, "peer": _peer_from_xfcc(xfcc), "path": request.path}

    return respond


def frontend_app(outbound_port: int) -> Responder:
    def respond(request: BaseHTTPRequestHandler) -> tuple[int, dict[str, Any]]:
        status, body = http_get(f"http://127.0.0.1:{outbound_port}/hello")
        return (200 if status == 200 else 502), {"service": "frontend", "backend_status": status, "backend": body}

    return respond


def http_get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, Any] | str]:
    """(status, JSON body or text); status 0 when the connection itself failed."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        status = error.code
    except (urllib.error.URLError, OSError) as error:
        return 0, str(error)
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@dataclass(frozen=True)
class RequestResult:
    ok: bool
    status: int
    peer: str | None  # the caller identity the backend's sidecar vouched for (XFCC URI)
    served_by: str | None  # which backend service answered

    @property
    def detail(self) -> str:
        return "ok" if self.ok else f"status {self.status}"


@dataclass(frozen=True)
class CertificateView:
    spiffe_id: str | None
    serial: str
    expires: str


def envoy_chain(envoy: EnvoyProcess) -> list[x509.Certificate]:
    """The `default` certificate chain Envoy has accepted (its config_dump; the key is redacted there)."""
    secret = dynamic_active_secrets(envoy.config_dump()).get("default")
    if secret is None:
        return []
    inline = secret.get("tls_certificate", {}).get("certificate_chain", {}).get("inline_bytes", "")
    return x509.load_pem_x509_certificates(base64.b64decode(inline)) if inline else []


def crl_serials(envoy: EnvoyProcess) -> set[int]:
    """Every serial the CRLs of Envoy's ROOTCA secret list (what it checks handshakes against)."""
    secret = dynamic_active_secrets(envoy.config_dump()).get("ROOTCA", {})
    inline = secret.get("validation_context", {}).get("crl", {}).get("inline_bytes", "")
    pem = base64.b64decode(inline) if inline else b""
    return {r.serial_number for block in crypto.split_pem_crls(pem) for r in crypto.parse_crl_pem(block).revoked}


def envoy_certificate(envoy: EnvoyProcess) -> CertificateView | None:
    """The `default` certificate Envoy holds, from its admin /certs."""
    certs = json.loads(envoy.admin_get("/certs"))
    for entry in certs.get("certificates", []):
        for cert in entry.get("cert_chain", []):
            uris = [san["uri"] for san in cert.get("subject_alt_names", []) if "uri" in san]
            if uris:
                return CertificateView(uris[0], cert.get("serial_number", "?"), cert.get("expiration_time", "?"))
    return None


class TrafficLoop:
    """Sends requests through the mesh from a background thread, as fast as they complete, and counts."""

    def __init__(self, request: Callable[[], RequestResult], pause: float = 0.02) -> None:
        self._request = request
        self._pause = pause
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.ok = 0
        self.failures: list[RequestResult] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            result = self._request()
            if result.ok:
                self.ok += 1
            else:
                self.failures.append(result)
            self._stop.wait(self._pause)

    def __enter__(self) -> TrafficLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class ChainWatcher:
    """Samples the `default` chain each Envoy accepted; counts leaf and intermediate changes seen."""

    def __init__(self, envoys: dict[str, EnvoyProcess]) -> None:
        self._envoys = envoys
        self.leaves: dict[str, list[int]] = {name: [] for name in envoys}
        self.intermediates: dict[str, list[bytes]] = {name: [] for name in envoys}

    def sample(self) -> None:
        for name, envoy in self._envoys.items():
            chain = envoy_chain(envoy)
            if not chain:
                continue
            if not self.leaves[name] or self.leaves[name][-1] != chain[0].serial_number:
                self.leaves[name].append(chain[0].serial_number)
            intermediate = chain[1].fingerprint(chain[1].signature_hash_algorithm) if len(chain) > 1 else b""
            if not self.intermediates[name] or self.intermediates[name][-1] != intermediate:
                self.intermediates[name].append(intermediate)

    def leaf_rotations(self) -> dict[str, int]:
        return {name: max(len(serials) - 1, 0) for name, serials in self.leaves.items()}

    def ca_rotations(self) -> int:
        return min((max(len(seen) - 1, 0) for seen in self.intermediates.values()), default=0)
