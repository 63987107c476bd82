"""`meshca trust sync`: fetch meshca's trust bundle over TLS verified with the bundle the node already holds, and
write it where Envoy reloads it (a PEM bundle and a file-based SDS secret in one directory)."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc

from meshca.backoff import backoff_delay
from meshca.ca.bundle import BundleError, SpiffeBundle, decode_spiffe_bundle
from meshca.ca.crypto import CryptoError, parse_certificate_pem, split_pem_certificates
from meshca.ca.trust_service import FULL_METHOD
from meshca.files import write_atomic
from meshca.listen import format_address
from meshca.node.bootstrap import TOKEN_SDS_FILE, TOKEN_SECRET_NAME, TRUST_SECRET_NAME

TRUST_PEM_FILE = "meshca-trust.pem"  # the bundle as PEM: the sync's own anchor, google_grpc's root_certs
TRUST_SDS_FILE = "meshca-trust-sds.json"  # a DiscoveryResponse with one Secret, for Envoy's file-based SDS
_SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


class TrustSyncError(Exception):
    """The sync cannot go on; the message is one line naming the file, option or address."""


@dataclass(frozen=True)
class TrustSyncSettings:
    """Where meshca is, which name its certificate must carry, and the directory Envoy reads the bundle from.
    `initial_ca` is the day-one anchor, used only while the directory holds no bundle yet. `token_file`: also
    keep the SDS document that makes Envoy inject that token file (`meshca bootstrap --trust-dir --token-file`)."""

    endpoints: tuple[tuple[str, int], ...]
    server_name: str
    directory: Path
    initial_ca: Path | None = None
    timeout: float = 10.0
    token_file: Path | None = None

    @property
    def pem_path(self) -> Path:
        return self.directory / TRUST_PEM_FILE

    @property
    def sds_path(self) -> Path:
        return self.directory / TRUST_SDS_FILE


@dataclass(frozen=True)
class SyncResult:
    changed: bool
    roots: int
    sequence: int | None
    source: str  # host:port it came from

    @property
    def line(self) -> str:
        what = "updated" if self.changed else "unchanged"
        sequence = "" if self.sequence is None else f", sequence {self.sequence}"
        return f"trust sync: bundle {what}: {self.roots} root(s){sequence} from meshca at {self.source}"


def sds_document(bundle_pem: bytes) -> bytes:
    """The file-based SDS document Envoy reads: one validation-context Secret holding the bundle inline."""
    secret = {
        "@type": _SECRET_TYPE,
        "name": TRUST_SECRET_NAME,
        "validation_context": {"trusted_ca": {"inline_string": bundle_pem.decode("ascii")}},
    }
    return json.dumps({"resources": [secret]}, indent=2).encode() + b"\n"


def token_sds_document(token_file: Path) -> bytes:
    """The file-based SDS document naming the token file: Envoy reads the token itself (never copied here)."""
    secret = {"@type": _SECRET_TYPE, "name": TOKEN_SECRET_NAME, "generic_secret": {"secret": {"filename": str(token_file)}}}
    return json.dumps({"resources": [secret]}, indent=2).encode() + b"\n"


def write_token_sds(directory: Path, token_file: Path) -> bool:
    """Write DIR/meshca-token-sds.json (0644, temp file and rename) unless it already names `token_file`."""
    path = directory / TOKEN_SDS_FILE
    document = token_sds_document(token_file)
    try:
        if path.read_bytes() == document:
            return False
    except OSError:
        pass
    try:
        write_atomic(path, document, 0o644)
    except OSError as error:
        raise TrustSyncError(f"cannot write {error.filename}: {error.strerror}") from None
    return True


def anchor(settings: TrustSyncSettings) -> tuple[bytes, str]:
    """(the PEM bundle that must verify meshca, where it is from): the bundle held, else the day-one --ca."""
    path, label = settings.pem_path, str(settings.pem_path)
    if not path.exists():
        if settings.initial_ca is None:
            raise TrustSyncError(
                f"{path} does not exist yet; pass --ca FILE (meshca's root bundle) for the first sync"
            )
        path, label = settings.initial_ca, f"--ca {settings.initial_ca}"
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TrustSyncError(f"{label}: cannot read it ({error.strerror})") from None
    blocks = split_pem_certificates(data)
    try:
        for block in blocks:
            parse_certificate_pem(block)
    except CryptoError as error:
        raise TrustSyncError(f"{label}: {error}") from None
    if not blocks:
        raise TrustSyncError(f"{label}: holds no PEM certificate")
    return b"".join(blocks), label


def _tls_problem(host: str, port: int, server_name: str, anchor_pem: bytes, label: str, timeout: float) -> str | None:
    """Handshake as the sync's gRPC channel will, to tell 'cannot verify meshca' from 'cannot reach it'."""
    where = format_address(host, port)
    context = ssl.create_default_context(cadata=anchor_pem.decode("ascii"))
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=server_name):
                return None
    except ssl.SSLCertVerificationError as error:
        reason = error.verify_message or str(error)
        return (
            f"meshca at {where} cannot be verified with {label} ({reason}); "
            "no bundle is accepted over an unverified channel"
        )
    except ssl.SSLError as error:
        return f"TLS handshake with {where} failed ({error.reason or error}); is this meshca's gRPC port?"
    except OSError as error:
        return f"cannot reach meshca at {where}: {error.strerror or error}"


