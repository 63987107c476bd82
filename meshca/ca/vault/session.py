"""Vault/OpenBao client session: login (token, AppRole, JWT, Kubernetes), token renewal, typed errors, backoff."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests

from meshca.backoff import backoff_delay
from meshca.clock import Clock
from meshca.fields import ConfigError, FieldReader

T = TypeVar("T")

DEFAULT_KUBERNETES_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_MAX_BACKOFF = timedelta(seconds=30)
BACKOFF_BASE = timedelta(seconds=1)
# A token is renewed once less than this fraction of its TTL is left.
RENEW_WHEN_LEFT = 1 / 3


# -- errors ------------------------------------------------------------------------------------


class VaultError(Exception):
    """A Vault request failed. str(e) is "<METHOD> <path>: <reason>": no stack trace, never a token."""

    def __init__(self, method: str, path: str, reason: str, status: int | None = None) -> None:
        self.method = method
        self.path = path
        self.reason = reason
        self.status = status
        super().__init__(f"{method} {path}: {reason}" if method else f"{path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.method, self.path, self.reason, self.status))


class VaultUnavailable(VaultError):
    """Vault unreachable, timed out, sealed (503), overloaded or failing (5xx, 429): retry later."""


class VaultDenied(VaultError):
    """Vault refused the token or the credentials (403, 401, invalid login): logging in again may help."""


_STATUS_OF: dict[type[hvac.exceptions.VaultError], int] = {
    hvac.exceptions.InvalidRequest: 400,
    hvac.exceptions.Unauthorized: 401,
    hvac.exceptions.Forbidden: 403,
    hvac.exceptions.InvalidPath: 404,
    hvac.exceptions.PreconditionFailed: 412,
    hvac.exceptions.RateLimitExceeded: 429,
    hvac.exceptions.InternalServerError: 500,
    hvac.exceptions.VaultNotInitialized: 501,
    hvac.exceptions.BadGateway: 502,
    hvac.exceptions.VaultDown: 503,
}
_UNAVAILABLE = (
    hvac.exceptions.InternalServerError,
    hvac.exceptions.VaultNotInitialized,
    hvac.exceptions.BadGateway,
    hvac.exceptions.VaultDown,
    hvac.exceptions.RateLimitExceeded,
    hvac.exceptions.PreconditionFailed,
)
_DENIED = (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized)
_MULTI_ERROR = re.compile(r"\d+ errors? occurred:\s*")
_TIMEOUT_VALUE = re.compile(r"timeout=([0-9.]+)")


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return text


def _clean_reason(errors: Iterable[str] | None, fallback: str) -> str:
    """Vault's error list as one line ("1 error occurred: * x" becomes "x")."""
    parts: list[str] = []
    for item in errors or ():
        text = _MULTI_ERROR.sub("", str(item))
        for piece in re.split(r"\n\s*\*\s*|\n", text):
            piece = piece.strip().lstrip("*").strip()
            if piece:
                parts.append(piece)
    reason = "; ".join(parts) if parts else fallback.strip()
    return re.sub(r"\s+", " ", reason) or "no reason given"


def _method_and_path(method: str | None, url: str | None, what: str) -> tuple[str, str]:
    if not url:
        return (method or "").upper(), what
    path = urlsplit(url).path
    path = path[len("/v1/") :] if path.startswith("/v1/") else path.lstrip("/")
    return (method or "").upper(), path or what


def _where(url: str | None) -> str:
    if not url:
        return "Vault"
    parts = urlsplit(url)
    return f"Vault at {parts.scheme}://{parts.netloc}" if parts.netloc else "Vault"


