"""Dev issuer files and minted tokens, checked through the real TokenVerifier."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jwt
import pytest

from meshca.ca.crypto import public_key_pem
from meshca.dev.tokens import (
    DEV_AUDIENCE,
    DEV_ISSUER,
    DevIssuerFiles,
    mint_spiffe_token,
    mint_token,
    write_dev_issuer,
)
from meshca.identity.jwt import (
    AuthenticationError,
    TokenVerifier,
    TrustedIssuer,
    check_node_binding,
)
from meshca.identity.spiffe import SpiffeId

NOW = datetime(2026, 11, 3, 12, 0, 0, tzinfo=timezone.utc)
TD = "dev.local"


def fixed_clock(now: datetime = NOW) -> Callable[[], datetime]:
    return lambda: now


@pytest.fixture
def files(tmp_path: Path) -> DevIssuerFiles:
    return write_dev_issuer(tmp_path / "issuer")


def jwks_verifier(files: DevIssuerFiles, now: datetime = NOW) -> TokenVerifier:
    issuer = TrustedIssuer(issuer=DEV_ISSUER, audiences=(DEV_AUDIENCE,), trust_domain=TD, jwks_path=files.jwks)
    return TokenVerifier([issuer], fixed_clock(now))


def test_files_and_modes(files: DevIssuerFiles, tmp_path: Path) -> None:
    directory = tmp_path / "issuer"
    assert files == DevIssuerFiles(
        signing_key=directory / "jwt-signing-key.pem",
        public_key=directory / "jwt-signing-key.pub.pem",
        jwks=directory / "jwks.json",
    )
    assert stat.S_IMODE(files.signing_key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in files.signing_key.read_bytes()
    assert files.public_key.read_bytes() == public_key_pem(files.signing_key.read_bytes())
    doc = json.loads(files.jwks.read_text())
    assert [(k["kid"], k["kty"], k["crv"], k["alg"]) for k in doc["keys"]] == [("meshca-dev-1", "EC", "P-256", "ES256")]
    assert "d" not in doc["keys"][0]
    assert sorted(p.name for p in directory.iterdir()) == ["jwks.json", "jwt-signing-key.pem", "jwt-signing-key.pub.pem"]


def test_refuses_to_overwrite_unless_forced(files: DevIssuerFiles) -> None:
    before = files.signing_key.read_bytes()
    with pytest.raises(FileExistsError, match="jwt-signing-key.pem"):
        write_dev_issuer(files.signing_key.parent)
    assert files.signing_key.read_bytes() == before
    forced = write_dev_issuer(files.signing_key.parent, force=True)
    assert forced.signing_key.read_bytes() != before
    assert stat.S_IMODE(forced.signing_key.stat().st_mode) == 0o600
    assert not [p for p in files.signing_key.parent.iterdir() if p.name.endswith(".tmp")]


def test_refuses_when_only_the_jwks_exists(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text("{}")
    with pytest.raises(FileExistsError, match="jwks.json"):
        write_dev_issuer(tmp_path)
    assert not (tmp_path / "jwt-signing-key.pem").exists()


def test_minted_token_verifies_through_jwks(files: DevIssuerFiles) -> None:
    token = mint_token(
        files.signing_key.read_bytes(), namespace="shop", service_account="web", pod_name="web-0", now=NOW
    )
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["kid"]) == ("ES256", "meshca-dev-1")
    ident = jwks_verifier(files).verify(token)
    assert ident.spiffe_id == SpiffeId(TD, "/ns/shop/sa/web")
    assert ident.subject == "system:serviceaccount:shop:web"
    assert ident.pod_name == "web-0" and ident.node_id is None
    assert ident.expires_at == NOW + timedelta(hours=1)
    check_node_binding(ident, "web-0.shop", {})


def test_minted_token_with_node_id_binds_the_node(files: DevIssuerFiles) -> None:
    token = mint_token(
        files.signing_key.read_bytes(), namespace="shop", service_account="web", node_id="edge-1", now=NOW
    )
    ident = jwks_verifier(files).verify(token)
    assert ident.node_id == "edge-1"
    check_node_binding(ident, "edge-1", {})


def test_minted_token_expires_after_ttl(files: DevIssuerFiles) -> None:
    token = mint_token(
        files.signing_key.read_bytes(), namespace="shop", service_account="web", ttl=timedelta(minutes=5), now=NOW
    )
    assert jwks_verifier(files, NOW + timedelta(minutes=4)).verify(token)
    with pytest.raises(AuthenticationError, match="expired"):
        jwks_verifier(files, NOW + timedelta(minutes=6)).verify(token)


def test_token_from_another_dev_issuer_is_refused(files: DevIssuerFiles, tmp_path: Path) -> None:
    other = write_dev_issuer(tmp_path / "other")
    token = mint_token(other.signing_key.read_bytes(), namespace="shop", service_account="web", now=NOW)
    with pytest.raises(AuthenticationError, match="bad signature"):
        jwks_verifier(files).verify(token)


def test_mint_spiffe_token(files: DevIssuerFiles) -> None:
    sid = SpiffeId(TD, "/billing/worker")
    token = mint_spiffe_token(files.signing_key.read_bytes(), spiffe_id=sid, now=NOW)
    assert jwks_verifier(files).verify(token).spiffe_id == sid


def test_extra_claims_are_included(files: DevIssuerFiles) -> None:
    token = mint_token(
        files.signing_key.read_bytes(), namespace="shop", service_account="web", now=NOW, extra_claims={"team": "x"}
    )
    assert jwt.decode(token, options={"verify_signature": False})["team"] == "x"


def test_mint_rejects_bad_inputs(files: DevIssuerFiles) -> None:
    key = files.signing_key.read_bytes()
    with pytest.raises(ValueError, match="aware"):
        mint_token(key, namespace="shop", service_account="web", now=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="ttl"):
        mint_token(key, namespace="shop", service_account="web", now=NOW, ttl=timedelta(0))
    with pytest.raises(ValueError, match="segment"):
        mint_token(key, namespace="shop/evil", service_account="web", now=NOW)
    with pytest.raises(ValueError, match="segment"):
        mint_token(key, namespace="shop", service_account="web sa", now=NOW)
    with pytest.raises(ValueError, match="segment"):
        mint_token(key, namespace="..", service_account="web", now=NOW)
