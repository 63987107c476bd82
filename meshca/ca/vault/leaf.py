"""vault-leaf: Vault's PKI role signs every leaf (keys made here, only CSRs travel), rate-limited and retried."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from meshca.backoff import backoff_delay
from meshca.ca import crypto
from meshca.ca.api import (
    CaEvent,
    CaSettings,
    CaStatus,
    IssuedCertificate,
    IssuerExpired,
    MeshCa,
    RateLimited,
    RotationRefused,
    ServerCertificateUnsupported,
    SlotState,
    SlotStatus,
    VaultAnswerInvalid,
    VaultRefused,
)
from meshca.ca.crypto import CertificateInfo, CryptoError
from meshca.ca.policy import as_utc, check_csr, check_identity, leaf_validity
from meshca.ca.state import slot_id
from meshca.ca.vault.pki import (
    MODE_LEAF,
    CaVaultError,
    VaultCaller,
    VaultChain,
    VaultMode,
    parse_vault_chain,
    response_data,
    vault_call,
)
from meshca.ca.vault.session import VaultUnavailable
from meshca.clock import Clock
from meshca.identity.spiffe import SpiffeId

_URL = re.compile(r"https?://\S+")


@dataclass(frozen=True)
class VaultLeafOptions:
    """How vault-leaf talks to Vault: the PKI mount and role, the rate limit, retries and chain refresh."""

    mount: str = "pki"
    role: str = "meshca"
    max_rate: float = 50.0  # signing requests per second (token bucket)
    burst: int = 20
    max_wait: timedelta = timedelta(milliseconds=500)  # longest wait for a token before RateLimited
    retry_initial: timedelta = timedelta(milliseconds=100)
    retry_cap: timedelta = timedelta(seconds=1)
    retry_deadline: timedelta = timedelta(seconds=3)  # then VaultUnavailable: the rotation scheduler retries later
    chain_refresh: timedelta = timedelta(seconds=30)  # reload_if_changed reads Vault's CA chain at most this often

    def __post_init__(self) -> None:
        if not self.mount or not self.role or "/" in self.role:
            raise ValueError(f"mount and role must be non-empty (role without '/'), got {self.mount!r}, {self.role!r}")
        if not self.max_rate > 0 or self.burst < 1:
            raise ValueError(f"max_rate must be > 0 and burst >= 1, got {self.max_rate}, {self.burst}")
        for name in ("max_wait", "retry_initial", "retry_cap", "retry_deadline", "chain_refresh"):
            if getattr(self, name) < timedelta(0):
                raise ValueError(f"{name} must not be negative")
        if self.retry_initial > self.retry_cap:
            raise ValueError("retry_initial must not exceed retry_cap")


class TokenBucket:
    """`rate` tokens per second up to `burst`; `acquire` waits at most `max_wait` seconds, else RateLimited."""

    def __init__(self, rate: float, burst: int, max_wait: float, monotonic: Callable[[], float],
                 sleep: Callable[[float], None]) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_wait = max_wait
        self._monotonic = monotonic
        self._sleep = sleep
        self._tokens = float(burst)
        self._at = monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token (reserving a future one if none is left); returns the seconds waited."""
        with self._lock:
            now = self._monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            wait = max(0.0, (1.0 - self._tokens) / self._rate)
            if wait > self._max_wait:
                raise RateLimited(
                    f"more than {self._rate:g} Vault signing requests per second (burst {self._burst:g}); "
                    f"try again in {wait:.2f} s"
                )
            self._tokens -= 1.0
        if wait > 0:
            self._sleep(wait)
        return wait


@dataclass(frozen=True)
class _KnownRoot:
    pem: bytes
    info: CertificateInfo
    since: datetime
    retired_at: datetime | None = None


@dataclass(frozen=True)
class _LeafView:
    """What vault-leaf knows of Vault's CA, swapped as a whole."""

    chain: VaultChain
    since: datetime
    roots: tuple[_KnownRoot, ...]  # current first, then retired ones still trusted
    bundle_pem: bytes
    generation: int

    @property
    def issuing_id(self) -> str:
        return slot_id(self.chain.issuing.fingerprint_sha256)


