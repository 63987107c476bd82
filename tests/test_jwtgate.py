"""Behaviour of the identity gate: JWT verification matrix, header parsing, node binding."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jwt
import pytest
from fakes import FakeClock
from jwks_server import JwksServer

from meshca.ca.crypto import (
    KeyAlgorithm,
    generate_private_key_pem,
    public_jwk,
    public_key_pem,
)
from meshca.dev.tokens import mint_spiffe_token, mint_token
from meshca.identity.jwt import (
    JWKS_REFETCH_MIN,
    AuthenticationError,
    IdentityGate,
    KeySourceError,
    NodeBindingError,
    TokenVerifier,
    TrustedIssuer,
    VerifiedIdentity,
    check_node_binding,
)
from meshca.identity.spiffe import SpiffeId

ISS = "https://kubernetes.default.svc.cluster.local"
AUD = "meshca"
TD = "cluster.local"
NOW = datetime(2026, 11, 3, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def key() -> bytes:
    return generate_private_key_pem(KeyAlgorithm.EC_P256)


@pytest.fixture(scope="module")
def other_key() -> bytes:
    return generate_private_key_pem(KeyAlgorithm.EC_P256)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


def issuer_for(*public_pems: bytes, **kw: Any) -> TrustedIssuer:
    return TrustedIssuer(issuer=ISS, audiences=(AUD,), trust_domain=TD, public_keys_pem=tuple(public_pems), **kw)


@pytest.fixture
def verifier(key: bytes, clock: FakeClock) -> TokenVerifier:
    return TokenVerifier([issuer_for(public_key_pem(key))], clock)


def k8s_claims(ns: str = "shop", sa: str = "web", pod: str | None = "web-7d9f", **over: Any) -> dict[str, Any]:
    ts = int(NOW.timestamp())
    k8s: dict[str, Any] = {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u-1"}}
    if pod is not None:
        k8s["pod"] = {"name": pod, "uid": "p-1"}
    claims: dict[str, Any] = {
        "iss": ISS,
        "aud": [AUD],
        "sub": f"system:serviceaccount:{ns}:{sa}",
        "iat": ts,
        "nbf": ts,
        "exp": ts + 3600,
        "kubernetes.io": k8s,
    }
    claims.update(over)
    return claims


def sign(private_pem: bytes, claims: dict[str, Any], *, alg: str = "ES256", headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(claims, private_pem, algorithm=alg, headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def reason(fn: Callable[[], object]) -> str:
    with pytest.raises(AuthenticationError) as info:
        fn()
    return str(info.value)


# -- valid tokens ----------------------------------------------------------------------------


def test_valid_kubernetes_token_maps_to_service_account_id(key: bytes, verifier: TokenVerifier) -> None:
    ident = verifier.verify(sign(key, k8s_claims(node_id="web-7d9f.shop")))
    assert ident == VerifiedIdentity(
        spiffe_id=SpiffeId(TD, "/ns/shop/sa/web"),
        issuer=ISS,
        subject="system:serviceaccount:shop:web",
        node_id="web-7d9f.shop",
        pod_name="web-7d9f",
        expires_at=NOW + timedelta(hours=1),
    )


def test_legacy_sub_only_token(key: bytes, verifier: TokenVerifier) -> None:
    claims = k8s_claims()
    del claims["kubernetes.io"]
    ident = verifier.verify(sign(key, claims))
    assert ident.spiffe_id == SpiffeId(TD, "/ns/shop/sa/web")
    assert ident.pod_name is None and ident.node_id is None


def test_sub_disagreeing_with_kubernetes_claim_is_refused(key: bytes, verifier: TokenVerifier) -> None:
    msg = reason(lambda: verifier.verify(sign(key, k8s_claims(sub="system:serviceaccount:kube-system:admin"))))
    assert "kube-system/admin" in msg and "shop/web" in msg


@pytest.mark.parametrize(
    "sub",
    [
        "spiffe://evil.example/ns/shop/sa/web",  # another trust domain
        f"spiffe://{TD}/ns/kube-system/sa/admin",  # another namespace and service account
        f"spiffe://{TD}/ns/shop/sa/admin",  # another service account
        f"spiffe://{TD}/billing/worker",  # not a service-account ID at all
        "spiffe://",  # not a valid SPIFFE ID
    ],
)
def test_spiffe_sub_disagreeing_with_kubernetes_claim_is_refused(key: bytes, verifier: TokenVerifier, sub: str) -> None:
    token = sign(key, k8s_claims(sub=sub))
    msg = reason(lambda: verifier.verify(token))
    assert "identity claims disagree" in msg and "'sub'" in msg and "'kubernetes.io'" in msg
    assert f"spiffe://{TD}/ns/shop/sa/web" in msg
    assert all(part not in msg for part in token.split("."))


def test_claims_that_agree_are_accepted(key: bytes, verifier: TokenVerifier) -> None:
    spiffe_sub = verifier.verify(sign(key, k8s_claims(sub=f"spiffe://{TD}/ns/shop/sa/web")))
    legacy_sub = verifier.verify(sign(key, k8s_claims()))
    assert spiffe_sub.spiffe_id == legacy_sub.spiffe_id == SpiffeId(TD, "/ns/shop/sa/web")


def test_dev_tokens_meshca_mints_are_accepted(key: bytes, verifier: TokenVerifier) -> None:
    pod = mint_token(key, namespace="shop", service_account="web", pod_name="web-1", issuer=ISS, audience=AUD, now=NOW)
    assert verifier.verify(pod).spiffe_id == SpiffeId(TD, "/ns/shop/sa/web")
    spiffe = mint_spiffe_token(key, spiffe_id=SpiffeId(TD, "/billing/worker"), issuer=ISS, audience=AUD, now=NOW)
    assert verifier.verify(spiffe).spiffe_id == SpiffeId(TD, "/billing/worker")


def test_spiffe_subject_token(key: bytes, verifier: TokenVerifier) -> None:
    claims = k8s_claims(sub=f"spiffe://{TD}/billing/worker")
    del claims["kubernetes.io"]
    ident = verifier.verify(sign(key, claims))
    assert ident.spiffe_id == SpiffeId(TD, "/billing/worker")
    assert ident.subject == f"spiffe://{TD}/billing/worker"


def test_spiffe_subject_in_foreign_trust_domain_is_refused(key: bytes, verifier: TokenVerifier) -> None:
    claims = k8s_claims(sub="spiffe://evil.example/ns/shop/sa/web")
    del claims["kubernetes.io"]
    msg = reason(lambda: verifier.verify(sign(key, claims)))
    assert "evil.example" in msg and TD in msg


def test_spiffe_subject_refused_when_issuer_disallows_it(key: bytes, clock: FakeClock) -> None:
    v = TokenVerifier([issuer_for(public_key_pem(key), allow_spiffe_subject=False)], clock)
    claims = k8s_claims(sub=f"spiffe://{TD}/billing/worker")
    del claims["kubernetes.io"]
    assert "SPIFFE" in reason(lambda: v.verify(sign(key, claims)))


def test_namespace_with_slash_cannot_forge_a_path(key: bytes, verifier: TokenVerifier) -> None:
    claims = k8s_claims(ns="shop/sa/admin", sa="web", sub="system:serviceaccount:shop/sa/admin:web")
    assert "'/'" in reason(lambda: verifier.verify(sign(key, claims)))


def test_token_without_workload_identity_is_refused(key: bytes, verifier: TokenVerifier) -> None:
    claims = k8s_claims(sub="alice@example.com")
    del claims["kubernetes.io"]
    assert "no workload identity" in reason(lambda: verifier.verify(sign(key, claims)))


def test_rsa_pss_token_verifies_with_rsa_key(clock: FakeClock) -> None:
    rsa = generate_private_key_pem(KeyAlgorithm.RSA_2048)
    v = TokenVerifier([issuer_for(public_key_pem(rsa))], clock)
    for alg in ("RS256", "PS256"):
        assert v.verify(sign(rsa, k8s_claims(), alg=alg)).spiffe_id == SpiffeId(TD, "/ns/shop/sa/web")
    assert "not allowed" in reason(lambda: v.verify(sign(rsa, k8s_claims(), alg="RS512")))


# -- time, from the injected clock -----------------------------------------------------------


def test_expired_token_is_refused(key: bytes, verifier: TokenVerifier, clock: FakeClock) -> None:
    token = sign(key, k8s_claims())
    clock.now = NOW + timedelta(hours=1, seconds=31)
    assert "expired" in reason(lambda: verifier.verify(token))


def test_expired_within_leeway_is_accepted(key: bytes, verifier: TokenVerifier, clock: FakeClock) -> None:
    token = sign(key, k8s_claims())
    clock.now = NOW + timedelta(hours=1, seconds=29)
    assert verifier.verify(token).spiffe_id == SpiffeId(TD, "/ns/shop/sa/web")


def test_clock_not_wall_time_decides_validity(key: bytes) -> None:
    past = datetime(2020, 1, 1, tzinfo=timezone.utc)
    ts = int(past.timestamp())
    token = sign(key, k8s_claims(iat=ts, nbf=ts, exp=ts + 3600))
    # Expired by wall time, valid by the injected clock.
    assert TokenVerifier([issuer_for(public_key_pem(key))], FakeClock(past)).verify(token).issuer == ISS
    # Valid by wall time, expired by the injected clock.
    wall = int(datetime.now(timezone.utc).timestamp())
    fresh = sign(key, k8s_claims(iat=wall, nbf=wall, exp=wall + 86400))
    late = TokenVerifier([issuer_for(public_key_pem(key))], FakeClock(datetime.now(timezone.utc) + timedelta(days=2)))
    assert "expired" in reason(lambda: late.verify(fresh))


def test_not_yet_valid_token_is_refused(key: bytes, verifier: TokenVerifier) -> None:
    ts = int(NOW.timestamp())
    token = sign(key, k8s_claims(nbf=ts + 120, iat=ts, exp=ts + 3600))
    assert "not yet valid" in reason(lambda: verifier.verify(token))


def test_missing_exp_is_refused(key: bytes, verifier: TokenVerifier) -> None:
    claims = k8s_claims()
    del claims["exp"]
    assert "exp" in reason(lambda: verifier.verify(sign(key, claims)))


# -- issuer, audience, signature, algorithm ---------------------------------------------------


def test_unknown_issuer_is_named(key: bytes, verifier: TokenVerifier) -> None:
    msg = reason(lambda: verifier.verify(sign(key, k8s_claims(iss="https://evil.example"))))
    assert "https://evil.example" in msg and "issuer" in msg


def test_wrong_audience_is_refused(key: bytes, verifier: TokenVerifier) -> None:
    assert "audience" in reason(lambda: verifier.verify(sign(key, k8s_claims(aud=["vault"]))))


def test_one_matching_audience_among_many_is_enough(key: bytes, verifier: TokenVerifier) -> None:
    assert verifier.verify(sign(key, k8s_claims(aud=["vault", AUD]))).issuer == ISS


def test_signature_by_another_key_is_refused(other_key: bytes, verifier: TokenVerifier) -> None:
    assert "bad signature" in reason(lambda: verifier.verify(sign(other_key, k8s_claims())))


def test_tampered_payload_is_refused(key: bytes, verifier: TokenVerifier) -> None:
    header, _, sig = sign(key, k8s_claims()).split(".")
    forged = b64url(json.dumps(k8s_claims(ns="kube-system", sa="admin")).encode())
    assert "bad signature" in reason(lambda: verifier.verify(f"{header}.{forged}.{sig}"))


def test_alg_none_is_refused(verifier: TokenVerifier) -> None:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(k8s_claims()).encode())
    msg = reason(lambda: verifier.verify(f"{header}.{payload}."))
    assert "algorithm not allowed" in msg and "none" in msg


def test_hs256_signed_with_public_key_pem_is_refused(key: bytes, verifier: TokenVerifier) -> None:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(k8s_claims()).encode())
    mac = hmac.new(public_key_pem(key), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    msg = reason(lambda: verifier.verify(f"{header}.{payload}.{b64url(mac)}"))
    assert "algorithm not allowed" in msg and "HS256" in msg


@pytest.mark.parametrize("header_name", ["jwk", "jku", "x5u"])
def test_token_supplying_its_own_key_is_refused(other_key: bytes, verifier: TokenVerifier, header_name: str) -> None:
    attacker_jwk = public_jwk(public_key_pem(other_key), "attacker")
    value: Any = attacker_jwk if header_name == "jwk" else "https://evil.example/keys"
    token = sign(other_key, k8s_claims(), headers={header_name: value})
    msg = reason(lambda: verifier.verify(token))
    assert header_name in msg and "own verification key" in msg


def test_key_supplying_header_refused_even_when_signature_is_good(key: bytes, verifier: TokenVerifier) -> None:
    token = sign(key, k8s_claims(), headers={"jku": "https://evil.example/keys"})
    assert "jku" in reason(lambda: verifier.verify(token))


@pytest.mark.parametrize(
    "token",
    ["", "   ", "garbage", "a.b.c", "eyJhbGciOiJFUzI1NiJ9.eyJ.", "x" * 20000, "....", "eyJ9.e30.AA"],
)
def test_garbage_is_malformed(verifier: TokenVerifier, token: str) -> None:
    assert "malformed" in reason(lambda: verifier.verify(token))


def test_error_message_never_contains_the_token(key: bytes, other_key: bytes, verifier: TokenVerifier) -> None:
    tokens = [
        sign(other_key, k8s_claims()),
        sign(key, k8s_claims(aud=["vault"])),
        sign(key, k8s_claims(iss="https://evil.example")),
        sign(key, k8s_claims(exp=0)),
        "garbage-that-looks-like-a-secret-value",
    ]
    for token in tokens:
        msg = reason(lambda: verifier.verify(token))
        assert token not in msg
        for segment in token.split("."):
            assert len(segment) < 8 or segment not in msg


# -- issuer configuration ---------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["HS256", "HS512", "none"])
def test_symmetric_or_unsigned_algorithm_cannot_be_configured(key: bytes, alg: str) -> None:
    with pytest.raises(ValueError, match=alg):
        issuer_for(public_key_pem(key), algorithms=(alg,))


def test_issuer_needs_keys_and_audience(key: bytes) -> None:
    with pytest.raises(ValueError, match="public_keys_pem"):
        TrustedIssuer(issuer=ISS, audiences=(AUD,), trust_domain=TD)
    with pytest.raises(ValueError, match="audiences"):
        TrustedIssuer(issuer=ISS, audiences=(), trust_domain=TD, public_keys_pem=(public_key_pem(key),))
    with pytest.raises(ValueError, match="private key"):
        TrustedIssuer(issuer=ISS, audiences=(AUD,), trust_domain=TD, public_keys_pem=(key,))


# -- JWKS files -------------------------------------------------------------------------------


def write_jwks(path: Path, keys: list[tuple[bytes, str]]) -> None:
    doc = {"keys": [public_jwk(public_key_pem(private), kid) for private, kid in keys]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def test_jwks_with_two_keys_selects_by_kid(tmp_path: Path, key: bytes, other_key: bytes, clock: FakeClock) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, [(key, "a"), (other_key, "b")])
    v = TokenVerifier([TrustedIssuer(issuer=ISS, audiences=(AUD,), trust_domain=TD, jwks_path=jwks)], clock)
    assert v.verify(sign(key, k8s_claims(sa="a"), headers={"kid": "a"})).spiffe_id.path == "/ns/shop/sa/a"
    assert v.verify(sign(other_key, k8s_claims(sa="b"), headers={"kid": "b"})).spiffe_id.path == "/ns/shop/sa/b"
    # The kid picks the key: a token signed by key "a" but labelled "b" fails.
    assert "bad signature" in reason(lambda: v.verify(sign(key, k8s_claims(), headers={"kid": "b"})))
    assert "'c'" in reason(lambda: v.verify(sign(key, k8s_claims(), headers={"kid": "c"})))


def test_replaced_jwks_file_is_picked_up(tmp_path: Path, key: bytes, other_key: bytes, clock: FakeClock) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, [(key, "k1")])
    v = TokenVerifier([TrustedIssuer(issuer=ISS, audiences=(AUD,), trust_domain=TD, jwks_path=jwks)], clock)
    old = sign(key, k8s_claims(), headers={"kid": "k1"})
    new = sign(other_key, k8s_claims(), headers={"kid": "k2"})
    assert v.verify(old).issuer == ISS
    reason(lambda: v.verify(new))

    write_jwks(jwks, [(other_key, "k2")])
    assert v.verify(new).issuer == ISS
    assert "k1" in reason(lambda: v.verify(old))


def test_broken_jwks_rewrite_keeps_last_good_keys(tmp_path: Path, key: bytes, clock: FakeClock) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, [(key, "k1")])
    v = TokenVerifier([TrustedIssuer(issuer=ISS, audiences=(AUD,), trust_domain=TD, jwks_path=jwks)], clock)
    token = sign(key, k8s_claims(), headers={"kid": "k1"})
    jwks.write_text('{"keys": [')
    assert v.verify(token).issuer == ISS


@pytest.mark.parametrize(
    "content, cause",
    [
        (None, "No such file or directory"),
        ("directory", "Is a directory"),  # unreadable (a mode-0 file is readable by root, a directory never)
        ('{"keys": 5}', "not a JWKS document"),
        ("keys: [a]", "not JSON"),
        ('{"keys": []}', "no key usable"),
    ],
)
def test_unusable_jwks_file_at_start_is_fatal(tmp_path: Path, clock: FakeClock, content: str | None, cause: str) -> None:
    jwks = tmp_path / "jwks.json"
    if content == "directory":
        jwks.mkdir()
    elif content is not None:
        jwks.write_text(content)
    issuer = TrustedIssuer(issuer=ISS, audiences=(AUD,), trust_domain=TD, jwks_path=jwks)
    with pytest.raises(KeySourceError) as error:
        TokenVerifier([issuer], clock)
    assert error.value.source == "jwks_path" and error.value.issuer == ISS
    assert str(jwks) in error.value.reason and cause in error.value.reason
    assert "\n" not in str(error.value)


def test_jwks_file_removed_while_serving_keeps_last_good_keys(tmp_path: Path, key: bytes, clock: FakeClock) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, [(key, "k1")])
    v = TokenVerifier([TrustedIssuer(issuer=ISS, audiences=(AUD,), trust_domain=TD, jwks_path=jwks)], clock)
    jwks.unlink()
    assert v.verify(sign(key, k8s_claims(), headers={"kid": "k1"})).issuer == ISS
    jwks.write_text('{"keys": 5}')
    assert v.verify(sign(key, k8s_claims(sa="api"), headers={"kid": "k1"})).issuer == ISS


def test_symmetric_jwk_in_jwks_is_never_used(tmp_path: Path, key: bytes, clock: FakeClock) -> None:
    jwks = tmp_path / "jwks.json"
    secret = b"0123456789abcdef0123456789abcdef"
    oct_key = {"kty": "oct", "kid": "s", "k": b64url(secret)}
    jwks.write_text(json.dumps({"keys": [oct_key, public_jwk(public_key_pem(key), "a")]}))
    v = TokenVerifier(
        [TrustedIssuer(issuer=ISS, audiences=(AUD,), trust_domain=TD, jwks_path=jwks, algorithms=("ES256",))], clock
    )
    token = jwt.encode(k8s_claims(), secret, algorithm="HS256", headers={"kid": "s"})
    assert "HS256" in reason(lambda: v.verify(token))


# -- IdentityGate: the authorization header -----------------------------------------------------


@pytest.fixture
def gate(verifier: TokenVerifier) -> IdentityGate:
    return IdentityGate(verifier)


def test_gate_accepts_bearer_token_case_insensitively(key: bytes, gate: IdentityGate) -> None:
    token = sign(key, k8s_claims())
    assert gate.authenticate([("authorization", f"Bearer {token}")]).spiffe_id.path == "/ns/shop/sa/web"
    assert gate.authenticate([("Authorization", f"bearer  {token} ".encode())]).issuer == ISS
    assert gate.authenticate([("x-other", "1"), ("AUTHORIZATION", f"BEARER {token}")]).issuer == ISS


def test_gate_missing_header(gate: IdentityGate) -> None:
    assert "missing" in reason(lambda: gate.authenticate([("x-envoy", "1")]))


def test_gate_empty_bearer(gate: IdentityGate) -> None:
    assert "empty" in reason(lambda: gate.authenticate([("authorization", "Bearer ")]))
    assert "empty" in reason(lambda: gate.authenticate([("authorization", "Bearer")]))


def test_gate_duplicated_header(key: bytes, gate: IdentityGate) -> None:
    token = sign(key, k8s_claims())
    msg = reason(lambda: gate.authenticate([("authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]))
    assert "duplicated" in msg


def test_gate_wrong_scheme_does_not_echo_the_credential(key: bytes, gate: IdentityGate) -> None:
    token = sign(key, k8s_claims())
    for value in (token, f"Basic {token}", f"Token {token}"):
        msg = reason(lambda: gate.authenticate([("authorization", value)]))
        assert "Bearer" in msg and token not in msg


def test_gate_garbage_token(gate: IdentityGate) -> None:
    assert "malformed" in reason(lambda: gate.authenticate([("authorization", "Bearer not-a-jwt")]))


@pytest.mark.parametrize("gap", [" ", "\t", "\u00a0", "\u2003"])
def test_gate_token_with_inner_whitespace_is_refused(key: bytes, gate: IdentityGate, gap: str) -> None:
    token = sign(key, k8s_claims())
    msg = reason(lambda: gate.authenticate([("authorization", f"Bearer {token[:20]}{gap}{token[20:]}")]))
    assert "whitespace" in msg and token[20:] not in msg


# -- node binding ---------------------------------------------------------------------------


def identity(*, node_id: str | None = None, pod: str | None = None, spiffe: str = f"spiffe://{TD}/ns/shop/sa/web") -> VerifiedIdentity:
    return VerifiedIdentity(
        spiffe_id=SpiffeId.parse(spiffe),
        issuer=ISS,
        subject="system:serviceaccount:shop:web",
        node_id=node_id,
        pod_name=pod,
        expires_at=NOW + timedelta(hours=1),
    )


def binding_error(ident: VerifiedIdentity, node_id: str, meta: dict[str, object] | None = None) -> str:
    with pytest.raises(NodeBindingError) as info:
        check_node_binding(ident, node_id, meta or {})
    return str(info.value)


def test_rule_a_node_id_claim_must_match_exactly() -> None:
    ident = identity(node_id="gw-1", pod="web-7d9f")
    check_node_binding(ident, "gw-1", {})
    msg = binding_error(ident, "web-7d9f.shop")
    assert "'web-7d9f.shop'" in msg and "'gw-1'" in msg and "node_id" in msg
    assert "gw-1" in binding_error(ident, "GW-1")


def test_rule_b_pod_bound_token_requires_pod_dot_namespace() -> None:
    ident = identity(pod="web-7d9f")
    check_node_binding(ident, "web-7d9f.shop", {})
    msg = binding_error(ident, "db-0.shop")
    assert "'db-0.shop'" in msg and "'web-7d9f.shop'" in msg


def test_rule_c_unbound_token_allows_any_non_empty_node_id() -> None:
    ident = identity()
    check_node_binding(ident, "whatever-I-like", {})
    assert "empty" in binding_error(ident, "")


def test_node_id_claim_cannot_be_empty_node() -> None:
    assert "empty" in binding_error(identity(node_id="gw-1"), "")


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({"SPIFFE_ID": f"spiffe://{TD}/ns/kube-system/sa/admin"}, "SPIFFE_ID"),
        ({"NAMESPACE": "kube-system"}, "NAMESPACE"),
        ({"SERVICE_ACCOUNT": "admin"}, "SERVICE_ACCOUNT"),
        ({"NAMESPACE": "shop", "SERVICE_ACCOUNT": 7}, "SERVICE_ACCOUNT"),
    ],
)
def test_metadata_mismatch_is_refused(meta: dict[str, object], field: str) -> None:
    msg = binding_error(identity(), "n1", meta)
    assert field in msg and str(list(meta.values())[-1]) in msg


def test_matching_metadata_is_accepted() -> None:
    check_node_binding(
        identity(pod="web-7d9f"),
        "web-7d9f.shop",
        {"SPIFFE_ID": f"spiffe://{TD}/ns/shop/sa/web", "NAMESPACE": "shop", "SERVICE_ACCOUNT": "web", "OTHER": 1},
    )


def test_namespace_metadata_refused_for_non_kubernetes_identity() -> None:
    msg = binding_error(identity(spiffe=f"spiffe://{TD}/billing/worker"), "n1", {"NAMESPACE": "billing"})
    assert "NAMESPACE" in msg and "billing" in msg


def test_end_to_end_token_then_binding(key: bytes, gate: IdentityGate) -> None:
    ident = gate.authenticate([("authorization", f"Bearer {sign(key, k8s_claims())}")])
    check_node_binding(ident, "web-7d9f.shop", {"NAMESPACE": "shop"})
    with pytest.raises(NodeBindingError):
        check_node_binding(ident, "other-pod.shop", {})


# -- cache of verified tokens -------------------------------------------------------------------


def count_full_verifications(monkeypatch: pytest.MonkeyPatch, v: TokenVerifier) -> list[int]:
    """Wrap the verifier's signature check; the returned list's length is the number of full verifications."""
    calls: list[int] = []
    original = v._decode

    def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(v, "_decode", counting)
    return calls


def test_repeated_token_is_verified_once(key: bytes, verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_full_verifications(monkeypatch, verifier)
    token = sign(key, k8s_claims())
    first = verifier.verify(token)
    assert verifier.verify(token) == first
    assert IdentityGate(verifier).authenticate([("authorization", f"Bearer {token}")]) == first
    assert len(calls) == 1 and verifier.cached_tokens == 1


def test_cached_token_is_refused_once_the_clock_reaches_exp(key: bytes, clock: FakeClock) -> None:
    v = TokenVerifier([issuer_for(public_key_pem(key), leeway=timedelta(0))], clock)
    token = sign(key, k8s_claims())
    assert v.verify(token).issuer == ISS
    clock.now = NOW + timedelta(hours=1, seconds=-1)
    assert v.verify(token).issuer == ISS
    clock.now = NOW + timedelta(hours=1)
    assert "expired" in reason(lambda: v.verify(token))
    assert v.cached_tokens == 0


def test_cached_token_gets_the_leeway_of_a_full_verification_and_no_more(
    key: bytes, verifier: TokenVerifier, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_full_verifications(monkeypatch, verifier)
    token = sign(key, k8s_claims())
    verifier.verify(token)
    clock.now = NOW + timedelta(hours=1, seconds=29)
    assert verifier.verify(token).issuer == ISS  # within leeway: accepted, but re-verified, not served from cache
    assert len(calls) == 2
    clock.now = NOW + timedelta(hours=1, seconds=31)
    assert "expired" in reason(lambda: verifier.verify(token))


def test_cached_token_is_refused_when_the_clock_goes_back_before_nbf(
    key: bytes, verifier: TokenVerifier, clock: FakeClock
) -> None:
    token = sign(key, k8s_claims())
    verifier.verify(token)
    clock.now = NOW - timedelta(minutes=5)
    assert "not yet valid" in reason(lambda: verifier.verify(token))


def test_jwks_change_drops_every_cached_token(tmp_path: Path, key: bytes, other_key: bytes, clock: FakeClock) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, [(key, "k1")])
    v = TokenVerifier([TrustedIssuer(issuer=ISS, audiences=(AUD,), trust_domain=TD, jwks_path=jwks)], clock)
    old = sign(key, k8s_claims(), headers={"kid": "k1"})
    assert v.verify(old).issuer == ISS
    assert v.cached_tokens == 1

    write_jwks(jwks, [(other_key, "k2")])
    new = sign(other_key, k8s_claims(sa="api"), headers={"kid": "k2"})
    assert v.verify(new).spiffe_id.path == "/ns/shop/sa/api"  # this verification sees the new file
    assert v.cached_tokens == 0  # dropped; the token verified while the keys changed is not cached either
    assert "k1" in reason(lambda: v.verify(old))
    v.verify(new)
    assert v.cached_tokens == 1


def test_jwks_change_is_seen_by_a_cache_hit(tmp_path: Path, key: bytes, other_key: bytes, clock: FakeClock) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, [(key, "k1")])
    v = TokenVerifier([TrustedIssuer(issuer=ISS, audiences=(AUD,), trust_domain=TD, jwks_path=jwks)], clock)
    token = sign(key, k8s_claims(), headers={"kid": "k1"})
    v.verify(token)
    write_jwks(jwks, [(other_key, "k1")])  # same kid, another key
    assert "bad signature" in reason(lambda: v.verify(token))
    assert v.cached_tokens == 0


def test_failed_verification_is_not_cached(key: bytes, other_key: bytes, verifier: TokenVerifier, clock: FakeClock) -> None:
    forged = sign(other_key, k8s_claims())
    assert "bad signature" in reason(lambda: verifier.verify(forged))
    assert "bad signature" in reason(lambda: verifier.verify(forged))
    assert verifier.cached_tokens == 0

    ts = int(NOW.timestamp())
    early = sign(key, k8s_claims(nbf=ts + 120))
    assert "not yet valid" in reason(lambda: verifier.verify(early))
    clock.now = NOW + timedelta(minutes=3)
    assert verifier.verify(early).issuer == ISS  # the earlier refusal was not remembered


def test_other_token_with_a_cached_identity_is_verified_on_its_own(
    key: bytes, other_key: bytes, verifier: TokenVerifier
) -> None:
    claims = k8s_claims()
    good = sign(key, claims)
    assert verifier.verify(good).spiffe_id.path == "/ns/shop/sa/web"
    header, payload, _ = good.split(".")
    _, _, foreign_sig = sign(other_key, claims).split(".")
    assert "bad signature" in reason(lambda: verifier.verify(sign(other_key, claims)))
    assert "bad signature" in reason(lambda: verifier.verify(f"{header}.{payload}.{foreign_sig}"))
    assert verifier.cached_tokens == 1
    # Another spelling of the same signature (padded) is another token: verified and cached on its own.
    assert verifier.verify(f"{good}==") == verifier.verify(good)
    assert verifier.cached_tokens == 2


def test_cache_is_bounded_and_evicts_the_oldest(key: bytes, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    v = TokenVerifier([issuer_for(public_key_pem(key))], clock, cache_size=2)
    calls = count_full_verifications(monkeypatch, v)
    tokens = [sign(key, k8s_claims(sa=f"sa{i}")) for i in range(3)]
    for token in tokens:
        v.verify(token)
    assert v.cached_tokens == 2 and len(calls) == 3
    v.verify(tokens[2])
    v.verify(tokens[1])
    assert len(calls) == 3  # the two newest are cached
    v.verify(tokens[0])
    assert len(calls) == 4 and v.cached_tokens == 2  # the oldest was evicted, and re-verified


def test_cache_size_zero_disables_the_cache(key: bytes, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    v = TokenVerifier([issuer_for(public_key_pem(key))], clock, cache_size=0)
    calls = count_full_verifications(monkeypatch, v)
    token = sign(key, k8s_claims())
    v.verify(token)
    v.verify(token)
    assert len(calls) == 2 and v.cached_tokens == 0
    with pytest.raises(ValueError, match="cache_size"):
        TokenVerifier([issuer_for(public_key_pem(key))], clock, cache_size=-1)


# -- JWKS fetched from a jwks_uri ------------------------------------------------------------------


@pytest.fixture
def jwks_server(tmp_path: Path) -> Iterator[JwksServer]:
    server = JwksServer(tmp_path / "jwks-server")
    yield server
    server.stop()


def remote_issuer(server: JwksServer, **kw: Any) -> TrustedIssuer:
    return TrustedIssuer(
        issuer=ISS, audiences=(AUD,), trust_domain=TD, jwks_uri=server.url, jwks_ca_path=server.ca_file, **kw
    )


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.02)


def verifies(v: TokenVerifier, token: str) -> bool:
    try:
        v.verify(token)
    except AuthenticationError:
        return False
    return True


def test_jwks_uri_keys_verify_and_rotation_at_the_server_is_picked_up(
    jwks_server: JwksServer, key: bytes, other_key: bytes, clock: FakeClock
) -> None:
    jwks_server.set_keys([(key, "k1")])
    v = TokenVerifier([remote_issuer(jwks_server)], clock, poll_interval=0.02)
    try:
        old = sign(key, k8s_claims(), headers={"kid": "k1"})
        assert v.verify(old).spiffe_id == SpiffeId(TD, "/ns/shop/sa/web")
        # The server rotates: k2 is added. A token signed with k2 is refused until the refresher
        # fetches; its unknown kid asks for that fetch (no more than once per JWKS_REFETCH_MIN).
        jwks_server.set_keys([(key, "k1"), (other_key, "k2")])
        new = sign(other_key, k8s_claims(sa="api"), headers={"kid": "k2"})
        clock.now += JWKS_REFETCH_MIN
        assert "'k2'" in reason(lambda: v.verify(new))
        eventually(lambda: verifies(v, new))
        hits = jwks_server.hits
        assert "'k3'" in reason(lambda: v.verify(sign(other_key, k8s_claims(), headers={"kid": "k3"})))
        time.sleep(0.2)
        assert jwks_server.hits == hits  # just fetched: an unknown kid does not fetch again so soon
        # k1 is retired at the server: the periodic refresh (jwks_refresh, 5 min) drops it.
        jwks_server.set_keys([(other_key, "k2")])
        clock.now += timedelta(minutes=5)
        eventually(lambda: not verifies(v, old))
        assert "'k1'" in reason(lambda: v.verify(old))
        assert v.verify(new).issuer == ISS
    finally:
        v.close()


def test_jwks_uri_down_or_broken_keeps_the_last_good_keys(
    jwks_server: JwksServer, key: bytes, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    jwks_server.set_keys([(key, "k1")])
    v = TokenVerifier([remote_issuer(jwks_server)], clock, refresh_in_background=False)
    good = jwks_server.document
    for n, (status, document) in enumerate([(200, b'{"keys": 5}'), (200, b"<html>"), (503, good), (None, good)]):
        if status is None:
            jwks_server.stop()
        jwks_server.status, jwks_server.document = status or 200, document
        clock.now += timedelta(minutes=5)
        v.refresh_remote_keys()
        # a token not seen before: verified with the keys kept, not served from the cache
        assert v.verify(sign(key, k8s_claims(sa=f"sa{n}"), headers={"kid": "k1"})).issuer == ISS
    warnings = [r.getMessage() for r in caplog.records if "keeping the previous keys" in r.getMessage()]
    assert len(warnings) == 4
    assert "not a JWKS document" in warnings[0] and "not JSON" in warnings[1]
    assert "HTTP 503" in warnings[2] and "Connection refused" in warnings[3]
    assert all(jwks_server.url in w for w in warnings)


def test_verification_never_waits_for_a_jwks_fetch(jwks_server: JwksServer, key: bytes, clock: FakeClock) -> None:
    jwks_server.set_keys([(key, "k1")])
    v = TokenVerifier([remote_issuer(jwks_server)], clock, poll_interval=0.02)
    try:
        jwks_server.delay = 1.0  # every fetch from now on takes a second
        clock.now += JWKS_REFETCH_MIN
        started = time.monotonic()
        assert "'k9'" in reason(lambda: v.verify(sign(key, k8s_claims(), headers={"kid": "k9"})))
        eventually(lambda: jwks_server.hits == 2)  # the refresher's fetch is under way
        assert v.verify(sign(key, k8s_claims(sa="api"), headers={"kid": "k1"})).issuer == ISS
        assert time.monotonic() - started < 0.5
    finally:
        jwks_server.delay = 0.0
        v.close()


@pytest.mark.parametrize(
    "fault, cause",
    [
        ("down", "Connection refused"),
        ("untrusted", "certificate verify failed"),
        ("404", "HTTP 404"),
        ("redirect", "HTTP 302"),
        ("not-json", "not JSON"),
        ("no-keys", "no key usable"),
    ],
)
def test_jwks_uri_first_fetch_failure_is_fatal(
    jwks_server: JwksServer, key: bytes, clock: FakeClock, fault: str, cause: str
) -> None:
    jwks_server.set_keys([(key, "k1")])
    issuer = remote_issuer(jwks_server)
    if fault == "down":
        jwks_server.stop()
    elif fault == "untrusted":
        issuer = TrustedIssuer(issuer=ISS, audiences=(AUD,), trust_domain=TD, jwks_uri=jwks_server.url)
    elif fault == "404":
        jwks_server.status = 404
    elif fault == "redirect":
        jwks_server.status, jwks_server.headers = 302, {"Location": "http://127.0.0.1:1/jwks"}
    elif fault == "not-json":
        jwks_server.document = b"keys"
    else:
        jwks_server.document = b'{"keys": []}'
    with pytest.raises(KeySourceError) as error:
        TokenVerifier([issuer], clock)
    assert error.value.source == "jwks_uri"
    assert jwks_server.url in error.value.reason and cause in error.value.reason
    assert "\n" not in str(error.value)


def test_jwks_uri_fetch_sends_the_bearer_token_file_and_never_shows_it(
    jwks_server: JwksServer, key: bytes, tmp_path: Path, clock: FakeClock
) -> None:
    token_file = tmp_path / "sa-token"
    token_file.write_text("sa-token-secret-value\n")
    jwks_server.set_keys([(key, "k1")])
    v = TokenVerifier([remote_issuer(jwks_server, jwks_token_path=token_file)], clock, refresh_in_background=False)
    assert jwks_server.authorizations == ["Bearer sa-token-secret-value"]
    assert v.verify(sign(key, k8s_claims(), headers={"kid": "k1"})).issuer == ISS
    jwks_server.status = 401
    with pytest.raises(KeySourceError) as error:
        TokenVerifier([remote_issuer(jwks_server, jwks_token_path=token_file)], clock)
    assert "HTTP 401" in str(error.value) and "sa-token-secret-value" not in str(error.value)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"jwks_uri": "http://issuer.test/jwks"}, "not an https:// URL"),
        ({"jwks_uri": "https:///jwks"}, "not an https:// URL"),
        ({"jwks_uri": "https://issuer.test/jwks", "jwks_path": Path("jwks.json")}, "not both"),
        ({"jwks_ca_path": Path("ca.pem"), "public_keys_pem": (b"x",)}, "need a jwks_uri"),
        ({"jwks_uri": "https://issuer.test/jwks", "jwks_refresh": timedelta(0)}, "jwks_refresh"),
    ],
)
def test_jwks_uri_settings_are_checked(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrustedIssuer(issuer=ISS, audiences=(AUD,), trust_domain=TD, **kw)
