"""Development JWT issuer: key material on disk and Kubernetes-shaped tokens for local meshes and tests."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jwt

from meshca.ca.crypto import (
    KeyAlgorithm,
    generate_private_key_pem,
    public_jwk,
    public_key_pem,
)
from meshca.files import fsync_directory, write_atomic
from meshca.identity.spiffe import SpiffeId

DEV_ISSUER = "https://meshca.dev.local"
DEV_AUDIENCE = "meshca"
DEV_KEY_ID = "meshca-dev-1"
SIGNING_KEY_FILE = "jwt-signing-key.pem"
PUBLIC_KEY_FILE = "jwt-signing-key.pub.pem"
JWKS_FILE = "jwks.json"
# Namespace for the deterministic fake UIDs placed in the kubernetes.io claim.
_UID_NAMESPACE = uuid.UUID("6f1c2a0e-7d0b-4f55-9c55-6d65736863a1")


@dataclass(frozen=True)
class DevIssuerFiles:
    """Where write_dev_issuer put the dev issuer's signing key, public key and JWKS."""

    signing_key: Path
    public_key: Path
    jwks: Path


def write_dev_issuer(directory: Path, key_id: str = DEV_KEY_ID, *, force: bool = False) -> DevIssuerFiles:
    """Generate an ES256 (P-256) dev signing key and write key (0600), public key and JWKS into `directory`."""
    if not key_id:
        raise ValueError("key_id must be non-empty")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = DevIssuerFiles(
        signing_key=directory / SIGNING_KEY_FILE,
        public_key=directory / PUBLIC_KEY_FILE,
        jwks=directory / JWKS_FILE,
    )
    if not force:
        existing = [str(p) for p in (files.signing_key, files.public_key, files.jwks) if p.exists()]
        if existing:
            raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (use force=True)")

    private_pem = generate_private_key_pem(KeyAlgorithm.EC_P256)
    public_pem = public_key_pem(private_pem)
    jwks = json.dumps({"keys": [public_jwk(public_pem, key_id)]}, indent=2, sort_keys=True).encode() + b"\n"

    write_atomic(files.signing_key, private_pem, 0o600, overwrite=force)
    write_atomic(files.public_key, public_pem, 0o644, overwrite=force)
    write_atomic(files.jwks, jwks, 0o644, overwrite=force)
    fsync_directory(directory)
    return files


def _timestamps(now: datetime, ttl: timedelta) -> dict[str, int]:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    if ttl <= timedelta(0):
        raise ValueError("ttl must be positive")
    iat = int(now.timestamp())
    return {"iat": iat, "nbf": iat, "exp": int((now + ttl).timestamp())}


def _sign(
    claims: dict[str, Any],
    signing_key_pem: bytes,
    key_id: str,
    algorithm: str,
    extra_claims: Mapping[str, Any] | None,
) -> str:
    if extra_claims:
        claims.update(extra_claims)
    return jwt.encode(claims, signing_key_pem, algorithm=algorithm, headers={"kid": key_id, "typ": "JWT"})


def mint_token(
    signing_key_pem: bytes,
    *,
    namespace: str,
    service_account: str,
    issuer: str = DEV_ISSUER,
    audience: str = DEV_AUDIENCE,
    ttl: timedelta = timedelta(hours=1),
    node_id: str | None = None,
    pod_name: str | None = None,
    now: datetime,
    key_id: str = DEV_KEY_ID,
    extra_claims: Mapping[str, Any] | None = None,
    algorithm: str = "ES256",
) -> str:
    """A token shaped like a Kubernetes projected service-account token; extra_claims override generated ones."""
    if "/" in namespace or "/" in service_account:
        raise ValueError("namespace and service account must be single path segments (no '/')")
    # Validates namespace and service account as SPIFFE path segments (the trust domain is irrelevant here).
    SpiffeId.for_service_account("check.invalid", namespace, service_account)
    k8s: dict[str, Any] = {
        "namespace": namespace,
        "serviceaccount": {
            "name": service_account,
            "uid": str(uuid.uuid5(_UID_NAMESPACE, f"sa/{namespace}/{service_account}")),
        },
    }
    if pod_name is not None:
        if not pod_name:
            raise ValueError("pod_name must be non-empty when given")
        k8s["pod"] = {"name": pod_name, "uid": str(uuid.uuid5(_UID_NAMESPACE, f"pod/{namespace}/{pod_name}"))}
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
        "aud": [audience],
        **_timestamps(now, ttl),
        "jti": str(uuid.uuid4()),
        "kubernetes.io": k8s,
    }
    if node_id is not None:
        if not node_id:
            raise ValueError("node_id must be non-empty when given")
        claims["node_id"] = node_id
    return _sign(claims, signing_key_pem, key_id, algorithm, extra_claims)


def mint_spiffe_token(
    signing_key_pem: bytes,
    *,
    spiffe_id: SpiffeId,
    issuer: str = DEV_ISSUER,
    audience: str = DEV_AUDIENCE,
    ttl: timedelta = timedelta(hours=1),
    node_id: str | None = None,
    now: datetime,
    key_id: str = DEV_KEY_ID,
    extra_claims: Mapping[str, Any] | None = None,
    algorithm: str = "ES256",
) -> str:
    """A token whose `sub` is the SPIFFE ID itself (an OIDC/JWT-SVID-style workload token)."""
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": spiffe_id.uri,
        "aud": [audience],
        **_timestamps(now, ttl),
        "jti": str(uuid.uuid4()),
    }
    if node_id is not None:
        if not node_id:
            raise ValueError("node_id must be non-empty when given")
        claims["node_id"] = node_id
    return _sign(claims, signing_key_pem, key_id, algorithm, extra_claims)