@dataclass(frozen=True)
class VaultLeafStats:
    """Counters for metrics: leaves Vault signed, retried and failed calls, rate-limit refusals."""

    signed: int
    retries: int
    failures: int
    rate_limited: int


class VaultLeafCa:
    """`vault-leaf`: every leaf is signed by Vault's `<mount>/sign/<role>` (the role restricts URI SANs to
    the trust domain and sets no_store). Keys are generated here; only CSRs travel. Rate-limited, retried
    with capped backoff up to a short deadline; the trust bundle is Vault's root (cached, refreshed)."""

    mode: VaultMode = MODE_LEAF

    @property
    def signs_remotely(self) -> bool:
        """True: every leaf is a Vault call, which may wait seconds (callers keep it off the event loop)."""
        return True

    @property
    def can_rotate_intermediate(self) -> bool:
        """False: Vault signs every leaf; there is no meshca intermediate."""
        return False

    @property
    def can_rotate_root(self) -> bool:
        """False: the root lives in Vault."""
        return False

    def __init__(self, settings: CaSettings, session: VaultCaller, clock: Clock, logger: logging.Logger,
                 options: VaultLeafOptions = VaultLeafOptions(), *, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """Reads Vault's CA chain (needs Vault: raises VaultError when it cannot)."""
        self._settings = settings
        self._session = session
        self._clock = clock
        self._log = logger
        self._options = options
        self._monotonic = monotonic
        self._sleep = sleep
        self._bucket = TokenBucket(options.max_rate, options.burst, options.max_wait.total_seconds(), monotonic, sleep)
        self._lock = threading.Lock()
        self._counts = {"signed": 0, "retries": 0, "failures": 0, "rate_limited": 0}
        self._sign_path = f"{options.mount}/sign/{options.role}"
        self._chain_path = f"{options.mount}/ca_chain"
        chain = self._parse_chain_text(self._with_retries(self._read_chain_operation, self._chain_path),
                                       self._chain_path)
        now = as_utc(clock())
        roots = tuple(_KnownRoot(p, i, now) for p, i in chain.roots)
        self._view = _LeafView(chain, now, roots, b"".join(r.pem for r in roots), 1)
        self._last_refresh = monotonic()

    def __repr__(self) -> str:
        return f"VaultLeafCa(trust_domain={self.trust_domain!r}, path={self._sign_path!r}, issuer={self._view.issuing_id})"

    # --- accessors ---------------------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self._settings.trust_domain

    @property
    def settings(self) -> CaSettings:
        return self._settings

    @property
    def options(self) -> VaultLeafOptions:
        return self._options

    @property
    def generation(self) -> int:
        """1 at start, +1 whenever Vault's issuing CA is seen to change."""
        return self._view.generation

    @property
    def active_intermediate_id(self) -> str:
        """Slot id (fingerprint prefix) of Vault's issuing CA."""
        return self._view.issuing_id

    @property
    def intermediate_certificate_pem(self) -> bytes:
        return self._view.chain.issuing_pem

    @property
    def intermediate_not_after(self) -> datetime:
        return self._view.chain.issuing.not_after

    def trust_bundle_pem(self) -> bytes:
        """Vault's current root, then roots it used before while leaves they signed may live."""
        return self._view.bundle_pem

    def crl_signers(self) -> list[tuple[Any, Any]]:
        """None: Vault signs every leaf and every CRL (`vault_crl_issuers`)."""
        return []

    def vault_crl_issuers(self) -> list[bytes]:
        """The CA certificates whose CRL Vault signs: the issuing chain's CAs and every root still trusted."""
        view = self._view
        return list(dict.fromkeys(crypto.split_pem_certificates(view.chain.carry_pem) + [r.pem for r in view.roots]))

    def stats(self) -> VaultLeafStats:
        with self._lock:
            return VaultLeafStats(**self._counts)

    def status(self) -> CaStatus:
        view = self._view
        chain = view.chain
        slots: list[SlotStatus] = []
        for known in view.roots:
            state: SlotState = "active" if known.retired_at is None else "old"
            retire = None if known.retired_at is None else self._root_retire_after(known)
            slots.append(SlotStatus("root", slot_id(known.info.fingerprint_sha256), state, known.info.subject, None,
                                    known.info.not_before, known.info.not_after, known.retired_at or known.since,
                                    retire, known.info.fingerprint_sha256))
        top = slot_id(chain.roots[0][1].fingerprint_sha256)
        for pem in crypto.split_pem_certificates(chain.carry_pem):
            info = crypto.parse_certificate_pem(pem)
            slots.append(SlotStatus("intermediate", slot_id(info.fingerprint_sha256), "active", info.subject, top,
                                    info.not_before, info.not_after, view.since, None, info.fingerprint_sha256))
        return CaStatus.from_slots(self.trust_domain, view.generation, view.issuing_id, slots)

    # --- Vault's chain -----------------------------------------------------------------------

    def _read_chain_operation(self, client: Any) -> Any:
        return client.secrets.pki.read_ca_certificate_chain(mount_point=self._options.mount)

    def reload_if_changed(self) -> bool:
        """Read Vault's CA chain (at most every `chain_refresh`); True when the issuing CA changed. When Vault
        is unreachable this raises VaultError (the caller logs and counts it) and keeps the cached chain."""
        now_m = self._monotonic()
        with self._lock:
            if now_m - self._last_refresh < self._options.chain_refresh.total_seconds():
                return False
            self._last_refresh = now_m
        return self.refresh()

    def refresh(self) -> bool:
        """Read Vault's CA chain now (one attempt); True when the issuing CA changed."""
        text = vault_call(self._session, self._read_chain_operation, self._chain_path)
        return self._observe(self._parse_chain_text(text, self._chain_path), as_utc(self._clock()))

    def _parse_chain_text(self, text: Any, path: str) -> VaultChain:
        if not isinstance(text, str):
            text = getattr(text, "text", "")
        return parse_vault_chain([str(text).encode()], path)

    def _observe(self, chain: VaultChain, now: datetime) -> bool:
        """Adopt `chain`: a new issuing CA bumps the generation; roots Vault no longer uses stay in the bundle
        (old) until the leaves they may have signed expire. True when the issuing CA changed."""
        with self._lock:
            view = self._view
            changed = chain.issuing.fingerprint_sha256 != view.chain.issuing.fingerprint_sha256
            previous = {r.info.fingerprint_sha256: r for r in view.roots}
            current_fps = [i.fingerprint_sha256 for _, i in chain.roots]
            current = [
                replace(previous[i.fingerprint_sha256], retired_at=None) if i.fingerprint_sha256 in previous
                else _KnownRoot(p, i, now)
                for p, i in chain.roots
            ]
            retired = []
            for r in view.roots:
                if r.info.fingerprint_sha256 in current_fps:
                    continue
                r = r if r.retired_at is not None else replace(r, retired_at=now)
                if now < self._root_retire_after(r):
                    retired.append(r)
            roots = tuple(current + retired)
            if not changed and roots == view.roots:
                return False
            self._view = _LeafView(chain, now if changed else view.since, roots, b"".join(r.pem for r in roots),
                                   view.generation + 1)
        if changed:
            self._log.info("Vault's issuing CA changed: %s -> %s", slot_id(view.chain.issuing.fingerprint_sha256),
                           slot_id(chain.issuing.fingerprint_sha256))
        return changed

    def _root_retire_after(self, root: _KnownRoot) -> datetime:
        stopped = root.retired_at or root.info.not_after
        return min(stopped + self._settings.reload_grace + self._settings.leaf_ttl_max, root.info.not_after)

    # --- issuance ------------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _with_retries(self, operation: Callable[[Any], Any], path: str) -> Any:
        """session.call, retried on VaultUnavailable with capped exponential backoff until `retry_deadline`."""
        options = self._options
        start = self._monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return vault_call(self._session, operation, path)
            except VaultUnavailable as error:
                elapsed = self._monotonic() - start
                delay = backoff_delay(attempt, options.retry_initial, options.retry_cap).total_seconds()
                if elapsed + delay > options.retry_deadline.total_seconds():
                    self._count("failures")
                    self._log.warning("%s: Vault unavailable, giving up after %d attempts in %.1f s: %s",
                                      path, attempt, elapsed, error)
                    raise
                self._count("retries")
                self._log.warning("%s: Vault unavailable (attempt %d), retrying in %.2f s: %s", path, attempt, delay, error)
                self._sleep(delay)
            except Exception:
                self._count("failures")
                raise

    def vault_sign(self, csr_pem: bytes, uri: str, ttl: timedelta) -> tuple[bytes, VaultChain]:
        """Low level, no local checks: POST `<mount>/sign/<role>` with the CSR, `uri_sans`=`uri` and `ttl`,
        rate-limited and retried. Returns (leaf PEM, the chain Vault signed it with). Vault's refusals
        (role's allowed_uri_sans, ...) raise VaultError with the path and Vault's reason."""
        self._bucket_acquire()
        csr = csr_pem.decode("ascii")
        seconds = max(1, int(ttl.total_seconds()))

        def operation(client: Any) -> Any:
            return client.secrets.pki.sign_certificate(
                name=self._options.role, csr=csr, common_name="",
                extra_params={"uri_sans": uri, "ttl": f"{seconds}s", "exclude_cn_from_sans": True, "format": "pem"},
                mount_point=self._options.mount,
            )

        data = response_data(self._with_retries(operation, self._sign_path), self._sign_path)
        certificate = data.get("certificate")
        chain = data.get("ca_chain") or [data.get("issuing_ca") or ""]
        if not isinstance(certificate, str) or not isinstance(chain, list):
            raise VaultAnswerInvalid(self._sign_path, "the answer has no certificate / ca_chain")
        vault_chain = parse_vault_chain([str(c).encode() for c in chain], self._sign_path, issued_pem=certificate.encode())
        self._count("signed")
        self._observe(vault_chain, as_utc(self._clock()))
        return certificate.encode() + (b"" if certificate.endswith("\n") else b"\n"), vault_chain

    def _bucket_acquire(self) -> None:
        try:
            self._bucket.acquire()
        except RateLimited:
            self._count("rate_limited")
            raise

    def _not_after(self, now: datetime, ttl: timedelta | None) -> datetime:
        issuing = self._view.chain.issuing
        return leaf_validity(self._settings, now, issuing.not_before, issuing.not_after, ttl)[1]

    def _issue(self, spiffe_id: SpiffeId, csr_pem: bytes, spki_der: bytes, key_pem: bytes | None,
               ttl: timedelta | None) -> IssuedCertificate:
        now = as_utc(self._clock())
        try:
            not_after = self._not_after(now, ttl)
        except IssuerExpired:  # the cached issuing CA expired: Vault may have a new one
            self.refresh()
            not_after = self._not_after(now, ttl)
        try:
            cert_pem, chain = self.vault_sign(csr_pem, spiffe_id.uri, not_after - now)
        except CaVaultError as error:  # not VaultUnavailable (retryable) nor VaultDenied (token/policy)
            raise self._refused(error, spiffe_id) from None
        try:
            info = crypto.parse_certificate_pem(cert_pem)
        except CryptoError as e:
            raise VaultAnswerInvalid(self._sign_path, f"unparsable certificate: {e}") from None
        if info.uris != (spiffe_id.uri,) or info.dns_names or info.ip_addresses or info.is_ca:
            raise VaultAnswerInvalid(
                self._sign_path,
                f"the certificate names URIs {list(info.uris)}, DNS {list(info.dns_names)}, IPs {list(info.ip_addresses)} "
                f"(CA={info.is_ca}), expected only {spiffe_id.uri}: set use_csr_sans=false and "
                f"use_csr_common_name=false on role {self._options.role!r}",
            )
        if info.public_key.spki_der != spki_der:
            raise VaultAnswerInvalid(self._sign_path, "the certificate is not for the key in the CSR")
        if not crypto.certificate_issued_by(cert_pem, chain.issuing_pem):
            raise VaultAnswerInvalid(self._sign_path, "the certificate is not signed by the first CA of ca_chain")
        return IssuedCertificate(spiffe_id, cert_pem, cert_pem + chain.carry_pem, key_pem, info.serial_number,
                                 info.not_before, info.not_after)

    def _refused(self, error: CaVaultError, spiffe_id: SpiffeId) -> VaultRefused:
        """A refusal from Vault as meshca tells it to a caller; the log keeps Vault's path and status."""
        self._log.warning(
            "%s: Vault refused to sign for %s (HTTP %s): %s; meshca's own checks passed, so the Vault role "
            "and meshca's settings disagree (see docs/vault.md)", error.path, spiffe_id, error.status, error.reason,
        )
        if error.status is None:  # no answer from Vault: the request could not be made (the reason names the URL)
            cause = "the request to Vault could not be made"
        else:
            mount = re.escape(self._options.mount)
            cause = re.sub(rf"[\"']?\b{mount}/[^\s\"']*[\"']?", "its signing path", _URL.sub("Vault", error.reason))
        return VaultRefused(
            f"Vault refused to sign this certificate: {cause} (the CA's Vault role does not allow what meshca "
            f"allowed; retrying will not help)", error.path, error.status, error.reason,
        )

    def issue_workload(self, spiffe_id: SpiffeId, ttl: timedelta | None = None) -> IssuedCertificate:
        """A new local key (settings.leaf_key_algorithm, P-256 by default), a CSR with only the URI SAN, signed
        by Vault. Raises IdentityRejected, InvalidTtl, IssuerExpired, RateLimited, VaultRefused (Vault refused
        for good), VaultUnavailable (after `retry_deadline`), VaultDenied, VaultAnswerInvalid."""
        check_identity(spiffe_id, self._settings.trust_domain)
        key_pem = crypto.generate_private_key_pem(self._settings.leaf_key_algorithm)
        csr_pem = crypto.build_csr_pem(key_pem, uris=[spiffe_id.uri])
        return self._issue(spiffe_id, csr_pem, crypto.private_key_info(key_pem).spki_der, key_pem, ttl)

    def sign_csr(self, csr_pem: bytes, spiffe_id: SpiffeId, ttl: timedelta | None = None) -> IssuedCertificate:
        """The caller's CSR, checked with meshca.ca.policy's rules, sent to Vault with `uri_sans` = the caller's
        identity (the role must allow it and ignore the CSR's own SANs). Raises CsrRejected and as issue_workload."""
        check_identity(spiffe_id, self._settings.trust_domain)
        public_key = check_csr(csr_pem, spiffe_id)
        return self._issue(spiffe_id, csr_pem, public_key.spki_der, None, ttl)

    def issue_server_certificate(
        self, dns_names: Sequence[str], ip_addresses: Sequence[str], ttl: timedelta | None = None
    ) -> IssuedCertificate:
        """Not available in vault-leaf mode: the role only signs SPIFFE URIs."""
        raise ServerCertificateUnsupported(
            "vault-leaf mode does not issue meshca's own server certificate (the Vault role only allows SPIFFE "
            "URI SANs): set tls.certificate_chain and tls.private_key in the serve config"
        )

    def tick(self, now: datetime | None = None) -> list[CaEvent]:
        """Nothing to schedule: Vault rotates its own issuers (noticed by reload_if_changed)."""
        return []

    def rotate_intermediate(self, now: bool = False) -> list[CaEvent]:
        """Refused (RotationRefused): there is no meshca intermediate."""
        raise RotationRefused("in vault-leaf mode Vault signs every leaf: there is no meshca intermediate to rotate")

    def rotate_root(self, now: bool = False) -> list[CaEvent]:
        """Refused (RotationRefused): the root lives in Vault; rotate it there and meshca follows."""
        raise RotationRefused("the root of this CA lives in Vault: rotate it there; meshca follows the new root")


def _conforms(ca: VaultLeafCa) -> MeshCa:
    """vault-leaf is a MeshCa: tests/test_ca_api.py has mypy check this."""
    return ca
