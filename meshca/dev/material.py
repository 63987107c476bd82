"""Development material in one directory: a dev CA, meshca's server TLS, a JWT issuer, a serve config."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.clock import Clock
from meshca.dev.tokens import DEV_AUDIENCE, DEV_ISSUER, write_dev_issuer
from meshca.files import write_atomic

SERVE_CONFIG_FILE = "meshca.yaml"
SAMPLE_MESH_FILE = "mesh.yaml"
SERVER_NAMES = ("localhost", "meshca.local", "127.0.0.1")
DEV_METRICS_PORT = 15011  # `meshca status`'s default admin port

# The README's walkthrough: frontend's sidecar takes plain HTTP on 15001 and calls backend over mTLS;
# backend's sidecar accepts only frontend's identity on 15006 and forwards to an app on 8080.
_SAMPLE_MESH = """\
# A sample mesh for `meshca serve` (docs/configuration.md): frontend calls backend over mTLS.
trust_domain: {trust_domain}
services:
  backend:
    namespace: shop
    service_account: backend
    inbound:
      port: 15006                # backend's sidecar: mTLS, callers' SPIFFE IDs checked against allow
      app: 127.0.0.1:8080        # ...forwarded to the app, e.g. python3 -m http.server 8080 --bind 127.0.0.1
      listen_address: 127.0.0.1
    allow:
      - spiffe://{trust_domain}/ns/shop/sa/frontend
  frontend:
    namespace: shop
    service_account: frontend
    outbound:
      port: 15001                # frontend's sidecar: plain HTTP on 127.0.0.1:15001 for the frontend app
routes:
  - prefix: /
    to: backend
"""


class DevMaterialExists(FileExistsError):
    """The directory already holds dev material and replacing it was not asked for."""


@dataclass(frozen=True)
class DevMaterial:
    directory: Path
    serve_config: Path
    root_bundle: Path
    signing_key: Path
    trust_domain: str
    state_dir: Path


def create_dev_material(
    directory: Path,
    trust_domain: str,
    clock: Clock,
    *,
    force: bool = False,
    listen: str = "127.0.0.1:15010",
    extra_settings: dict[str, Any] | None = None,
    ca_settings: CaSettings | None = None,
    sample_mesh: bool = False,
    metrics_port: int | None = None,
    self_issued_server_certificate: bool = False,
) -> DevMaterial:
    """Write everything `meshca serve` needs for local development into `directory`.

    `sample_mesh` adds mesh.yaml (two services, frontend -> backend) and the `mesh:` setting; `metrics_port`
    the admin endpoint that `meshca status` reads. `meshca dev init` sets both.
    """
    from meshca.app import issue_server_credentials

    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / SERVE_CONFIG_FILE
    if config_path.exists() and not force:
        raise DevMaterialExists(f"{config_path} exists; dev material is already there (use --force to replace it)")
    state_dir = directory / "ca"
    if force and state_dir.exists():
        shutil.rmtree(state_dir)
    ca = CertificateAuthority.init(state_dir, ca_settings or CaSettings(trust_domain=trust_domain), clock)
    issuer_files = write_dev_issuer(directory, force=force)
    server = issue_server_credentials(ca, SERVER_NAMES, timedelta(days=30))
    write_atomic(directory / "server.pem", server.certificate_chain_pem, 0o644)
    write_atomic(directory / "server-key.pem", server.private_key_pem, 0o600)
    write_atomic(directory / "root.pem", ca.trust_bundle_pem(), 0o644)
    if sample_mesh:
        mesh_text = _SAMPLE_MESH.format(trust_domain=trust_domain)
        write_atomic(directory / SAMPLE_MESH_FILE, mesh_text.encode(), 0o644)
    config: dict[str, Any] = {
        "state_dir": "ca",
        "listen": listen,
        **(
            {"server_names": list(SERVER_NAMES)}
            if self_issued_server_certificate  # issued and renewed by serve from the CA it serves
            else {"tls": {"certificate_chain": "server.pem", "private_key": "server-key.pem"}}
        ),
        "issuers": [{"issuer": DEV_ISSUER, "audiences": [DEV_AUDIENCE], "jwks": issuer_files.jwks.name}],
        "leaf_ttl": "1h",
        **({"mesh": SAMPLE_MESH_FILE} if sample_mesh else {}),
        **({"metrics_port": metrics_port} if metrics_port is not None else {}),
        "log_level": "info",
        **(extra_settings or {}),
    }
    write_atomic(config_path, yaml.safe_dump(config, sort_keys=False).encode(), 0o644)
    return DevMaterial(
        directory, config_path, directory / "root.pem", issuer_files.signing_key, trust_domain, state_dir
    )
