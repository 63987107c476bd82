"""The identity gate: verify a stream's bearer JWT, map it to a SPIFFE ID, and bind it to the xDS node."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jwt
import jwt.algorithms

from meshca.clock import Clock
from meshca.identity.spiffe import InvalidSpiffeId, SpiffeId

# Asymmetric JWS algorithms pyjwt implements; nothing else may ever be configured.
ASYMMETRIC_ALGORITHMS: frozenset[str] = frozenset(
    {"ES256", "ES256K", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)
# Header parameters by which a token tries to hand us its own verification key.
_KEY_SUPPLYING_HEADERS: tuple[str, ...] = ("jwk", "jku", "x5u", "x5c")
_REQUIRED_CLAIMS: tuple[str, ...] = ("exp", "iss", "aud", "sub")
MAX_TOKEN_BYTES = 16 * 1024
DEFAULT_CACHE_SIZE = 10_000
_LEGACY_SA_PREFIX = "system:serviceaccount:"
MAX_JWKS_BYTES = 1024 * 1024
JWKS_FETCH_TIMEOUT = 10.0  # seconds for one HTTPS fetch of a jwks_uri
# An unknown kid asks for an early fetch, and a failed fetch is retried, at most this often.
JWKS_REFETCH_MIN = timedelta(seconds=30)
_K8S_CLAIM = "kubernetes.io"


class AuthenticationError(Exception):
    """The caller is not authenticated (gRPC UNAUTHENTICATED); str(e) is the reason, never the token."""


class NodeBindingError(Exception):
    """The xDS node claims something its token does not allow (gRPC PERMISSION_DENIED)."""


class KeySourceError(ValueError):
    """An issuer's key source is unusable at start; `source` names the TrustedIssuer field (e.g. jwks_path)."""

    def __init__(self, issuer: str, source: str, reason: str) -> None:
        self.issuer = issuer
        self.source = source
        self.reason = reason
        super().__init__(f"issuer {issuer!r}: {reason}")


