"""`meshca serve` settings: a YAML file parsed into frozen dataclasses, errors naming file and field."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from meshca.clock import format_duration, system_clock
from meshca.fields import ConfigError, FieldReader, parse_host_port, read_yaml_mapping
from meshca.identity.jwt import KeySourceError, TrustedIssuer, check_issuer_keys
from meshca.mesh.endpoints import RegistrationTiming
from meshca.sds.rotation import RenewalPolicy, RotationSettings
from meshca.store.etcd import EtcdSettings, parse_store_settings


@dataclass(frozen=True)
class ServerTls:
    certificate_chain: Path
    private_key: Path


AUDIT_FILE = "audit.jsonl"  # the audit log's default name, in the CA state dir


@dataclass(frozen=True)
class AuditSettings:
    """The audit log (meshca.audit): `path` None is off. `meshca serve --workers N` gives worker i its own
    file (meshca.audit.worker_path), as every process writes its own hash chain."""

    path: Path | None
    flush_interval: timedelta = timedelta(milliseconds=100)


@dataclass(frozen=True)
class ServeSettings:
    """Everything `meshca serve` needs; paths are resolved relative to the settings file."""

    state_dir: Path | None  # None with `store:` and the internal CA (its state is in etcd)
    listen_host: str
    listen_port: int
    issuers: tuple[TrustedIssuer, ...]
    server_tls: ServerTls | None  # None: issue a server certificate from the CA at start
    server_names: tuple[str, ...]
    leaf_ttl: timedelta | None
    rotation: RotationSettings
    mesh_file: Path | None  # the mesh config (services, routes), watched for changes
    metrics_port: int | None  # admin HTTP: /metrics, /status, /healthz
    admin_address: str
    log_level: str
    xds_send_timeout: timedelta = timedelta(seconds=30)  # a proxy not reading a response this long is closed
    identity_grace: timedelta = timedelta(minutes=10)  # an identity without streams this long is forgotten
    xds_max_stream_age: timedelta = timedelta(minutes=30)  # streams are closed after this (±10%) to reconnect
    store: EtcdSettings | None = None  # replicas on etcd: the mesh config (and more) lives there
    audit: AuditSettings = AuditSettings(None)
    registration: RegistrationTiming = RegistrationTiming()  # registered endpoints: grace after a stream, warmup


def _parse_listen(reader: FieldReader) -> tuple[str, int]:
    value = reader.get("listen", str, "127.0.0.1:15010")
    try:
        return parse_host_port(value)
    except ValueError as error:
        raise reader.error("listen", str(error)) from None


def _parse_issuer(reader: FieldReader, index: int, item: object, trust_domain: str) -> TrustedIssuer:
    key = f"issuers[{index}]"
    if not isinstance(item, Mapping):
        raise reader.error(key, "must be a mapping")
    sub = reader.child(key, item)
    sub.check_known(
        {"issuer", "audiences", "jwks", "jwks_uri", "jwks_ca", "jwks_token", "jwks_refresh", "public_keys", "algorithms",
         "trust_domain", "leeway"}
    )
    audiences = sub.get("audiences", list)
    public_keys = []
    for i, name in enumerate(sub.get("public_keys", list, [])):
        if not isinstance(name, str):
            raise sub.error(f"public_keys[{i}]", "must be a file path")
        path = (reader.path.parent / name).resolve()
        if not path.exists():
            raise sub.error(f"public_keys[{i}]", f"file {str(path)!r} does not exist")
        public_keys.append(path.read_bytes())
    leeway = sub.duration("leeway", required=False)
    remote: dict[str, Any] = {"jwks_uri": sub.get("jwks_uri", str, None)}
    if remote["jwks_uri"] is not None:
        if "jwks" in item:
            raise sub.error("jwks_uri", "give jwks (a file) or jwks_uri, not both")
        if not remote["jwks_uri"].startswith("https://"):
            raise sub.error("jwks_uri", f"{remote['jwks_uri']!r} is not an https:// URL")
        remote["jwks_ca_path"] = sub.file("jwks_ca", required=False)
        remote["jwks_token_path"] = sub.file("jwks_token", required=False)
        refresh = sub.duration("jwks_refresh", required=False)
        if refresh is not None:
            if refresh < timedelta(seconds=10):
                raise sub.error("jwks_refresh", f"{format_duration(refresh)} is too short (at least 10s)")
            remote["jwks_refresh"] = refresh
    else:
        for name in ("jwks_ca", "jwks_token", "jwks_refresh"):
            if name in item:
                raise sub.error(name, "needs jwks_uri")
    try:
        issuer = TrustedIssuer(
            issuer=sub.get("issuer", str),
            audiences=tuple(str(a) for a in audiences),
            trust_domain=sub.get("trust_domain", str, trust_domain),
            public_keys_pem=tuple(public_keys),
            jwks_path=sub.file("jwks", required=False),
            algorithms=tuple(sub.get("algorithms", list, ["ES256", "ES384", "RS256", "PS256", "EdDSA"])),
            **({"leeway": leeway} if leeway is not None else {}),
            **remote,
        )
        check_issuer_keys(issuer, system_clock)  # a broken JWKS at start is fatal: no last good keys yet
    except KeySourceError as error:
        raise sub.error(_KEY_SOURCE_FIELDS[error.source], error.reason) from None
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise reader.error(key, str(error)) from None
    return issuer


# The settings-file key of each TrustedIssuer key source.
_KEY_SOURCE_FIELDS = {"jwks_path": "jwks", "jwks_uri": "jwks_uri"}


def load_serve_settings(path: Path, trust_domain: str) -> ServeSettings:
    """Parse and validate a serve settings file; `trust_domain` is the CA's, the issuers' default."""
    return parse_serve_settings(path, read_yaml_mapping(path), trust_domain)


def read_state_dir(path: Path) -> Path:
    """Only the CA state dir, needed before the rest (the CA knows the trust domain)."""
    reader = FieldReader(path, read_yaml_mapping(path))
    return (path.parent / reader.get("state_dir", str)).resolve()


def read_rotation_settings(path: Path) -> RotationSettings:
    """Only the `rotation:` section (`meshca ca taint` waits out its herd window)."""
    return _parse_rotation(FieldReader(path, read_yaml_mapping(path)))


def read_store_settings(path: Path) -> EtcdSettings | None:
    """Only the `store:` section, needed before the rest (the store is connected first: the CA may live there)."""
    return _parse_store(FieldReader(path, read_yaml_mapping(path)))


def _parse_store(reader: FieldReader) -> EtcdSettings | None:
    store = parse_store_settings(reader)
    if store is not None and reader.data.get("mesh") is not None:
        raise reader.error(
            "mesh", "cannot be used with store: the mesh config lives in etcd; write it with "
            "`meshca mesh apply -f FILE --config SETTINGS`"
        )
    return store


def _state_dir(path: Path, reader: FieldReader, data: Mapping[str, Any]) -> Path | None:
    """Required, except with `store:` (the internal CA then lives in etcd; the vault modes still read it)."""
    value = reader.get("state_dir", str, None if data.get("store") is not None else ...)
    return None if value is None else (path.parent / value).resolve()


def parse_audit(reader: FieldReader, state_dir: Path | None) -> AuditSettings:
    """`audit: {path, flush_interval}`; absent: `<state_dir>/audit.jsonl` with a local state dir, off with
    `store:` and no state dir; `audit: false` turns it off."""
    data = reader.data.get("audit")
    if data is None:
        return AuditSettings(None if state_dir is None else state_dir / AUDIT_FILE)
    if data is False:
        return AuditSettings(None)
    if not isinstance(data, Mapping):
        raise reader.error("audit", "must be a mapping (path, flush_interval) or false (off)")
    sub = reader.child("audit", data)
    sub.check_known({"path", "flush_interval"})
    value = sub.get("path", str, None)
    if value is None:
        if state_dir is None:
            raise sub.error("path", "is required with store: (there is no local state dir to hold it)")
        path = state_dir / AUDIT_FILE
    else:
        path = (reader.path.parent / value).resolve()
        if not path.parent.is_dir():
            raise sub.error("path", f"directory {str(path.parent)!r} does not exist")
    interval = sub.duration("flush_interval", required=False) or AuditSettings(None).flush_interval
    if not timedelta(milliseconds=1) <= interval <= timedelta(seconds=10):
        raise sub.error("flush_interval", f"{format_duration(interval)} must be between 1ms and 10s")
    return AuditSettings(path, interval)


def _parse_registration(reader: FieldReader) -> RegistrationTiming:
    """`registration: {grace, warmup}` (meshca.mesh.endpoints.RegistrationTiming), each 0 to 60s."""
    data = reader.get("registration", Mapping, None)
    defaults = RegistrationTiming()
    if data is None:
        return defaults
    sub = reader.child("registration", data)
    sub.check_known({"grace", "warmup"})
    values = {}
    for name in ("grace", "warmup"):
        value = sub.duration(name, required=False)
        if value is None:
            value = getattr(defaults, name)
        if not timedelta(0) <= value <= timedelta(seconds=60):
            raise sub.error(name, f"{format_duration(value)} must be between 0s and 60s")
        values[name] = value
    return RegistrationTiming(**values)


def read_audit_settings(path: Path) -> AuditSettings:
    """Only the audit log's settings (for `meshca certs list --config`)."""
    data = read_yaml_mapping(path)
    reader = FieldReader(path, data)
    return parse_audit(reader, _state_dir(path, reader, data))