def _connection_reason(error: requests.exceptions.RequestException) -> str:
    text = str(error)
    url = error.request.url if error.request is not None else None
    where = _where(url)
    if isinstance(error, requests.exceptions.Timeout):
        value = _TIMEOUT_VALUE.search(text)
        after = f" within {value.group(1)}s" if value else ""
        kind = "connect" if isinstance(error, requests.exceptions.ConnectTimeout) else "no answer"
        return f"{where} timed out ({kind}{after})"
    if isinstance(error, requests.exceptions.SSLError):
        detail = "certificate verify failed" if "CERTIFICATE_VERIFY_FAILED" in text else "handshake failed"
        return f"{where} unreachable: TLS {detail}"
    if "Connection refused" in text:
        return f"{where} unreachable: connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text or "Temporary failure in name" in text:
        return f"{where} unreachable: host name not found"
    if isinstance(error, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return f"{where}: connection broken mid-response"
    return f"{where} unreachable: {type(error).__name__}"


def vault_error_from(error: BaseException, what: str, secrets: Iterable[str] = ()) -> VaultError | None:
    """Map an hvac or requests exception to a VaultError subclass; None for anything else.

    `what` names the request when the exception does not carry its URL; `secrets` are scrubbed
    from the message (tokens, secret IDs) in case Vault or a proxy echoed them.
    """
    secrets = tuple(secrets)
    if isinstance(error, VaultError):
        return error
    if isinstance(error, hvac.exceptions.VaultError):
        method, path = _method_and_path(error.method, error.url, what)
        status = _STATUS_OF.get(type(error))
        if status is None:
            status = next((code for kind, code in _STATUS_OF.items() if isinstance(error, kind)), None)
        errors = error.errors if isinstance(error.errors, list) else ([error.errors] if error.errors else None)
        fallback = str(error.args[0]) if error.args and error.args[0] else type(error).__name__
        reason = _scrub(_clean_reason(errors, fallback), secrets)
        if isinstance(error, _UNAVAILABLE):
            return VaultUnavailable(method, path, reason, status)
        if isinstance(error, _DENIED):
            return VaultDenied(method, path, reason, status)
        return VaultError(method, path, reason, status)
    if isinstance(error, requests.exceptions.RequestException):
        request = error.request
        method, path = _method_and_path(
            getattr(request, "method", None), getattr(request, "url", None), what
        )
        reason = _scrub(_connection_reason(error), secrets)
        if isinstance(
            error,
            (
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError,
            ),
        ):
            return VaultUnavailable(method, path, reason, None)
        return VaultError(method, path, reason, None)
    return None


# -- settings ----------------------------------------------------------------------------------


def _read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as error:
        raise OSError(f"cannot read {what} {str(path)!r}: {error.strerror or error}") from None
    if not value:
        raise OSError(f"{what} {str(path)!r} is empty")
    return value


@dataclass(frozen=True)
class TokenAuth:
    """A ready-made Vault token, given directly or read from a file (re-read at every "login")."""

    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("TokenAuth needs exactly one of token or token_file")
        if self.token is not None and not self.token.strip():
            raise ValueError("TokenAuth token must be non-empty")

    @property
    def method(self) -> str:
        return "token"


@dataclass(frozen=True)
class AppRoleAuth:
    """AppRole login: role_id (not secret) and secret_id, given directly or read from a file at each login."""

    role_id: str
    secret_id: str | None = field(default=None, repr=False)
    secret_id_file: Path | None = None
    mount: str = "approle"

    def __post_init__(self) -> None:
        if not self.role_id:
            raise ValueError("AppRoleAuth role_id must be non-empty")
        if (self.secret_id is None) == (self.secret_id_file is None):
            raise ValueError("AppRoleAuth needs exactly one of secret_id or secret_id_file")
        _check_mount(self.mount)

    @property
    def method(self) -> str:
        return "approle"


@dataclass(frozen=True)
class JwtAuth:
    """JWT/OIDC login (auth/<mount>/login with role and jwt); the JWT is read from token_file at each login."""

    role: str
    token_file: Path
    mount: str = "jwt"

    def __post_init__(self) -> None:
        if not self.role:
            raise ValueError("JwtAuth role must be non-empty")
        _check_mount(self.mount)

    @property
    def method(self) -> str:
        return "jwt"


@dataclass(frozen=True)
class KubernetesAuth:
    """Kubernetes login with the pod's service-account token, read from token_file at each login."""

    role: str
    token_file: Path = DEFAULT_KUBERNETES_TOKEN
    mount: str = "kubernetes"

    def __post_init__(self) -> None:
        if not self.role:
            raise ValueError("KubernetesAuth role must be non-empty")
        _check_mount(self.mount)

    @property
    def method(self) -> str:
        return "kubernetes"


VaultAuth = TokenAuth | AppRoleAuth | JwtAuth | KubernetesAuth


def _check_mount(mount: str) -> None:
    if not mount or mount != mount.strip("/") or " " in mount:
        raise ValueError(f"auth mount {mount!r} must be a path like 'approle' (no leading/trailing '/')")


@dataclass(frozen=True)
class VaultSettings:
    """Where Vault is and how to log in; `max_backoff` caps every retry delay of the session."""

    address: str
    auth: VaultAuth
    namespace: str | None = None
    ca_cert: Path | None = None
    timeout: float = 5.0
    max_backoff: timedelta = DEFAULT_MAX_BACKOFF
    # between renewals, maintain() checks the token (lookup-self) this often, so an unreachable,
    # sealed or revoking Vault shows in metrics and logs before it matters
    probe_interval: timedelta = timedelta(seconds=10)

    def __post_init__(self) -> None:
        parts = urlsplit(self.address)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"Vault address {self.address!r} must be http(s)://host:port")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.max_backoff <= timedelta(0):
            raise ValueError("max_backoff must be positive")