def fetch_bundle(settings: TrustSyncSettings) -> tuple[SpiffeBundle, str]:
    """The current bundle from the first meshca that answers over a channel verified with the anchor, and its
    address; TrustSyncError with every address's problem otherwise."""
    anchor_pem, label = anchor(settings)
    problems: list[str] = []
    for host, port in settings.endpoints:
        problem = _tls_problem(host, port, settings.server_name, anchor_pem, label, settings.timeout)
        if problem is not None:
            problems.append(problem)
            continue
        credentials = grpc.ssl_channel_credentials(root_certificates=anchor_pem)
        options = [
            ("grpc.ssl_target_name_override", settings.server_name),
            ("grpc.default_authority", settings.server_name),
        ]
        with grpc.secure_channel(format_address(host, port), credentials, options=options) as channel:
            try:
                data = channel.unary_unary(FULL_METHOD)(b"", timeout=settings.timeout)
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""  # type: ignore[attr-defined]
                problems.append(f"meshca at {format_address(host, port)}: {code.name}: {details}")
                continue
        try:
            return decode_spiffe_bundle(data), format_address(host, port)
        except BundleError as error:
            problems.append(f"meshca at {format_address(host, port)} sent an unusable bundle: {error}")
    raise TrustSyncError("; ".join(problems))


def write_bundle(settings: TrustSyncSettings, bundle: SpiffeBundle) -> bool:
    """Write the PEM bundle, then the SDS document (whose rename makes Envoy reload), each 0644 by temp file and
    rename; nothing when both already hold this bundle. True when something was written."""
    pem = bundle.pem
    sds = sds_document(pem)
    current = []
    for path in (settings.pem_path, settings.sds_path):
        try:
            current.append(path.read_bytes())
        except OSError:
            current.append(None)
    if current == [pem, sds]:
        return False
    if not settings.directory.is_dir():
        raise TrustSyncError(f"--dir: directory {settings.directory} does not exist")
    try:
        write_atomic(settings.pem_path, pem, 0o644)
        write_atomic(settings.sds_path, sds, 0o644)
    except OSError as error:
        raise TrustSyncError(f"cannot write {error.filename}: {error.strerror}") from None
    return True


def sync_once(settings: TrustSyncSettings) -> SyncResult:
    if settings.token_file is not None:  # needs no meshca: there for Envoy's start even while meshca is down
        write_token_sds(settings.directory, settings.token_file)
    bundle, source = fetch_bundle(settings)
    changed = write_bundle(settings, bundle)
    return SyncResult(changed, len(bundle.roots_pem), bundle.sequence, source)


def sync_loop(
    settings: TrustSyncSettings,
    interval: timedelta,
    logger: logging.Logger,
    stop: threading.Event,
    on_result: Callable[[SyncResult | None], None] | None = None,
) -> None:
    """Sync every `interval` until `stop` is set. A failed fetch keeps the bundle held, says so in one line and
    is retried after a doubling delay (1 s up to `interval`). Changes are logged; an unchanged bundle is not."""
    failures = 0
    while not stop.is_set():
        result: SyncResult | None
        try:
            result = sync_once(settings)
        except TrustSyncError as error:
            failures += 1
            result = None
            delay = backoff_delay(failures, timedelta(seconds=1), max(interval, timedelta(seconds=1)))
            held = f"keeping {settings.pem_path}" if settings.pem_path.exists() else "no bundle held yet"
            logger.error("trust sync failed (%s; attempt %d, retrying in %gs): %s",
                         held, failures, delay.total_seconds(), error)
        else:
            if failures:
                logger.info("trust sync: meshca reached again after %d failed attempt(s)", failures)
            failures, delay = 0, interval
            if result.changed:
                logger.info("%s", result.line)
        if on_result is not None:
            on_result(result)
        stop.wait(delay.total_seconds())
