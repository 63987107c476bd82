"""meshca's own TLS certificate for its gRPC port, replaced for new connections without a restart."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

import grpc

from meshca.backoff import backoff_delay
from meshca.ca.crypto import (
    CryptoError,
    certificate_issued_by,
    parse_certificate_pem,
    private_key_info,
    split_pem_certificates,
)
from meshca.clock import Clock, format_duration
from meshca.sds.rotation import RotationSettings, lifetime_start

RENEW_AT = 2 / 3  # of the certificate's lifetime: a third is left to retry a CA that is down
# How long a root must have been in the bundle before meshca serves a certificate under it: proxies take
# their trust in meshca from a synced copy of the bundle (`meshca trust sync`), which must have caught up.
DEFAULT_TRUST_PROPAGATION = RotationSettings().trust_propagation


@dataclass(frozen=True)
class ServerCredentials:
    certificate_chain_pem: bytes
    private_key_pem: bytes = field(repr=False)


class ServerCertificateCa(Protocol):
    """What issuing meshca's certificate needs from the CA (every meshca.ca.api.MeshCa fits)."""

    def issue_server_certificate(self, dns_names: Sequence[str], ip_addresses: Sequence[str],
                                 ttl: timedelta | None = None) -> _Issued: ...

    @property
    def active_intermediate_id(self) -> str: ...

    def trust_bundle_pem(self) -> bytes: ...


class _Issued(Protocol):
    chain_pem: bytes
    private_key_pem: bytes | None