_AUTH_FIELDS = {
    "token": {"method", "token_file"},
    "approle": {"method", "role_id", "secret_id_file", "mount"},
    "jwt": {"method", "role", "token_file", "mount"},
    "kubernetes": {"method", "role", "token_file", "mount"},
}


def parse_vault_settings(reader: FieldReader, extra_known: Iterable[str] = ()) -> VaultSettings:
    """The `vault:` section of a settings file (secrets only by file, never inline).

    `extra_known` are keys of the same section that another parser reads (e.g. mode, pki mount).
    """
    reader.check_known({"address", "namespace", "ca_cert", "timeout", "max_backoff", "auth", *extra_known})
    auth_data = reader.get("auth", Mapping)
    sub = reader.child("auth", auth_data)
    method = sub.get("method", str)
    if method not in _AUTH_FIELDS:
        raise sub.error("method", f"{method!r} is not one of {', '.join(_AUTH_FIELDS)}")
    sub.check_known(_AUTH_FIELDS[method])

    def path_of(key: str, default: Path | None = None) -> Path:
        value = sub.get(key, str, None if default is not None else ...)
        return default if value is None else (reader.path.parent / value).resolve()  # type: ignore[return-value]

    try:
        auth: VaultAuth
        if method == "token":
            auth = TokenAuth(token_file=path_of("token_file"))
        elif method == "approle":
            auth = AppRoleAuth(
                role_id=sub.get("role_id", str),
                secret_id_file=path_of("secret_id_file"),
                mount=sub.get("mount", str, "approle"),
            )
        elif method == "jwt":
            auth = JwtAuth(role=sub.get("role", str), token_file=path_of("token_file"), mount=sub.get("mount", str, "jwt"))
        else:
            auth = KubernetesAuth(
                role=sub.get("role", str),
                token_file=path_of("token_file", DEFAULT_KUBERNETES_TOKEN),
                mount=sub.get("mount", str, "kubernetes"),
            )
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise reader.error("auth", str(error)) from None
    timeout = reader.duration("timeout", required=False)
    max_backoff = reader.duration("max_backoff", required=False)
    try:
        return VaultSettings(
            address=reader.get("address", str),
            auth=auth,
            namespace=reader.get("namespace", str, None),
            ca_cert=reader.file("ca_cert", required=False),
            timeout=timeout.total_seconds() if timeout is not None else 5.0,
            max_backoff=max_backoff if max_backoff is not None else DEFAULT_MAX_BACKOFF,
        )
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise reader.error("", str(error)) from None


def renewal_due(now: datetime, expires_at: datetime, ttl: timedelta) -> bool:
    """True when less than a third of the token's TTL is left."""
    return expires_at - now < ttl * RENEW_WHEN_LEFT


# -- session -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VaultSessionStatus:
    """A snapshot of the session for metrics, /status and logs."""

    authenticated: bool
    auth_method: str
    token_expires_at: datetime | None
    last_error: str | None
    consecutive_failures: int
    logins_total: int
    renewals_total: int
    failures_total: int = 0
    renewable: bool = False
    next_attempt_at: datetime | None = None


@dataclass(frozen=True)
class _Token:
    value: str = field(repr=False)
    ttl: timedelta  # as granted at login or last renewal (0: never expires)
    expires_at: datetime | None  # None: never expires (root)
    renewable: bool
    source: str = field(default="", repr=False)  # the credential it came from (TokenAuth: the token itself)
    exhausted: bool = False  # renewal no longer extends it (max TTL reached)