def _parse_rotation(reader: FieldReader) -> RotationSettings:
    data = reader.get("rotation", Mapping, None)
    if data is None:
        return RotationSettings()
    sub = reader.child("rotation", data)
    sub.check_known({"renew_at", "jitter", "hard_zone", "reissue_window", "reissue_rate", "ca_check_interval",
                     "trust_propagation"})
    defaults = RotationSettings()
    fraction = float(sub.get("renew_at", (int, float), defaults.policy.fraction))
    jitter = float(sub.get("jitter", (int, float), defaults.policy.jitter))
    hard_zone = float(sub.get("hard_zone", (int, float), defaults.policy.hard_zone))
    # RenewalPolicy's own checks, here to name the field a user has to change.
    if not 0 < fraction < 1:
        raise sub.error("renew_at", f"{fraction:g} must be between 0 and 1 (a fraction of the certificate's lifetime)")
    if not 0 <= jitter < min(fraction, 1 - fraction):
        raise sub.error(
            "jitter", f"{jitter:g} must be >= 0 and below {min(fraction, 1 - fraction):g} (renew_at {fraction:g})"
        )
    if not 0 < hard_zone < 1 - fraction:
        raise sub.error("hard_zone", f"{hard_zone:g} must be > 0 and below {1 - fraction:g} (after renew_at {fraction:g})")
    try:
        policy = RenewalPolicy(fraction=fraction, jitter=jitter, hard_zone=hard_zone)
    except ValueError as error:
        raise reader.error("rotation", str(error)) from None
    rate = float(sub.get("reissue_rate", (int, float), defaults.reissue_rate))
    if rate <= 0:
        raise sub.error("reissue_rate", f"{rate} must be > 0 certificates per second")
    return RotationSettings(
        policy=policy,
        reissue_window=sub.duration("reissue_window", required=False) or defaults.reissue_window,
        reissue_rate=rate,
        ca_check_interval=sub.duration("ca_check_interval", required=False) or defaults.ca_check_interval,
        trust_propagation=_trust_propagation(sub, defaults.trust_propagation),
    )


