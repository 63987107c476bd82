"""One workload's identity in the agent: a key made here, a certificate by CSR, renewed at meshca's policy, served over SDS."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from meshca.agent.csr import SignedCertificate, SignFailed
from meshca.agent.registration import TokenUnreadable, read_token
from meshca.agent.settings import WorkloadSettings
from meshca.backoff import backoff_delay
from meshca.ca import crypto
from meshca.clock import Clock, format_duration
from meshca.mesh.resources import DEFAULT_CERT_SECRET, ROOT_CA_SECRET, tls_certificate_secret, validation_context_secret
from meshca.sds.rotation import RenewalPolicy, hard_zone_start, lifetime_start, renewal_time
from meshca.xds.cache import SnapshotCache
from meshca.xds.snapshot import EncodedResource, Snapshot


class Signer(Protocol):
    """Signs a CSR for the identity `token` proves (meshca.agent.csr.CsrClient)."""

    async def sign(self, csr_pem: bytes, token: str, ttl: timedelta | None = None) -> SignedCertificate: ...


@dataclass(frozen=True)
class Retry:
    """How failed CSRs are retried: capped exponential backoff from `initial` to `cap`."""

    initial: timedelta = timedelta(seconds=1)
    cap: timedelta = timedelta(seconds=30)


@dataclass(frozen=True)
class Served:
    """What a workload's Envoy is being served: the certificate's facts and its key's fingerprint (never the key)."""

    spiffe_id: str
    serial_number: str
    not_before: datetime
    not_after: datetime
    received_at: datetime
    key_sha256: str  # SHA-256 of the public key's SubjectPublicKeyInfo DER, lowercase hex
    renew_at: datetime


def key_fingerprint(spki_der: bytes) -> str:
    return hashlib.sha256(spki_der).hexdigest()