class VaultSession:
    """One authenticated Vault identity: logs in, renews, logs in again, maps errors, backs off."""

    def __init__(self, settings: VaultSettings, clock: Clock, logger: logging.Logger) -> None:
        self._settings = settings
        self._clock = clock
        self._log = logger
        self._lock = threading.RLock()
        self._client: hvac.Client | None = None
        self._token: _Token | None = None
        self._generation = 0
        self._credential = ""  # last secret read for a login, scrubbed from messages
        self._last_error: str | None = None
        self._consecutive_failures = 0
        self._failures_total = 0
        self._last_probe_at: datetime | None = None
        self._logins_total = 0
        self._renewals_total = 0
        self._next_attempt_at: datetime | None = None
        self._warned_static_expiry = False

    @property
    def settings(self) -> VaultSettings:
        return self._settings

    def __repr__(self) -> str:
        return f"VaultSession(address={self._settings.address!r}, auth={self._settings.auth.method!r})"

    # -- public API ---------------------------------------------------------------------------

    def client(self) -> hvac.Client:
        """An authenticated client; logs in on first use (raises VaultError subclasses)."""
        return self._current()[0]

    def call(self, operation: Callable[[hvac.Client], T], what: str) -> T:
        """Run one Vault call; on VaultDenied log in again once and retry once. Raises VaultError subclasses."""
        try:
            client, generation = self._current()
            try:
                return self._run(operation, client, what)
            except VaultDenied as denied:
                self._log.warning(
                    "vault: %s denied (%s); logging in again and retrying once", what, denied,
                    extra={"vault_path": denied.path},
                )
            client = self._relogin_after_denial(generation)
            return self._run(operation, client, what)
        except VaultError as error:
            self._note_call_error(error)
            raise

    def maintain(self) -> None:
        """Periodic upkeep: log in if needed, renew below 1/3 TTL, log in again on failure; backs off on errors."""
        with self._lock:
            now = self._clock()
            if self._next_attempt_at is not None and now < self._next_attempt_at:
                return
            try:
                self._maintain_locked(now)
                self._probe_locked(now)
            except VaultError as error:
                self._note_failure(error, now, "maintenance")

    def _probe_locked(self, now: datetime) -> None:
        token, client = self._token, self._client
        if token is None or client is None:
            return
        if self._last_probe_at is not None and now - self._last_probe_at < self._settings.probe_interval:
            return
        self._last_probe_at = now
        try:
            self._run(lambda c: c.auth.token.lookup_self(), client, "token lookup-self")
        except VaultDenied:
            self._relogin_or_fail(token, "token rejected by Vault")
            return
        if self._consecutive_failures:
            self._log.info("vault: reachable again", extra={"vault_auth": self._settings.auth.method})
        self._note_success()

    def token_expires_at(self) -> datetime | None:
        token = self._token
        return token.expires_at if token is not None else None

    def status(self) -> VaultSessionStatus:
        """Never blocks on a Vault request in progress (reads without the session lock)."""
        token = self._token
        now = self._clock()
        valid = token is not None and (token.expires_at is None or token.expires_at > now)
        return VaultSessionStatus(
            authenticated=valid,
            auth_method=self._settings.auth.method,
            token_expires_at=token.expires_at if token is not None else None,
            last_error=self._last_error,
            consecutive_failures=self._consecutive_failures,
            logins_total=self._logins_total,
            renewals_total=self._renewals_total,
            failures_total=self._failures_total,
            renewable=bool(token and token.renewable and not token.exhausted),
            next_attempt_at=self._next_attempt_at,
        )

    # -- internals: calls ---------------------------------------------------------------------

    def _secrets(self) -> tuple[str, ...]:
        auth = self._settings.auth
        values = [self._credential]
        if self._token is not None:
            values.append(self._token.value)
        if isinstance(auth, TokenAuth) and auth.token:
            values.append(auth.token)
        if isinstance(auth, AppRoleAuth) and auth.secret_id:
            values.append(auth.secret_id)
        return tuple(v for v in values if v)

    def _map(self, error: BaseException, what: str) -> VaultError | None:
        return vault_error_from(error, what, self._secrets())

    def _run(self, operation: Callable[[hvac.Client], T], client: hvac.Client, what: str) -> T:
        try:
            result = operation(client)
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as error:
            mapped = self._map(error, what)
            assert mapped is not None
            raise mapped from None
        if self._last_error is not None and self._consecutive_failures == 0:
            self._last_error = None
        return result

    def _note_call_error(self, error: VaultError) -> None:
        if isinstance(error, (VaultUnavailable, VaultDenied)):
            with self._lock:
                self._last_error = str(error)

    def _current(self) -> tuple[hvac.Client, int]:
        with self._lock:
            if self._client is None:
                self._login_recorded("first use")
            assert self._client is not None
            return self._client, self._generation

    def _relogin_after_denial(self, generation: int) -> hvac.Client:
        with self._lock:
            if self._generation == generation or self._client is None:
                self._login_recorded("request denied")
            assert self._client is not None
            return self._client

    def _login_recorded(self, why: str) -> None:
        """Log in; count a failure (and schedule the backoff) if it does not work."""
        now = self._clock()
        try:
            self._login(why)
        except VaultError as error:
            self._note_failure(error, now, "login")
            raise

    # -- internals: maintenance ---------------------------------------------------------------

    def _maintain_locked(self, now: datetime) -> None:
        token = self._token
        if token is None:
            self._login("no token yet" if self._logins_total == 0 else "previous login failed")
            return
        if isinstance(self._settings.auth, TokenAuth) and self._static_token_changed(token):
            self._login("token file changed")
            return
        if token.expires_at is None:
            return  # e.g. a root token: never expires, nothing to renew
        if token.expires_at <= now:
            self._log.error(
                "vault: token expired at %s; logging in again", token.expires_at.isoformat(),
                extra={"vault_auth": self._settings.auth.method},
            )
            self._relogin_or_fail(token, "token expired")
            return
        if not renewal_due(now, token.expires_at, token.ttl):
            return
        if token.renewable and not token.exhausted:
            try:
                granted = self._renew(token)
            except VaultUnavailable:
                raise
            except VaultError as error:
                self._log.warning(
                    "vault: token renewal failed (%s); logging in again", error,
                    extra={"vault_auth": self._settings.auth.method},
                )
                self._relogin_or_fail(token, "renewal failed")
                return
            renewed = self._token
            assert renewed is not None and renewed.expires_at is not None
            if granted >= token.ttl:
                return
            # Vault capped the renewal at the token's max TTL: no further renewal can help, so the
            # next time it is due (or now, if it already is) the session logs in again instead.
            self._token = replace(renewed, exhausted=True)
            self._log.info(
                "vault: token renewal capped by its max TTL (expires %s); will log in again instead of renewing",
                renewed.expires_at.isoformat(),
            )
            if renewal_due(self._clock(), renewed.expires_at, token.ttl):
                self._relogin_or_fail(self._token, "max TTL reached")
            return
        self._relogin_or_fail(token, "max TTL reached" if token.exhausted else "token not renewable, close to expiry")

    def _static_token_changed(self, token: _Token) -> bool:
        auth = self._settings.auth
        if not isinstance(auth, TokenAuth) or auth.token_file is None:
            return False
        try:
            return _read_secret_file(auth.token_file, "token file") != token.source
        except OSError:
            return False

    def _relogin_or_fail(self, token: _Token, why: str) -> None:
        """Log in again. A configured token cannot be replaced by us: warn once, and once it has
        expired look it up again (an agent may have renewed it, or the file may hold a new one)."""
        if isinstance(self._settings.auth, TokenAuth):
            if token.expires_at is not None and token.expires_at > self._clock():
                if not self._warned_static_expiry:
                    self._warned_static_expiry = True
                    self._log.warning(
                        "vault: the configured token cannot be renewed further and expires at %s; "
                        "provide a new token (token_file is re-read) or use a login method",
                        token.expires_at.isoformat(),
                    )
                return
        self._login(why)

    # -- internals: login and renewal ---------------------------------------------------------

    def _new_client(self, token: str) -> hvac.Client:
        settings = self._settings
        verify: bool | str = str(settings.ca_cert) if settings.ca_cert is not None else True
        return hvac.Client(
            url=settings.address, token=token, namespace=settings.namespace, verify=verify, timeout=settings.timeout
        )

    def _login_payload(self) -> tuple[str, dict[str, str], str]:
        """(login path, request body, the secret sent) for the configured method; reads files now."""
        auth = self._settings.auth
        try:
            if isinstance(auth, AppRoleAuth):
                secret = auth.secret_id if auth.secret_id is not None else _read_secret_file(
                    auth.secret_id_file, "secret_id_file"  # type: ignore[arg-type]
                )
                return f"auth/{auth.mount}/login", {"role_id": auth.role_id, "secret_id": secret}, secret
            if isinstance(auth, (JwtAuth, KubernetesAuth)):
                jwt = _read_secret_file(auth.token_file, "token file")
                return f"auth/{auth.mount}/login", {"role": auth.role, "jwt": jwt}, jwt
        except OSError as error:
            path = f"auth/{auth.mount}/login"  # type: ignore[union-attr]
            raise VaultDenied("POST", path, str(error), None) from None
        raise TypeError(f"no login payload for {type(auth).__name__}")

    def _login(self, why: str) -> None:
        auth = self._settings.auth
        started = self._clock()
        if isinstance(auth, TokenAuth):
            token_value = auth.token
            if token_value is None:
                try:
                    token_value = _read_secret_file(auth.token_file, "token file")  # type: ignore[arg-type]
                except OSError as error:
                    raise VaultDenied("GET", "auth/token/lookup-self", str(error), None) from None
            self._credential = token_value
            client = self._new_client(token_value)
            data = self._raw(lambda: client.auth.token.lookup_self(), "auth/token/lookup-self")["data"]
            ttl = timedelta(seconds=int(data.get("creation_ttl") or data.get("ttl") or 0))
            left = int(data.get("ttl") or 0)
            expires = started + timedelta(seconds=left) if left > 0 else None
            token = _Token(token_value, ttl, expires, bool(data.get("renewable")), source=token_value)
        else:
            path, payload, secret = self._login_payload()
            self._credential = secret
            anonymous = self._new_client("")  # "" and not None: hvac would fall back to VAULT_TOKEN
            response = self._raw(lambda: anonymous.adapter.post(f"/v1/{path}", json=payload), path, login=True)
            granted = (response or {}).get("auth") or {}
            if not granted.get("client_token"):
                raise VaultDenied("POST", path, "login answered without a client token", None)
            lease = int(granted.get("lease_duration") or 0)
            token = _Token(
                granted["client_token"],
                timedelta(seconds=lease),
                started + timedelta(seconds=lease) if lease > 0 else None,
                bool(granted.get("renewable")),
            )
            client = self._new_client(token.value)
        self._client = client
        self._token = token
        self._generation += 1
        self._logins_total += 1
        self._warned_static_expiry = False
        self._note_success()
        self._log.info(
            "vault: logged in with %s (%s): ttl %ss, renewable %s, expires %s",
            auth.method, why, int(token.ttl.total_seconds()), token.renewable,
            token.expires_at.isoformat() if token.expires_at else "never",
            extra={"vault_auth": auth.method},
        )

    def _renew(self, token: _Token) -> timedelta:
        """renew-self; returns the lease Vault granted (less than the TTL when capped by max TTL)."""
        assert self._client is not None
        client = self._client
        started = self._clock()
        response = self._raw(lambda: client.auth.token.renew_self(), "auth/token/renew-self")
        granted = (response or {}).get("auth") or {}
        lease = int(granted.get("lease_duration") or 0)
        if lease <= 0:
            raise VaultDenied("POST", "auth/token/renew-self", "renewal granted no lease", None)
        self._token = replace(
            token,
            expires_at=started + timedelta(seconds=lease),
            renewable=bool(granted.get("renewable", token.renewable)),
        )
        self._renewals_total += 1
        self._note_success()
        self._log.info(
            "vault: token renewed for %ss (expires %s)", lease, self._token.expires_at.isoformat(),  # type: ignore[union-attr]
            extra={"vault_auth": self._settings.auth.method},
        )
        return timedelta(seconds=lease)

    def _raw(self, request: Callable[[], Any], what: str, *, login: bool = False) -> Any:
        """One request of the session's own (login, lookup, renew), with errors mapped."""
        try:
            return request()
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as error:
            mapped = self._map(error, what)
            assert mapped is not None
            if login and type(mapped) is VaultError and mapped.status == 400:
                # Vault answers a refused login (bad secret_id, invalid JWT, unknown role) with 400.
                mapped = VaultDenied(mapped.method, mapped.path, mapped.reason, mapped.status)
            raise mapped from None

    # -- internals: bookkeeping ---------------------------------------------------------------

    def _note_success(self) -> None:
        self._consecutive_failures = 0
        self._next_attempt_at = None
        self._last_error = None

    def _note_failure(self, error: VaultError, now: datetime, during: str) -> None:
        self._consecutive_failures += 1
        self._failures_total += 1
        self._last_error = str(error)
        delay = backoff_delay(self._consecutive_failures, BACKOFF_BASE, self._settings.max_backoff)
        self._next_attempt_at = now + delay
        token = self._token
        expiry = token.expires_at.isoformat() if token is not None and token.expires_at else "n/a"
        self._log.warning(
            "vault: %s failed (%s); attempt %d, next in %.1fs; token expires %s",
            during, error, self._consecutive_failures, delay.total_seconds(), expiry,
            extra={"vault_auth": self._settings.auth.method, "vault_path": error.path},
        )