def split_server_names(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of `server_names`."""
    import ipaddress

    dns_names, ips = [], []
    for name in names:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns_names.append(name)
    return dns_names, ips


def issue_server_credentials(ca: ServerCertificateCa, names: Sequence[str], ttl: timedelta) -> ServerCredentials:
    """A TLS certificate for meshca's own gRPC endpoint, from its own CA."""
    dns_names, ips = split_server_names(names)
    issued = ca.issue_server_certificate(dns_names, ips, ttl)
    assert issued.private_key_pem is not None
    return ServerCredentials(issued.chain_pem, issued.private_key_pem)


class ServerTlsError(ValueError):
    """A `tls:` file that cannot be served: `field` names the setting, `reason` says why (never key material)."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


class ServingCertificate:
    """The certificate grpc serves: `server_credentials()` are grpc's dynamic credentials, whose fetcher grpc
    calls before every new TLS handshake; after `replace`, the next handshake picks the new certificate up
    (connections already open keep theirs). `check` is run periodically (a job); this base never changes."""

    def __init__(self, credentials: ServerCredentials, logger: logging.Logger) -> None:
        self._log = logger
        self._lock = threading.Lock()
        self._current = credentials
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.serial_number, self.not_before, self.not_after = _facts(credentials)
        self.replacements = 0

    @property
    def current(self) -> ServerCredentials:
        with self._lock:
            return self._current

    def server_credentials(self) -> grpc.ServerCredentials:
        current = self.current
        initial = grpc.ssl_server_certificate_configuration(
            [(current.private_key_pem, current.certificate_chain_pem)]
        )
        return grpc.dynamic_ssl_server_credentials(initial, self._fetch)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc on its own threads for every new connection: hand a new certificate over once.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def replace(self, credentials: ServerCredentials, why: str) -> None:
        serial, not_before, not_after = _facts(credentials)
        config = grpc.ssl_server_certificate_configuration(
            [(credentials.private_key_pem, credentials.certificate_chain_pem)]
        )
        with self._lock:
            self._current, self._pending = credentials, config
            self.serial_number, self.not_before, self.not_after = serial, not_before, not_after
            self.replacements += 1
        self._log.info("server certificate replaced (%s): serial=%x not_after=%s", why, serial,
                       not_after.isoformat(timespec="seconds"))

    def check(self) -> None:
        """Nothing to renew: the certificate was given as it is."""


class IssuedServerCertificate(ServingCertificate):
    """meshca's certificate from its own CA, issued again at 2/3 of its lifetime and when the signing
    intermediate changes (so the chain it serves is the one the CA signs with). A failed issue is retried
    with backoff while the current certificate is served.

    A certificate under a root that entered the bundle less than `trust_propagation` ago (a root rotation
    done with `--now`) is held back, and the current one served, until the proxies' synced bundles hold
    that root; but never past 9/10 of the current certificate's life nor once its root left the bundle."""

    def __init__(
        self,
        ca: ServerCertificateCa,
        names: Sequence[str],
        ttl: timedelta,
        clock: Clock,
        logger: logging.Logger,
        renew_at: float = RENEW_AT,
        trust_propagation: timedelta = DEFAULT_TRUST_PROPAGATION,
    ) -> None:
        self._ca = ca
        self._names = tuple(names)
        self._ttl = ttl
        self._clock = clock
        self._renew_fraction = renew_at
        self._trust_propagation = trust_propagation
        self._intermediate = ca.active_intermediate_id
        # when each root was first seen in the bundle (roots there at start: at start, the safe side)
        self._roots_seen: dict[bytes, datetime] = {}
        self._note_roots(clock())
        super().__init__(issue_server_credentials(ca, self._names, ttl), logger)
        self._renew_at = self._due(clock())
        self._failures = 0
        self._retry_at: datetime | None = None
        self._held: tuple[ServerCredentials, datetime, datetime, str] | None = None  # pair, issued, serve from, why

    def _note_roots(self, now: datetime) -> list[bytes]:
        roots = split_pem_certificates(self._ca.trust_bundle_pem())
        for root in roots:
            self._roots_seen.setdefault(root, now)
        for gone in set(self._roots_seen) - set(roots):
            del self._roots_seen[gone]
        return roots

    @staticmethod
    def _root_of(chain_pem: bytes, roots: list[bytes]) -> bytes | None:
        last = split_pem_certificates(chain_pem)[-1]
        return next((root for root in roots if root == last or certificate_issued_by(last, root)), None)

    def _hold_until(self, credentials: ServerCredentials, now: datetime, roots: list[bytes]) -> datetime | None:
        """When a new pair may be served, if not now: its root is too new to be in every proxy's bundle."""
        new_root = self._root_of(credentials.certificate_chain_pem, roots)
        current_root = self._root_of(self.current.certificate_chain_pem, roots)
        if new_root is None or current_root is None or new_root == current_root:
            return None
        trusted_at = self._roots_seen[new_root] + self._trust_propagation
        latest = self.not_before + (self.not_after - self.not_before) * 0.9
        until = min(trusted_at, latest)
        return until if now < until else None

    @property
    def held_until(self) -> datetime | None:
        """When a certificate issued under a new root will be served (None: none is held back)."""
        return self._held[2] if self._held is not None else None

    @property
    def renew_at(self) -> datetime:
        return self._renew_at

    def _due(self, issued_at: datetime) -> datetime:
        start = lifetime_start(self.not_before, issued_at, self.not_after)
        return start + (self.not_after - start) * self._renew_fraction

    def check(self) -> None:
        now = self._clock()
        intermediate = self._ca.active_intermediate_id
        roots = self._note_roots(now)
        if self._held is not None:
            credentials, issued_at, serve_from, why = self._held
            current_root = self._root_of(self.current.certificate_chain_pem, roots)
            if intermediate == self._intermediate and now < serve_from and current_root is not None:
                return
            self._held = None
            if intermediate == self._intermediate:
                self.replace(credentials, why)
                self._renew_at = self._due(issued_at)
                return
        if now < self._renew_at and intermediate == self._intermediate:
            return
        if self._retry_at is not None and now < self._retry_at:
            return
        why = "renewal time" if intermediate == self._intermediate else f"signing intermediate is now {intermediate}"
        try:
            credentials = issue_server_credentials(self._ca, self._names, self._ttl)
        except Exception as error:  # the CA may be down: keep serving the current certificate
            self._failures += 1
            delay = backoff_delay(self._failures, timedelta(seconds=1), timedelta(seconds=60))
            self._retry_at = now + delay
            self._log.error("cannot renew the server certificate (%s; attempt %d, next in %s; it expires %s): %s",
                            why, self._failures, format_duration(delay),
                            self.not_after.isoformat(timespec="seconds"), error)
            return
        self._failures, self._retry_at = 0, None
        self._intermediate = intermediate
        hold_until = self._hold_until(credentials, now, roots)
        if hold_until is not None:
            self._held = (credentials, now, hold_until, f"{why}; its new root had time to reach the proxies")
            self._log.info("server certificate under a new root held back until %s, so proxies' synced bundles "
                           "hold that root first (%s)", hold_until.isoformat(timespec="seconds"), why)
            return
        self.replace(credentials, why)
        self._renew_at = self._due(now)


class FileServerCertificate(ServingCertificate):
    """An operator's certificate (`tls:` files), read again whenever either file changes, e.g. when
    cert-manager renews the Secret they are mounted from. A new pair that does not parse or whose key does
    not belong to the certificate is logged once and the last good one stays."""

    def __init__(self, chain_path: Path, key_path: Path, logger: logging.Logger) -> None:
        self._paths = (chain_path, key_path)
        signature = self._signature()
        credentials = read_server_credentials(chain_path, key_path)  # a broken pair at start is fatal
        super().__init__(credentials, logger)
        self._signature_seen = signature
        self._failed: tuple[object, ...] | None = None

    def _signature(self) -> tuple[object, ...]:
        signature: list[object] = []
        for path in self._paths:
            try:
                st = os.stat(path)  # follows the symlinks of a Secret volume: a new ..data is a new inode
            except OSError as error:
                signature.append(error.errno)
            else:
                signature.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(signature)

    def check(self) -> None:
        signature = self._signature()
        if signature in (self._signature_seen, self._failed):
            return
        try:
            credentials = read_server_credentials(*self._paths)
        except ServerTlsError as error:
            self._failed = signature
            self._log.error("server certificate files changed but cannot be used; serving the previous one: %s", error)
            return
        self._signature_seen, self._failed = signature, None
        if credentials != self.current:
            self.replace(credentials, f"{self._paths[0]} changed")


def read_server_credentials(chain_path: Path, key_path: Path) -> ServerCredentials:
    """The pair from the `tls:` files; ServerTlsError naming the file when one is unreadable, not PEM, or the key
    does not belong to the certificate."""
    pems = []
    for name, path in (("tls.certificate_chain", chain_path), ("tls.private_key", key_path)):
        try:
            pems.append(path.read_bytes())
        except OSError as error:
            raise ServerTlsError(name, f"cannot read {path}: {error.strerror or error}") from None
    chain, key = pems
    try:
        certificate = parse_certificate_pem(chain)
    except CryptoError as error:
        raise ServerTlsError("tls.certificate_chain", f"{chain_path}: {error}") from None
    try:
        key_spki = private_key_info(key).spki_der
    except CryptoError:  # the parser's message could quote the key material: say only what is wrong
        raise ServerTlsError("tls.private_key", f"{key_path} is not a PEM private key") from None
    if key_spki != certificate.public_key.spki_der:
        raise ServerTlsError("tls.private_key", f"{key_path} does not belong to the certificate in {chain_path}")
    return ServerCredentials(chain, key)


def _facts(credentials: ServerCredentials) -> tuple[int, datetime, datetime]:
    info = parse_certificate_pem(credentials.certificate_chain_pem)
    return info.serial_number, info.not_before, info.not_after