def _trust_propagation(sub: FieldReader, default: timedelta) -> timedelta:
    value = sub.duration("trust_propagation", required=False)
    if value is None:
        return default
    if value < timedelta(0):
        raise sub.error("trust_propagation", "must not be negative")
    return value


def parse_serve_settings(path: Path, data: Mapping[str, Any], trust_domain: str) -> ServeSettings:
    reader = FieldReader(path, data)
    reader.check_known(
        {"state_dir", "listen", "issuers", "tls", "server_names", "leaf_ttl", "rotation", "mesh", "metrics_port", "admin_address", "ca", "log_level", "xds_send_timeout",
         "xds_max_stream_age", "identity_grace", "store", "audit", "registration"}
    )
    store = _parse_store(reader)
    host, port = _parse_listen(reader)
    issuers_raw = reader.get("issuers", list)
    if not issuers_raw:
        raise reader.error("issuers", "at least one trusted JWT issuer is required")
    issuers = tuple(_parse_issuer(reader, i, item, trust_domain) for i, item in enumerate(issuers_raw))
    tls = None
    tls_raw = reader.get("tls", Mapping, None)
    if tls_raw is not None:
        tls_reader = reader.child("tls", tls_raw)
        tls_reader.check_known({"certificate_chain", "private_key"})
        tls = ServerTls(tls_reader.file("certificate_chain"), tls_reader.file("private_key"))  # type: ignore[arg-type]
    server_names = reader.get("server_names", list, ["localhost", "meshca.local", "127.0.0.1"])
    log_level = reader.get("log_level", str, "info").lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise reader.error("log_level", f"{log_level!r} is not one of debug, info, warning, error")
    metrics_port = reader.get("metrics_port", int, None)
    send_timeout = reader.duration("xds_send_timeout", required=False)
    if send_timeout is None:
        send_timeout = timedelta(seconds=30)
    if send_timeout < timedelta(seconds=1):
        raise reader.error("xds_send_timeout", f"{format_duration(send_timeout)} is too short (at least 1s)")
    identity_grace = reader.duration("identity_grace", required=False)
    if identity_grace is None:
        identity_grace = timedelta(minutes=10)
    max_stream_age = reader.duration("xds_max_stream_age", required=False)
    if max_stream_age is None:
        max_stream_age = timedelta(minutes=30)
    if max_stream_age < timedelta(seconds=1):
        raise reader.error("xds_max_stream_age", f"{format_duration(max_stream_age)} is too short (at least 1s)")
    mesh_file = reader.file("mesh", required=False)
    state_dir = _state_dir(path, reader, data)
    return ServeSettings(
        state_dir=state_dir,
        listen_host=host,
        listen_port=port,
        issuers=issuers,
        server_tls=tls,
        server_names=tuple(str(n) for n in server_names),
        leaf_ttl=reader.duration("leaf_ttl", required=False),
        rotation=_parse_rotation(reader),
        mesh_file=mesh_file,
        metrics_port=metrics_port,
        admin_address=reader.get("admin_address", str, "127.0.0.1"),
        log_level=log_level,
        xds_send_timeout=send_timeout,
        identity_grace=identity_grace,
        xds_max_stream_age=max_stream_age,
        store=store,
        audit=parse_audit(reader, state_dir),
        registration=_parse_registration(reader),
    )