class WorkloadIdentity:
    """Keeps one workload's `default` and `ROOTCA` secrets current in a SnapshotCache under the workload's name.

    Each CSR carries a key generated for it (an agent restart or a renewal never reuses one); the key lives
    only in this object and the snapshot. While meshca is unreachable the current certificate stays served
    and the CSR is retried with capped backoff (in the hard zone, at least every tenth of what is left).
    """

    def __init__(
        self,
        settings: WorkloadSettings,
        signer: Signer,
        cache: SnapshotCache,
        clock: Clock,
        logger: logging.Logger,
        policy: RenewalPolicy = RenewalPolicy(),
        retry: Retry = Retry(),
        ttl: timedelta | None = None,
        rng: random.Random | None = None,
        key_algorithm: crypto.KeyAlgorithm = crypto.KeyAlgorithm.EC_P256,
    ) -> None:
        self.settings = settings
        self._signer = signer
        self._cache = cache
        self._clock = clock
        self._log = logger
        self._policy = policy
        self._retry = retry
        self._ttl = ttl
        self._rng = rng if rng is not None else random.Random()
        self._algorithm = key_algorithm
        self._served: Served | None = None
        self._default: EncodedResource | None = None  # the `default` secret served (it holds the key)
        self._trust: tuple[bytes, bytes] | None = None  # (bundle, CRLs) followed from meshca (meshca.agent.trust)
        self._signed_bundle = b""  # the bundle of the last CSR response
        self._failures_in_row = 0
        # (issuer DN, serial) of the served leaf and its intermediates: what a followed CRL may list
        self._chain_ids: tuple[tuple[str, int], ...] = ()
        self._crls_checked = b""
        self._revoked_serial: str | None = None  # the served serial a CRL listed (renewed for once, not again)
        self._wake = asyncio.Event()  # ends run's wait: renew now
        self.issued = 0
        self.failures = 0
        self.last_failure: str | None = None  # why the CSRs fail, while they do (SignFailed's line: no token, no key)
        self.first_served = asyncio.Event()

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def served(self) -> Served | None:
        return self._served

    def _token(self) -> str:
        try:
            return read_token(self.settings.token_file, self.settings.token_no_symlink)
        except TokenUnreadable as error:
            raise SignFailed(f"token_file: {error.path}: {error.reason}") from None

    async def attempt(self) -> datetime:
        """Ask meshca for a certificate now; serve it on success. Returns when to try next."""
        key_pem = crypto.generate_private_key_pem(self._algorithm)
        key_sha256 = key_fingerprint(crypto.private_key_info(key_pem).spki_der)
        try:
            signed = await self._signer.sign(crypto.build_csr_pem(key_pem), self._token(), self._ttl)
        except SignFailed as error:
            return self._failed(str(error), error.retryable)
        now = self._clock()
        start = lifetime_start(signed.not_before, now, signed.not_after)
        renew_at = max(renewal_time(start, signed.not_after, self._policy, self._rng.uniform(-1, 1)), now)
        self._default = tls_certificate_secret(DEFAULT_CERT_SECRET, signed.chain_pem, key_pem)
        self._signed_bundle = signed.trust_bundle_pem
        self._publish()
        self._chain_ids = _chain_ids(signed.chain_pem)
        self._served = Served(
            signed.spiffe_id, signed.serial_number, signed.not_before, signed.not_after, now, key_sha256, renew_at
        )
        self.issued += 1
        if self._failures_in_row:
            self._log.info("workload %s: meshca signs again after %d failed attempts", self.name, self._failures_in_row)
        self._failures_in_row = 0
        self.last_failure = None
        self.first_served.set()
        self._log.info(
            "workload %s: serving certificate serial %s for %s, expires %s, key sha256 %s; renewal at %s",
            self.name, signed.serial_number, signed.spiffe_id, signed.not_after.isoformat(), key_sha256[:16],
            renew_at.isoformat(),
        )
        return renew_at

    def set_trust(self, bundle_pem: bytes, crls_pem: bytes) -> None:
        """Serve this bundle and these CRLs as ROOTCA from now on (also after later renewals), keeping `default`
        as it is; until the first call, ROOTCA is the bundle of the last CSR response, without CRLs."""
        if self._trust == (bundle_pem, crls_pem):
            return
        self._trust = (bundle_pem, crls_pem)
        if self._default is not None:
            self._publish()
        self._renew_if_revoked(crls_pem)

    def _renew_if_revoked(self, crls_pem: bytes) -> None:
        """When a CRL meshca sent lists the served leaf (`meshca revoke --certificate/--serial`) or its intermediate
        (revoked or tainted), wake `run` to renew at once with a new key, as meshca does for the leaves it holds.
        Once per served serial: if meshca refuses the CSR (the identity revoked too), the usual backoff applies."""
        served = self._served
        if served is None or crls_pem == self._crls_checked or served.serial_number == self._revoked_serial:
            return
        self._crls_checked = crls_pem
        listed = _listed(crls_pem, self._chain_ids)
        if listed is None:
            return
        issuer, serial = listed
        what = "its certificate" if f"{serial:x}" == served.serial_number else f"its intermediate (serial {serial:x})"
        self._log.warning(
            "workload %s: %s is on meshca's CRL (issuer %s): serial %s renewed now with a new key",
            self.name, what, issuer, served.serial_number,
        )
        self._revoked_serial = served.serial_number
        self._wake.set()

    def _publish(self) -> None:
        assert self._default is not None
        bundle, crls = self._trust if self._trust is not None else (self._signed_bundle, b"")
        self._cache.set_snapshot(self.name, Snapshot.build(
            [self._default, validation_context_secret(ROOT_CA_SECRET, bundle, crls)]
        ))

    def _failed(self, reason: str, retryable: bool) -> datetime:
        now = self._clock()
        self.failures += 1
        self._failures_in_row += 1
        self.last_failure = reason
        delay = backoff_delay(self._failures_in_row, self._retry.initial, self._retry.cap)
        served = self._served
        if served is not None:
            # A long backoff must not carry the certificate to its end: the next try is no later than the
            # hard zone, and inside it at least every tenth of what is left (but not more often than `initial`).
            start = lifetime_start(served.not_before, served.received_at, served.not_after)
            hard_zone = hard_zone_start(start, served.not_after, self._policy)
            if now < hard_zone:
                delay = min(delay, hard_zone - now)
            else:
                delay = min(delay, max(self._retry.initial, (served.not_after - now) / 10))
        if served is None:
            keeping = "nothing served yet"
        elif now < served.not_after:
            keeping = f"keeps serving serial {served.serial_number} (expires in {format_duration(served.not_after - now)})"
        else:
            keeping = f"serial {served.serial_number} has expired"
        self._log.log(
            logging.WARNING if retryable else logging.ERROR,
            "workload %s: CSR failed (%d in a row), %s; next try in %s: %s",
            self.name, self._failures_in_row, keeping, format_duration(delay), reason,
        )
        return now + delay

    async def run(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Keep the certificate current until cancelled (renewing early when a followed CRL lists it)."""
        while True:
            self._wake.clear()
            next_at = await self.attempt()
            served = self._served
            if served is not None and served.serial_number != self._revoked_serial:
                self._wake.clear()  # it woke for the certificate this attempt replaced
            await self._pause(sleep, max(0.0, (next_at - self._clock()).total_seconds()))

    async def _pause(self, sleep: Callable[[float], Awaitable[None]], seconds: float) -> None:
        """`sleep(seconds)`, ended early by `_wake`."""
        if self._wake.is_set():
            return
        sleeper = asyncio.ensure_future(sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
            if not sleeper.done():
                sleeper.cancel()
        if sleeper.done() and not waker.done():
            sleeper.result()  # what the sleep raised (a cancellation) goes on


def _chain_ids(chain_pem: bytes) -> tuple[tuple[str, int], ...]:
    """(issuer DN, serial) of each certificate of a chain; those that do not parse are left out."""
    ids = []
    for block in crypto.split_pem_certificates(chain_pem):
        try:
            info = crypto.parse_certificate_pem(block)
        except crypto.CryptoError:
            continue
        ids.append((info.issuer, info.serial_number))
    return tuple(ids)


def _listed(crls_pem: bytes, chain_ids: tuple[tuple[str, int], ...]) -> tuple[str, int] | None:
    """The first (issuer, serial) of `chain_ids` that a CRL of that issuer lists, or None."""
    for block in crypto.split_pem_crls(crls_pem):
        try:
            listed = crypto.crl_lists(block, chain_ids)
        except crypto.CryptoError:
            continue
        if listed is not None:
            return listed
    return None
