"""Development material in one directory: a dev CA, meshca's server TLS, a JWT issuer, a serve config."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from meshca.ca import CaSettings, CertificateAuthority
from meshca.clock import Clock
from meshca.devtokens import DEV_AUDIENCE, DEV_ISSUER, write_dev_issuer
from meshca.files import write_atomic

SERVE_CONFIG_FILE = "meshca.yaml"
SERVER_NAMES = ("localhost", "meshca.local", "127.0.0.1")


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
) -> DevMaterial:
    """Write everything `meshca serve` needs for local development into `directory`."""
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
    config: dict[str, Any] = {
        "state_dir": "ca",
        "listen": listen,
        "tls": {"certificate_chain": "server.pem", "private_key": "server-key.pem"},
        "issuers": [{"issuer": DEV_ISSUER, "audiences": [DEV_AUDIENCE], "jwks": issuer_files.jwks.name}],
        "leaf_ttl": "1h",
        "log_level": "info",
        **(extra_settings or {}),
    }
    write_atomic(config_path, yaml.safe_dump(config, sort_keys=False).encode(), 0o644)
    return DevMaterial(
        directory, config_path, directory / "root.pem", issuer_files.signing_key, trust_domain, state_dir
    )