@dataclass(frozen=True)
class TrustedIssuer:
    """One JWT issuer meshca trusts, its keys, and the trust domain its identities live in."""

    issuer: str
    audiences: tuple[str, ...]
    trust_domain: str
    public_keys_pem: tuple[bytes, ...] = ()
    jwks_path: Path | None = None
    algorithms: tuple[str, ...] = ("ES256", "ES384", "RS256", "PS256", "EdDSA")
    leeway: timedelta = timedelta(seconds=30)
    allow_spiffe_subject: bool = True
    jwks_uri: str | None = None  # an https:// URL serving the issuer's JWKS (e.g. Kubernetes' /openid/v1/jwks)
    jwks_ca_path: Path | None = None  # CA bundle that verifies jwks_uri's server; None: the system trust store
    jwks_token_path: Path | None = None  # a bearer token file sent with each fetch (re-read every time)
    jwks_refresh: timedelta = timedelta(minutes=5)

    def __post_init__(self) -> None:
        # Accept lists from config loaders, store tuples so the value stays immutable.
        for name in ("audiences", "public_keys_pem", "algorithms"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for name in ("jwks_path", "jwks_ca_path", "jwks_token_path"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, Path(getattr(self, name)))
        if not isinstance(self.issuer, str) or not self.issuer:
            raise ValueError("issuer must be a non-empty string")
        if isinstance(self.audiences, str) or not self.audiences:
            raise ValueError(f"issuer {self.issuer!r}: audiences must be a non-empty tuple of strings")
        if any(not isinstance(a, str) or not a for a in self.audiences):
            raise ValueError(f"issuer {self.issuer!r}: every audience must be a non-empty string")
        try:
            SpiffeId(self.trust_domain)
        except InvalidSpiffeId as e:
            raise ValueError(f"issuer {self.issuer!r}: {e}") from None
        if isinstance(self.algorithms, str) or not self.algorithms:
            raise ValueError(f"issuer {self.issuer!r}: algorithms must be a non-empty tuple")
        for alg in self.algorithms:
            if alg not in ASYMMETRIC_ALGORITHMS:
                text = str(alg)
                unsafe = text.lower() == "none" or text.upper().startswith("HS")
                kind = "symmetric or unsigned" if unsafe else "unknown"
                raise ValueError(
                    f"issuer {self.issuer!r}: algorithm {alg!r} is {kind} and not accepted; "
                    f"use one of {sorted(ASYMMETRIC_ALGORITHMS)}"
                )
        if not self.public_keys_pem and self.jwks_path is None and self.jwks_uri is None:
            raise ValueError(f"issuer {self.issuer!r}: configure public_keys_pem, jwks_path or jwks_uri")
        if self.jwks_uri is not None:
            if self.jwks_path is not None:
                raise ValueError(f"issuer {self.issuer!r}: configure jwks_path or jwks_uri, not both")
            url = urllib.parse.urlsplit(self.jwks_uri) if isinstance(self.jwks_uri, str) else None
            if url is None or url.scheme != "https" or not url.hostname or url.username or url.fragment:
                raise ValueError(f"issuer {self.issuer!r}: jwks_uri {_quote(self.jwks_uri)} is not an https:// URL")
            if self.jwks_refresh <= timedelta(0):
                raise ValueError(f"issuer {self.issuer!r}: jwks_refresh must be positive")
        elif self.jwks_ca_path is not None or self.jwks_token_path is not None:
            raise ValueError(f"issuer {self.issuer!r}: jwks_ca_path and jwks_token_path need a jwks_uri")
        for i, pem in enumerate(self.public_keys_pem):
            if not isinstance(pem, bytes):
                raise ValueError(f"issuer {self.issuer!r}: public_keys_pem[{i}] must be PEM bytes")
            if b"PRIVATE KEY" in pem:
                raise ValueError(f"issuer {self.issuer!r}: public_keys_pem[{i}] is a private key; give the public key")
        if self.leeway < timedelta(0) or self.leeway > timedelta(minutes=5):
            raise ValueError(f"issuer {self.issuer!r}: leeway must be between 0 and 5 minutes")


@dataclass(frozen=True)
class VerifiedIdentity:
    """What a verified token proves: the workload's SPIFFE ID and the token facts that bind it to a node."""

    spiffe_id: SpiffeId
    issuer: str
    subject: str
    node_id: str | None
    pod_name: str | None
    expires_at: datetime


@dataclass(frozen=True)
class _Key:
    kid: str | None
    algorithm: str
    key: Any  # a pyjwt-prepared public key object


@dataclass(frozen=True)
class _JwksState:
    signature: tuple[int, int, int] | None  # (st_ino, st_mtime_ns, st_size) of the file these keys came from
    keys: tuple[_Key, ...]
    error: str | None = None
    failed_signature: tuple[int, int, int] | None = None  # a broken file is not re-parsed until it changes


@dataclass(frozen=True)
class _CachedIdentity:
    identity: VerifiedIdentity
    valid_from: float  # max(nbf, iat), no leeway: the cache never accepts what a full verify would refuse
    valid_until: float  # exp, no leeway
    generation: int  # TokenVerifier._key_generation when the token was verified


@dataclass
class _IssuerKeys:
    issuer: TrustedIssuer
    static: tuple[_Key, ...]
    jwks: _JwksState = field(default_factory=lambda: _JwksState(None, ()))
    lock: threading.Lock = field(default_factory=threading.Lock)
    # jwks_uri only (clock timestamps): when the next periodic fetch is due, when the last one started,
    # whether a token's unknown kid asked for an early one, and the sha256 of the document now in use.
    next_fetch: float = -math.inf
    last_attempt: float = -math.inf
    kid_wanted: bool = False
    document_digest: bytes | None = None


def _algorithm_objects() -> dict[str, Any]:
    return {name: alg for name, alg in jwt.algorithms.get_default_algorithms().items() if name in ASYMMETRIC_ALGORITHMS}


def _prepare_static_keys(issuer: TrustedIssuer, algs: Mapping[str, Any]) -> tuple[_Key, ...]:
    keys: list[_Key] = []
    for i, pem in enumerate(issuer.public_keys_pem):
        usable = []
        for name in issuer.algorithms:
            try:
                usable.append(_Key(None, name, algs[name].prepare_key(pem)))
            except (jwt.InvalidKeyError, ValueError, TypeError):
                continue
        if not usable:
            raise ValueError(
                f"issuer {issuer.issuer!r}: public_keys_pem[{i}] is not a public key usable with {list(issuer.algorithms)}"
            )
        keys.extend(usable)
    return tuple(keys)


def _parse_jwks(issuer: TrustedIssuer, data: bytes, logger: logging.Logger) -> tuple[_Key, ...]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS document (expected an object with a 'keys' list)")
    keys: list[_Key] = []
    for index, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            logger.warning("issuer %s: JWKS key #%d is not an object; skipped", issuer.issuer, index)
            continue
        kid = jwk.get("kid")
        kid = kid if isinstance(kid, str) else None
        if jwk.get("use", "sig") != "sig" or jwk.get("kty") == "oct" or "d" in jwk:
            logger.warning("issuer %s: JWKS key %r is not an asymmetric public signing key; skipped", issuer.issuer, kid)
            continue
        declared = jwk.get("alg")
        candidates = [declared] if declared is not None else list(issuer.algorithms)
        found = False
        for name in candidates:
            if name not in issuer.algorithms:
                continue
            try:
                pyjwk = jwt.PyJWK(jwk, algorithm=name)
                prepared = pyjwk.Algorithm.prepare_key(pyjwk.key)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                continue
            keys.append(_Key(kid, name, prepared))
            found = True
        if not found:
            logger.warning(
                "issuer %s: JWKS key %r is not usable with %s; skipped", issuer.issuer, kid, list(issuer.algorithms)
            )
    if not keys:
        raise ValueError("the JWKS holds no key usable with the allowed algorithms")
    return tuple(keys)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A JWKS is fetched from exactly the configured URL: a redirect is an error, never followed."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def fetch_jwks(issuer: TrustedIssuer, timeout: float = JWKS_FETCH_TIMEOUT) -> bytes:
    """GET the issuer's jwks_uri over verified HTTPS (blocking: never call it on the event loop).

    ValueError says why not, in one line; the bearer token is never part of it.
    """
    assert issuer.jwks_uri is not None
    try:
        cafile = str(issuer.jwks_ca_path) if issuer.jwks_ca_path is not None else None
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"jwks_ca {issuer.jwks_ca_path} unusable: {e.strerror or e}") from None
    headers = {"Accept": "application/json", "User-Agent": "meshca"}
    if issuer.jwks_token_path is not None:
        try:
            token = issuer.jwks_token_path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            cause = e.strerror if isinstance(e, OSError) else "not text"
            raise ValueError(f"jwks_token {issuer.jwks_token_path} unreadable: {cause}") from None
        headers["Authorization"] = f"Bearer {token}"
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirects())
    try:
        with opener.open(urllib.request.Request(issuer.jwks_uri, headers=headers), timeout=timeout) as response:
            data: bytes = response.read(MAX_JWKS_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise ValueError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            text = f"TLS certificate verify failed: {reason.verify_message or reason.reason}"
        elif isinstance(reason, OSError) and reason.strerror:
            text = reason.strerror
        else:
            text = str(reason)
        raise ValueError(f"cannot fetch: {text}") from None
    except (TimeoutError, OSError) as e:
        raise ValueError(f"cannot fetch: {e.strerror or 'timed out'}") from None
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
    return data


def _quote(value: object, limit: int = 120) -> str:
    """A bounded repr of an attacker-controlled value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _numeric_date(payload: Mapping[str, Any], claim: str) -> float | None:
    if claim not in payload:
        return None
    value = payload[claim]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AuthenticationError(f"malformed token: claim {claim!r} is not a NumericDate")
    return float(value)


class TokenVerifier:
    """Verifies JWTs from a fixed set of trusted issuers against an injected clock."""

    def __init__(
        self,
        issuers: Sequence[TrustedIssuer],
        clock: Clock,
        *,
        logger: logging.Logger | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        refresh_in_background: bool = True,
        poll_interval: float = 1.0,
    ) -> None:
        """Issuers with a jwks_uri are fetched now (a failure raises KeySourceError) and then, with
        `refresh_in_background`, by a daemon thread that looks every `poll_interval` s whether a fetch is
        due (see refresh_remote_keys); verification only ever reads the keys it fetched. close() stops it."""
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self._clock = clock
        self._log = logger if logger is not None else logging.getLogger(__name__)
        self._algs = _algorithm_objects()
        # Verified tokens by sha256 of the exact token string (the digest, not the bearer credential, is kept).
        self._cache: dict[bytes, _CachedIdentity] = {}
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._key_generation = 0
        self._issuers: dict[str, _IssuerKeys] = {}
        for issuer in issuers:
            if issuer.issuer in self._issuers:
                raise ValueError(f"issuer {issuer.issuer!r} is configured twice")
            entry = _IssuerKeys(issuer, _prepare_static_keys(issuer, self._algs))
            self._issuers[issuer.issuer] = entry
            if issuer.jwks_path is not None:
                # At start there are no last good keys to fall back on: a broken file is fatal, not a warning.
                error = self._refresh_jwks(entry).error
                if error is not None:
                    raise KeySourceError(issuer.issuer, "jwks_path", error)
            if issuer.jwks_uri is not None:
                error = self._fetch_remote(entry)
                if error is not None:
                    raise KeySourceError(issuer.issuer, "jwks_uri", error)
        self._remote = [entry for entry in self._issuers.values() if entry.issuer.jwks_uri is not None]
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._refresher: threading.Thread | None = None
        if self._remote and refresh_in_background:
            self._refresher = threading.Thread(
                target=self._refresh_loop, args=(poll_interval,), name="meshca-jwks", daemon=True
            )
            self._refresher.start()

    def close(self) -> None:
        """Stop the background JWKS refresh (if any); verification keeps the keys it has."""
        self._closed.set()
        self._wake.set()
        if self._refresher is not None and self._refresher is not threading.current_thread():
            self._refresher.join(timeout=JWKS_FETCH_TIMEOUT + 1)

    # -- keys fetched from a jwks_uri ------------------------------------------------------------

    def _refresh_loop(self, poll_interval: float) -> None:
        while not self._closed.is_set():
            try:
                self.refresh_remote_keys()
            except Exception:  # the refresher must outlive any surprise; the keys stay as they were
                self._log.exception("JWKS refresh failed unexpectedly")
            self._wake.wait(poll_interval)
            self._wake.clear()

    def refresh_remote_keys(self) -> None:
        """Fetch every jwks_uri that is due: every jwks_refresh, after a failure every JWKS_REFETCH_MIN,
        or early when a token named an unknown kid (at most once per JWKS_REFETCH_MIN). Blocking."""
        for entry in self._remote:
            now = self._clock().timestamp()
            early = entry.kid_wanted and now - entry.last_attempt >= JWKS_REFETCH_MIN.total_seconds()
            if now >= entry.next_fetch or early:
                self._fetch_remote(entry)

    def _fetch_remote(self, entry: _IssuerKeys) -> str | None:
        """Fetch and parse one jwks_uri; keep the last good keys on failure and return the reason."""
        issuer = entry.issuer
        now = self._clock().timestamp()
        entry.last_attempt = now
        entry.kid_wanted = False
        try:
            data = fetch_jwks(issuer)
            keys = _parse_jwks(issuer, data, self._log)
        except ValueError as e:
            reason = f"JWKS {issuer.jwks_uri} unusable: {e}"
            entry.next_fetch = now + min(issuer.jwks_refresh, JWKS_REFETCH_MIN).total_seconds()
            with entry.lock:
                if entry.jwks.keys and entry.jwks.error != reason:
                    self._log.warning("issuer %s: %s; keeping the previous keys", issuer.issuer, reason)
                entry.jwks = _JwksState(None, entry.jwks.keys, reason)
            return reason
        entry.next_fetch = now + issuer.jwks_refresh.total_seconds()
        digest = hashlib.sha256(data).digest()
        with entry.lock:
            recovered = entry.jwks.error is not None and entry.jwks.keys
            entry.jwks = _JwksState(None, keys)
            if digest == entry.document_digest:
                if recovered:
                    self._log.info("issuer %s: JWKS %s fetched again", issuer.issuer, issuer.jwks_uri)
                return None
            first = entry.document_digest is None
            entry.document_digest = digest
        if first:
            self._log.info("issuer %s: JWKS %s fetched (%d keys)", issuer.issuer, issuer.jwks_uri, len(keys))
        else:
            self._log.info("issuer %s: JWKS %s changed (%d keys)", issuer.issuer, issuer.jwks_uri, len(keys))
            self._drop_cache()  # after the new keys are in place: see _remember
        return None

    def _want_remote_keys(self, entry: _IssuerKeys) -> None:
        """A token named a kid we do not have: the keys may have rotated, so ask the refresher to fetch."""
        if not entry.kid_wanted:
            entry.kid_wanted = True
            self._wake.set()

    # -- keys ---------------------------------------------------------------------------------

    def _refresh_jwks(self, entry: _IssuerKeys) -> _JwksState:
        path = entry.issuer.jwks_path
        assert path is not None
        try:
            st = os.stat(path)
        except OSError as e:
            return self._jwks_failed(entry, f"JWKS {path} unreadable: {e.strerror}")
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        current = entry.jwks
        if signature in (current.signature, current.failed_signature):
            return current
        with entry.lock:
            if signature in (entry.jwks.signature, entry.jwks.failed_signature):
                return entry.jwks
            try:
                keys = _parse_jwks(entry.issuer, path.read_bytes(), self._log)
            except (OSError, ValueError) as e:
                # Keep the last good keys; the failed file is retried on the next verification.
                reason = f"JWKS {path} unreadable: {e.strerror}" if isinstance(e, OSError) else f"JWKS {path} unusable: {e}"
                if entry.jwks.keys and entry.jwks.error != reason:
                    self._log.warning("issuer %s: %s; keeping the previous keys", entry.issuer.issuer, reason)
                entry.jwks = _JwksState(entry.jwks.signature, entry.jwks.keys, reason, signature)
                return entry.jwks
            if current.signature is not None:
                self._log.info("issuer %s: reloaded JWKS %s (%d keys)", entry.issuer.issuer, path, len(keys))
            entry.jwks = _JwksState(signature, keys)
            self._drop_cache()
            return entry.jwks

    def _jwks_failed(self, entry: _IssuerKeys, reason: str) -> _JwksState:
        with entry.lock:
            if entry.jwks.error != reason and entry.jwks.keys:
                self._log.warning("issuer %s: %s; keeping the previous keys", entry.issuer.issuer, reason)
            entry.jwks = _JwksState(entry.jwks.signature, entry.jwks.keys, reason)
            return entry.jwks

    def _candidate_keys(self, entry: _IssuerKeys, alg: str, kid: str | None) -> list[_Key]:
        jwks_keys: tuple[_Key, ...] = ()
        jwks_error: str | None = None
        if entry.issuer.jwks_path is not None:
            state = self._refresh_jwks(entry)
            jwks_keys, jwks_error = state.keys, state.error
        elif entry.issuer.jwks_uri is not None:
            state = entry.jwks  # never fetched here: verification runs on the event loop
            jwks_keys, jwks_error = state.keys, state.error
        static = [k for k in entry.static if k.algorithm == alg]
        if kid is not None:
            by_kid = [k for k in jwks_keys if k.kid == kid and k.algorithm == alg]
            if not by_kid and entry.issuer.jwks_uri is not None and not any(k.kid == kid for k in jwks_keys):
                self._want_remote_keys(entry)
            keys = by_kid or static
        else:
            keys = static + [k for k in jwks_keys if k.algorithm == alg]
        if not keys:
            what = f"key id {_quote(kid)} with algorithm {alg}" if kid is not None else f"key for algorithm {alg}"
            suffix = f" ({jwks_error})" if jwks_error and not jwks_keys else ""
            raise AuthenticationError(f"issuer {_quote(entry.issuer.issuer)} has no {what}{suffix}")
        return keys

    # -- cache of verified tokens --------------------------------------------------------------

    @property
    def cached_tokens(self) -> int:
        """How many verified tokens the cache holds now."""
        return len(self._cache)

    def _drop_cache(self) -> None:
        """Forget every verified token: called when any issuer's key set changes."""
        with self._cache_lock:
            self._key_generation += 1
            self._cache.clear()

    def _cached(self, digest: bytes) -> VerifiedIdentity | None:
        cached = self._cache.get(digest)
        if cached is None:
            return None
        entry = self._issuers[cached.identity.issuer]
        if entry.issuer.jwks_path is not None:
            self._refresh_jwks(entry)  # a changed JWKS file drops the cache, as a full verify would see new keys
        if cached.generation == self._key_generation:
            now = self._clock().timestamp()
            if cached.valid_from <= now < cached.valid_until:
                return cached.identity
        with self._cache_lock:
            if self._cache.get(digest) is cached:
                del self._cache[digest]
        return None

    def _remember(self, digest: bytes, cached: _CachedIdentity) -> None:
        if self._cache_size == 0:
            return
        now = self._clock().timestamp()
        if not cached.valid_from <= now < cached.valid_until:
            return
        with self._cache_lock:
            # Keys changed while this token was being verified: its result may rest on the old keys.
            if cached.generation != self._key_generation:
                return
            self._cache.pop(digest, None)
            while len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[digest] = cached

    # -- verification -------------------------------------------------------------------------

    def verify(self, token: str) -> VerifiedIdentity:
        """Verify signature, issuer, audience and validity window; map the claims to a SPIFFE ID."""
        if not isinstance(token, str) or not token.strip():
            raise AuthenticationError("malformed token: empty")
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthenticationError(f"malformed token: larger than {MAX_TOKEN_BYTES} bytes")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        identity = self._cached(digest)
        if identity is not None:
            return identity
        generation = self._key_generation  # read before any key is looked up
        try:
            identity, valid_from, valid_until = self._verify(token)
        except AuthenticationError as e:
            raise AuthenticationError(_redact(str(e), token)) from None
        self._remember(digest, _CachedIdentity(identity, valid_from, valid_until, generation))
        return identity

    def _verify(self, token: str) -> tuple[VerifiedIdentity, float, float]:
        header, unverified = _unverified_header_and_claims(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise AuthenticationError("malformed token: header has no 'alg'")
        for name in _KEY_SUPPLYING_HEADERS:
            if name in header:
                raise AuthenticationError(
                    f"token header {name!r} tries to supply its own verification key; not accepted"
                )
        iss = unverified.get("iss")
        if not isinstance(iss, str) or not iss:
            raise AuthenticationError("malformed token: no 'iss' claim")
        entry = self._issuers.get(iss)
        if entry is None:
            raise AuthenticationError(f"wrong issuer: {_quote(iss)} is not a trusted issuer")
        issuer = entry.issuer
        if alg not in issuer.algorithms:
            raise AuthenticationError(
                f"algorithm not allowed: {_quote(alg)} is not accepted for issuer {_quote(iss)} "
                f"(allowed: {', '.join(issuer.algorithms)})"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationError("malformed token: 'kid' is not a string")

        payload = self._decode(token, header, entry, self._candidate_keys(entry, alg, kid))
        exp, valid_from = self._check_validity_window(payload, issuer)
        return self._identity(payload, issuer), valid_from, exp

    def _decode(
        self, token: str, header: Mapping[str, Any], entry: _IssuerKeys, keys: Sequence[_Key]
    ) -> dict[str, Any]:
        issuer = entry.issuer
        for key in keys:
            try:
                decoded = jwt.decode_complete(
                    token,
                    key.key,
                    algorithms=list(issuer.algorithms),
                    audience=list(issuer.audiences),
                    issuer=issuer.issuer,
                    leeway=issuer.leeway,
                    options={
                        "require": list(_REQUIRED_CLAIMS),
                        # Time is checked against the injected clock in _check_validity_window.
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                    },
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidAudienceError:
                raise AuthenticationError(
                    f"wrong audience: token is not for any of {list(issuer.audiences)}"
                ) from None
            except jwt.InvalidIssuerError:
                raise AuthenticationError(f"wrong issuer: expected {_quote(issuer.issuer)}") from None
            except jwt.MissingRequiredClaimError as e:
                raise AuthenticationError(f"malformed token: missing required claim {_quote(e.claim)}") from None
            except jwt.InvalidAlgorithmError:
                raise AuthenticationError("algorithm not allowed") from None
            except jwt.PyJWTError as e:
                raise AuthenticationError(f"malformed token: {type(e).__name__}: {e}") from None
            except (ValueError, TypeError):
                raise AuthenticationError("malformed token: cannot be verified") from None
            # The issuer and key were chosen from our own parse; pyjwt's strict parse must agree with it.
            if decoded["header"] != header:
                raise AuthenticationError("malformed token: header cannot be parsed unambiguously")
            return decoded["payload"]
        raise AuthenticationError(f"bad signature: no key of issuer {_quote(issuer.issuer)} verifies the token")

    def _check_validity_window(self, payload: Mapping[str, Any], issuer: TrustedIssuer) -> tuple[float, float]:
        """Refuse a token outside its window (with leeway); return (exp, max(nbf, iat)) for the cache."""
        now = self._clock().timestamp()
        leeway = issuer.leeway.total_seconds()
        exp = _numeric_date(payload, "exp")
        nbf = _numeric_date(payload, "nbf")
        iat = _numeric_date(payload, "iat")
        if exp is None:
            raise AuthenticationError("malformed token: missing required claim 'exp'")
        if exp <= now - leeway:
            ago = int(now - exp)
            raise AuthenticationError(f"token expired {ago}s ago (leeway {int(leeway)}s)")
        if nbf is not None and nbf > now + leeway:
            raise AuthenticationError(f"token not yet valid: nbf is {int(nbf - now)}s in the future")
        if iat is not None and iat > now + leeway:
            raise AuthenticationError(f"token not yet valid: issued {int(iat - now)}s in the future")
        return exp, max((t for t in (nbf, iat) if t is not None), default=-math.inf)

    def _identity(self, payload: Mapping[str, Any], issuer: TrustedIssuer) -> VerifiedIdentity:
        sub = payload.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthenticationError("malformed token: 'sub' is not a non-empty string")
        node_id = payload.get("node_id")
        if node_id is not None and (not isinstance(node_id, str) or not node_id):
            raise AuthenticationError("malformed token: 'node_id' claim is not a non-empty string")
        try:
            expires_at = datetime.fromtimestamp(float(payload["exp"]), tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise AuthenticationError("malformed token: 'exp' is out of range") from None

        spiffe_id, pod_name = _workload_identity(payload, sub, issuer)
        return VerifiedIdentity(
            spiffe_id=spiffe_id,
            issuer=issuer.issuer,
            subject=sub,
            node_id=node_id,
            pod_name=pod_name,
            expires_at=expires_at,
        )


def check_issuer_keys(issuer: TrustedIssuer, clock: Clock) -> None:
    """Load an issuer's keys as a TokenVerifier does at start; KeySourceError names a broken JWKS and why."""
    quiet = logging.Logger("meshca.jwt.check", logging.CRITICAL + 1)  # the real verifier logs skipped keys
    TokenVerifier([issuer], clock, logger=quiet, cache_size=0, refresh_in_background=False)


def _b64url_decode(segment: str) -> bytes:
    return base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)


def _unverified_header_and_claims(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One cheap parse to pick issuer and key; pyjwt's verifying decode then re-parses strictly and checks all."""
    segments = token.split(".")
    if len(segments) != 3:
        raise AuthenticationError("malformed token: not three dot-separated segments")
    try:
        header = json.loads(_b64url_decode(segments[0]))
        claims = json.loads(_b64url_decode(segments[1]))
    except (ValueError, RecursionError):  # binascii.Error and JSONDecodeError are ValueErrors
        raise AuthenticationError("malformed token: cannot be parsed") from None
    if not isinstance(header, dict):
        raise AuthenticationError("malformed token: header is not a JSON object")
    if not isinstance(claims, dict):
        raise AuthenticationError("malformed token: payload is not a JSON object")
    return header, claims


def _workload_identity(payload: Mapping[str, Any], sub: str, issuer: TrustedIssuer) -> tuple[SpiffeId, str | None]:
    legacy: tuple[str, str] | None = None
    if sub.startswith(_LEGACY_SA_PREFIX):
        parts = sub[len(_LEGACY_SA_PREFIX):].split(":")
        if len(parts) != 2 or not all(parts):
            raise AuthenticationError("malformed token: 'sub' is not system:serviceaccount:<namespace>:<name>")
        legacy = (parts[0], parts[1])

    k8s = payload.get(_K8S_CLAIM)
    if k8s is not None:
        ns, sa, pod_name = _kubernetes_claim(k8s)
        if legacy is not None and legacy != (ns, sa):
            raise AuthenticationError(
                f"identity claims disagree: 'sub' names {legacy[0]}/{legacy[1]} but {_K8S_CLAIM!r} names {ns}/{sa}"
            )
        derived = _service_account_id(issuer, ns, sa)
        if sub.lower().startswith("spiffe://"):
            # A SPIFFE `sub` beside the claim is a second identity assertion: it must be the same one.
            try:
                agrees = SpiffeId.parse(sub) == derived
            except InvalidSpiffeId:
                agrees = False
            if not agrees:
                raise AuthenticationError(
                    f"identity claims disagree: 'sub' is the SPIFFE ID {_quote(sub)} but {_K8S_CLAIM!r} "
                    f"names {ns}/{sa}, which is {derived.uri}"
                )
        return derived, pod_name
    if legacy is not None:
        return _service_account_id(issuer, *legacy), None

    if sub.lower().startswith("spiffe://"):
        if not issuer.allow_spiffe_subject:
            raise AuthenticationError(f"issuer {_quote(issuer.issuer)} is not allowed to assert SPIFFE subjects")
        try:
            spiffe_id = SpiffeId.parse(sub)
        except InvalidSpiffeId as e:
            raise AuthenticationError(f"malformed token: 'sub' is not a valid SPIFFE ID: {e}") from None
        if spiffe_id.trust_domain != issuer.trust_domain:
            raise AuthenticationError(
                f"SPIFFE subject in trust domain {_quote(spiffe_id.trust_domain)} but issuer "
                f"{_quote(issuer.issuer)} is trusted only for {_quote(issuer.trust_domain)}"
            )
        if not spiffe_id.path:
            raise AuthenticationError("SPIFFE subject names a trust domain, not a workload")
        return spiffe_id, None
    raise AuthenticationError("token carries no workload identity")


def _kubernetes_claim(claim: object) -> tuple[str, str, str | None]:
    bad = AuthenticationError(f"malformed token: {_K8S_CLAIM!r} claim lacks namespace/serviceaccount.name")
    if not isinstance(claim, dict):
        raise bad
    ns = claim.get("namespace")
    sa = claim.get("serviceaccount")
    name = sa.get("name") if isinstance(sa, dict) else None
    if not isinstance(ns, str) or not ns or not isinstance(name, str) or not name:
        raise bad
    pod = claim.get("pod")
    pod_name: str | None = None
    if pod is not None:
        pod_name = pod.get("name") if isinstance(pod, dict) else None
        if not isinstance(pod_name, str) or not pod_name:
            raise AuthenticationError(f"malformed token: {_K8S_CLAIM!r}.pod has no name")
    return ns, name, pod_name


def _service_account_id(issuer: TrustedIssuer, namespace: str, service_account: str) -> SpiffeId:
    if "/" in namespace or "/" in service_account:
        raise AuthenticationError("malformed token: namespace and service account must not contain '/'")
    try:
        return SpiffeId.for_service_account(issuer.trust_domain, namespace, service_account)
    except InvalidSpiffeId as e:
        raise AuthenticationError(f"malformed token: service account is not a valid identity: {e}") from None


def _redact(message: str, token: str) -> str:
    """Belt and braces: no part of the token ever appears in an error message."""
    if token in message:
        message = message.replace(token, "<token>")
    for segment in token.split("."):
        if len(segment) >= 8 and segment in message:
            message = message.replace(segment, "<redacted>")
    return message


class IdentityGate:
    """Authenticates a stream from its gRPC metadata: exactly one `authorization: Bearer <jwt>`."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    def close(self) -> None:
        """Stop the verifier's background work (the JWKS refresher)."""
        self._verifier.close()

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> VerifiedIdentity:
        values = [value for key, value in metadata if key.lower() == "authorization"]
        if not values:
            raise AuthenticationError("missing authorization header")
        if len(values) > 1:
            raise AuthenticationError(f"duplicated authorization header ({len(values)} values)")
        raw = values[0]
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("ascii")
            except UnicodeDecodeError:
                raise AuthenticationError("malformed authorization header: not ASCII") from None
        parts = raw.strip().split(None, 1)
        if not parts or parts[0].lower() != "bearer":
            # Never echo the value: without a scheme word it may be the credential itself.
            raise AuthenticationError("malformed authorization header: expected 'Bearer <token>'")
        token = parts[1].strip() if len(parts) == 2 else ""
        if not token:
            raise AuthenticationError("malformed authorization header: empty bearer token")
        if len(token.split(None, 1)) != 1:
            raise AuthenticationError("malformed authorization header: bearer token contains whitespace")
        return self._verifier.verify(token)


def check_node_binding(identity: VerifiedIdentity, node_id: str, node_metadata: Mapping[str, object]) -> None:
    """Refuse a node whose id or Istio-style metadata disagrees with its verified token."""
    if not isinstance(node_id, str) or not node_id:
        raise NodeBindingError("node.id is empty; a node must name itself")
    ns_sa = identity.spiffe_id.namespace_and_service_account()
    if identity.node_id is not None:
        if node_id != identity.node_id:
            raise NodeBindingError(
                f"node.id {_quote(node_id)} does not match the token's node_id claim {_quote(identity.node_id)}"
            )
    elif identity.pod_name is not None and ns_sa is not None:
        expected = f"{identity.pod_name}.{ns_sa[0]}"
        if node_id != expected:
            raise NodeBindingError(
                f"node.id {_quote(node_id)} does not match the token's pod: expected {_quote(expected)}"
            )

    claimed = node_metadata.get("SPIFFE_ID")
    if claimed is not None and claimed != identity.spiffe_id.uri:
        raise NodeBindingError(
            f"node metadata SPIFFE_ID {_quote(claimed)} does not match the token's identity "
            f"{_quote(identity.spiffe_id.uri)}"
        )
    for key, index in (("NAMESPACE", 0), ("SERVICE_ACCOUNT", 1)):
        claimed = node_metadata.get(key)
        if claimed is None:
            continue
        allowed = ns_sa[index] if ns_sa is not None else None
        if claimed != allowed:
            what = _quote(allowed) if allowed is not None else f"none ({identity.spiffe_id.uri} has no {key.lower()})"
            raise NodeBindingError(
                f"node metadata {key} {_quote(claimed)} does not match the token's identity: allowed {what}"
            )
