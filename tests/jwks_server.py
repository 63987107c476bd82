"""A local HTTPS server (certificate from a meshca CA) serving a JWKS document that a test can change."""

from __future__ import annotations

import json
import ssl
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from meshca.ca.api import CaSettings
from meshca.ca.crypto import public_jwk, public_key_pem
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock


class JwksServer:
    """Serves `document` at `url` over TLS; `ca_file` verifies it. Records hits and Authorization headers."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority.init(directory / "ca", CaSettings(trust_domain="jwks.test"), system_clock)
        issued = ca.issue_server_certificate(["localhost"], ["127.0.0.1"], timedelta(hours=1))
        assert issued.private_key_pem is not None
        cert, key = directory / "server.pem", directory / "server-key.pem"
        cert.write_bytes(issued.chain_pem)
        key.write_bytes(issued.private_key_pem)
        self.ca_file = directory / "jwks-ca.pem"
        self.ca_file.write_bytes(ca.trust_bundle_pem())
        self.document = b'{"keys": []}'
        self.status = 200
        self.headers: dict[str, str] = {}
        self.delay = 0.0
        self.hits = 0
        self.authorizations: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.hits += 1
                server.authorizations.append(self.headers.get("Authorization"))
                time.sleep(server.delay)
                body = server.document
                self.send_response(server.status)
                for name, value in {"Content-Type": "application/json", **server.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}/openid/v1/jwks"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="jwks-server", daemon=True)
        self._thread.start()

    def set_keys(self, keys: list[tuple[bytes, str]]) -> None:
        """Serve the public halves of these (private key PEM, kid) pairs."""
        self.document = json.dumps({"keys": [public_jwk(public_key_pem(k), kid) for k, kid in keys]}).encode()

    def stop(self) -> None:
        """Down: the port refuses connections from now on."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
