"""Vault's CRLs in the Vault modes: fetched from every issuer of the PKI mounts, kept current, never an incomplete set."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from meshca.backoff import backoff_delay
from meshca.ca import crypto
from meshca.ca.api import CaError
from meshca.ca.crypto import CrlInfo, CryptoError
from meshca.ca.vault.pki import VaultCaller, vault_call
from meshca.ca.vault.session import VaultError
from meshca.clock import Clock


@dataclass(frozen=True)
class VaultCrlSettings:
    """Vault's CRLs are read again every `poll` (revocations made in Vault directly), at `refresh` of a CRL's
    validity at the latest (BoringSSL refuses a chain under an expired CRL), and at once when meshca's revocation
    list or CA changes. A failed read is retried after 1 s, 2 s, 4 s, ... up to `retry_cap`."""

    poll: timedelta = timedelta(seconds=60)
    refresh: float = 0.5
    retry_initial: timedelta = timedelta(seconds=1)
    retry_cap: timedelta = timedelta(seconds=30)

    def __post_init__(self) -> None:
        if self.poll <= timedelta(0) or not 0 < self.refresh < 1 or self.retry_initial <= timedelta(0):
            raise ValueError("poll and retry_initial must be positive and refresh a fraction between 0 and 1")


@dataclass(frozen=True)
class _Crl:
    pem: bytes
    info: CrlInfo


def _issuer_ids(answer: Any) -> list[str]:
    body = answer.json() if hasattr(answer, "json") and not isinstance(answer, dict) else answer
    data = body.get("data") if isinstance(body, dict) else None
    keys = data.get("keys") if isinstance(data, dict) else None
    return [str(k) for k in keys] if isinstance(keys, list) else []


def _text(answer: Any) -> bytes:
    if isinstance(answer, bytes):
        return answer
    if isinstance(answer, str):
        return answer.encode()
    return str(getattr(answer, "text", "")).encode()


class VaultCrls:
    """The CRLs of the CAs that Vault holds (`targets()`: its roots and intermediates in meshca's chains), read from
    every issuer of `mounts` (`LIST <mount>/issuers`, `GET <mount>/issuer/<id>/crl/pem`: both unauthenticated in
    Vault and OpenBao). `crls(now)` gives one current CRL per target, or None when any target has none (never
    fetched, Vault unreachable since start, or the last one past its nextUpdate): Envoy checks the CRL of every CA of
    a chain once any CRL is configured, so an incomplete set would refuse every handshake."""

    def __init__(self, session: VaultCaller, mounts: Sequence[str], targets: Callable[[], Sequence[bytes]],
                 clock: Clock, logger: logging.Logger, settings: VaultCrlSettings = VaultCrlSettings()) -> None:
        if not mounts:
            raise ValueError("at least one PKI mount to read CRLs from")
        self._session = session
        self._mounts = tuple(mounts)
        self._targets = targets
        self._clock = clock
        self._log = logger
        self._settings = settings
        self._lock = threading.Lock()
        self._fetched: tuple[_Crl, ...] = ()
        self._fetched_at: datetime | None = None
        self._failures = 0
        self._retry_at: datetime | None = None
        self._last_error: str | None = None
        self._missing_logged: frozenset[str] = frozenset()

    @property
    def mounts(self) -> tuple[str, ...]:
        return self._mounts

    @property
    def failures(self) -> int:
        """Consecutive failed reads (0 after a success)."""
        return self._failures

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def fetched_at(self) -> datetime | None:
        return self._fetched_at

    def _fetch_all(self) -> tuple[_Crl, ...]:
        found: list[_Crl] = []
        for mount in self._mounts:

            def issuers(client: Any, m: str = mount) -> Any:
                return client.secrets.pki.list_issuers(mount_point=m)

            def mount_crl(client: Any, m: str = mount) -> Any:
                return client.secrets.pki.read_crl(mount_point=m)

            ids = _issuer_ids(vault_call(self._session, issuers, f"{mount}/issuers"))
            if not ids:  # a Vault without multiple issuers: the mount's one CRL
                pems = [_text(vault_call(self._session, mount_crl, f"{mount}/crl/pem"))]
            else:
                pems = []
                for ident in ids:

                    def issuer_crl(client: Any, path: str = f"/v1/{mount}/issuer/{ident}/crl/pem") -> Any:
                        return client.adapter.get(path)

                    pems.append(_text(vault_call(self._session, issuer_crl, f"{mount}/issuer/{ident}/crl/pem")))
            for block in pems:
                for pem in crypto.split_pem_crls(block):
                    try:
                        found.append(_Crl(pem, crypto.parse_crl_pem(pem)))
                    except CryptoError as error:
                        raise CaError(f"{mount}: Vault answered a CRL that does not parse: {error}") from None
        return tuple(found)

    def refresh(self) -> bool:
        """Read Vault's CRLs now (one attempt); True when they changed. A failure keeps the last ones, is logged
        once (and once when Vault answers again) and backs off; it is never raised."""
        now = self._clock()
        try:
            fetched = self._fetch_all()
        except (VaultError, CaError) as error:
            with self._lock:
                self._failures += 1
                self._retry_at = now + backoff_delay(self._failures, self._settings.retry_initial,
                                                     self._settings.retry_cap)
                self._last_error = str(error)
                first = self._failures == 1
                have = bool(self._fetched)
            if first:
                kept = ("the last ones stay in force until their nextUpdate" if have
                        else "none was ever read, so meshca sends no CRLs")
                self._log.error("cannot read Vault's CRLs (%s); %s; retrying with backoff", error, kept)
            return False
        with self._lock:
            if self._failures:
                self._log.info("Vault's CRLs readable again after %d failed reads", self._failures)
            changed = [c.pem for c in fetched] != [c.pem for c in self._fetched]
            self._fetched, self._fetched_at = fetched, now
            self._failures, self._retry_at, self._last_error = 0, None, None
        return changed

    def due(self, now: datetime) -> bool:
        """Time to read again: never read, backoff over after a failure, `poll` passed, or a CRL at `refresh`."""
        with self._lock:
            if self._retry_at is not None:
                return now >= self._retry_at
            if self._fetched_at is None:
                return True
            if now >= self._fetched_at + self._settings.poll:
                return True
            return any(now >= self._refresh_point(c.info) for c in self._fetched)

    def next_due(self) -> datetime | None:
        """When `due` turns true next (None: it is already)."""
        with self._lock:
            if self._retry_at is not None:
                return self._retry_at
            if self._fetched_at is None:
                return None
            points = [self._fetched_at + self._settings.poll] + [self._refresh_point(c.info) for c in self._fetched]
            return min(points)

    def _refresh_point(self, info: CrlInfo) -> datetime:
        if info.next_update is None:
            return info.this_update + self._settings.poll
        return info.this_update + (info.next_update - info.this_update) * self._settings.refresh

    def crls(self, now: datetime) -> bytes | None:
        """One current CRL for every target CA (concatenated PEM, in the targets' order), then the other current
        CRLs read (e.g. of an issuer Vault replaced, whose leaves still live), or None when a target has none: then
        no CRL may be sent at all. The missing CAs are logged once."""
        with self._lock:
            fetched = self._fetched
        chosen: list[bytes] = []
        missing: list[str] = []
        for target in self._targets():
            match = [c for c in fetched if crypto.crl_issued_by(c.pem, target)
                     and (c.info.next_update is None or c.info.next_update > now)]
            if not match:
                missing.append(crypto.parse_certificate_pem(target).subject)
                continue
            chosen.append(max(match, key=lambda c: c.info.this_update).pem)
        if missing:
            if frozenset(missing) != self._missing_logged:
                self._missing_logged = frozenset(missing)
                self._log.error("no current CRL from Vault for %s: meshca sends no CRLs (an incomplete set would "
                                "refuse every handshake)", "; ".join(missing))
            return None
        if self._missing_logged:
            self._log.info("Vault's CRLs complete again: CRLs are sent")
            self._missing_logged = frozenset()
        others = [c.pem for c in fetched if c.pem not in chosen
                  and (c.info.next_update is None or c.info.next_update > now)]
        return b"".join(chosen + list(dict.fromkeys(others)))


def vault_revoke(session: VaultCaller, mount: str, *, certificate_pem: bytes | None = None,
                 serial: int | None = None) -> None:
    """`POST <mount>/revoke`: Vault lists the certificate on its issuer's CRL at once. By certificate (accepted for
    a leaf Vault did not store, `no_store`, as long as the mount's issuer signed it) or by serial (only a stored
    one). Raises the CaError-flavoured VaultErrors of meshca.ca.vault.pki."""
    if (certificate_pem is None) == (serial is None):
        raise ValueError("give exactly one of certificate_pem and serial")
    if certificate_pem is not None:
        data = {"certificate": certificate_pem.decode("ascii")}
    else:
        assert serial is not None
        text = f"{serial:x}"
        text = text.zfill(len(text) + len(text) % 2)
        data = {"serial_number": ":".join(text[i:i + 2] for i in range(0, len(text), 2))}
    path = f"{mount}/revoke"
    vault_call(session, lambda client: client.write_data(path, data=data), path)
