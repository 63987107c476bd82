"""Test support: a real meshca app (CA, JWT gate, TLS gRPC server) on a loopback port."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc

from meshca.app import MeshcaApp, issue_server_credentials
from meshca.ca.api import CaSettings
from meshca.ca.internal import CertificateAuthority
from meshca.clock import system_clock
from meshca.dev.envoy_process import EnvoyProcess, free_port
from meshca.dev.tokens import (
    DEV_AUDIENCE,
    DEV_ISSUER,
    JWKS_FILE,
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    DevIssuerFiles,
    mint_token,
    write_dev_issuer,
)
from meshca.gcpolicy import CollectorPause
from meshca.identity.jwt import TrustedIssuer
from meshca.mesh.model import MeshConfig
from meshca.node.bootstrap import BootstrapSettings, build_bootstrap
from meshca.xds.server import DEFAULT_MAX_STREAM_AGE

TRUST_DOMAIN = "mesh.test"


@dataclass
class RunningMeshca:
    app: MeshcaApp
    port: int
    root_pem: bytes
    signing_key_pem: bytes
    directory: Path

    def token(self, namespace: str, service_account: str, **claims: object) -> str:
        return mint_token(
            self.signing_key_pem,
            namespace=namespace,
            service_account=service_account,
            now=system_clock(),
            **claims,  # type: ignore[arg-type]
        )

    def channel(self) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(root_certificates=self.root_pem)
        return grpc.aio.secure_channel(f"127.0.0.1:{self.port}", credentials)


def make_ca(directory: Path, trust_domain: str = TRUST_DOMAIN) -> CertificateAuthority:
    return CertificateAuthority.init(directory / "ca", CaSettings(trust_domain=trust_domain), system_clock)


@contextlib.asynccontextmanager
async def running_meshca(
    directory: Path,
    leaf_ttl: timedelta | None = None,
    collector_pause: CollectorPause | None = None,
    *,
    leeway: timedelta = timedelta(seconds=30),
    xds_max_stream_age: timedelta | None = DEFAULT_MAX_STREAM_AGE,
    port: int = 0,
    mesh: MeshConfig | None = None,
    **app_options: object,
) -> AsyncIterator[RunningMeshca]:
    """`app_options`: further MeshcaApp keyword arguments (e.g. identity_grace); `mesh`: applied before serving. A `directory` another
    running_meshca used already gives a second replica: the same CA state and the same JWT issuer. `port`: 0 for any
    free one; the port of an earlier running_meshca brings that meshca back (after an outage)."""
    if (directory / "ca").exists():
        ca = CertificateAuthority.load(directory / "ca", system_clock)
        jwt = directory / "jwt"
        issuer_files = DevIssuerFiles(jwt / SIGNING_KEY_FILE, jwt / PUBLIC_KEY_FILE, jwt / JWKS_FILE)
    else:
        ca = make_ca(directory)
        issuer_files = write_dev_issuer(directory / "jwt")
    issuer = TrustedIssuer(
        issuer=DEV_ISSUER,
        audiences=(DEV_AUDIENCE,),
        trust_domain=TRUST_DOMAIN,
        jwks_path=issuer_files.jwks,
        leeway=leeway,
    )
    app = MeshcaApp(
        ca,
        [issuer],
        system_clock,
        logging.getLogger("meshca.test"),
        leaf_ttl=leaf_ttl,
        collector_pause=collector_pause,
        xds_max_stream_age=xds_max_stream_age,
        **app_options,  # type: ignore[arg-type]
    )
    if mesh is not None:  # applied before serving, as `meshca serve` does
        app.apply_mesh_config(mesh)
    credentials = issue_server_credentials(ca, ["localhost", "127.0.0.1"], timedelta(hours=1))
    port = await app.start("127.0.0.1", port, credentials)
    try:
        yield RunningMeshca(app, port, ca.trust_bundle_pem(), issuer_files.signing_key.read_bytes(), directory)
    finally:
        await app.stop(0)


def frontend_envoy(meshca: RunningMeshca, tmp_path: Path, api_type: str = "GRPC") -> EnvoyProcess:
    """A real Envoy with an ADS bootstrap: TLS to meshca, the frontend's JWT in initial_metadata."""
    (tmp_path / "meshca-root.pem").write_bytes(meshca.root_pem)
    settings = BootstrapSettings(
        node_id="frontend-1",
        cluster="frontend",
        meshca_address="127.0.0.1",
        meshca_port=meshca.port,
        meshca_ca_path=tmp_path / "meshca-root.pem",
        meshca_server_name="localhost",
        token=meshca.token("shop", "frontend", node_id="frontend-1"),
        admin_port=free_port(),
        api_type=api_type,
    )
    return EnvoyProcess(build_bootstrap(settings), workdir=tmp_path / "envoy")
