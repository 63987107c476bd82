"""Vault's PKI mount as the Vault CA modes see it: one call with CA-flavoured errors, answers, issuing chains."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from meshca.ca import crypto
from meshca.ca.api import CaError, VaultAnswerInvalid
from meshca.ca.crypto import CertificateInfo, CryptoError
from meshca.ca.vault.session import VaultDenied, VaultError, VaultUnavailable

VaultMode = Literal["vault-intermediate", "vault-leaf"]
MODE_INTERMEDIATE: VaultMode = "vault-intermediate"
MODE_LEAF: VaultMode = "vault-leaf"

T = TypeVar("T")


class VaultCaller(Protocol):
    """What the Vault backends need from meshca.ca.vault.session.VaultSession: one call, errors mapped to VaultError."""

    def call(self, operation: Callable[[Any], T], what: str) -> T: ...


# Vault's answers, as raised by these backends: still the meshca.ca.vault.session classes (path, reason, status), and also
# CaErrors, so that callers that handle CA failures (stream open → UNAVAILABLE) handle them too.


class CaVaultError(VaultError, CaError):
    """Vault refused the request (e.g. 400: the role does not allow the SAN); `path` and `reason` say why."""


class CaVaultUnavailable(VaultUnavailable, CaError):
    """Vault down, sealed, timing out or failing (5xx): retryable; the CA keeps what it has."""


class CaVaultDenied(VaultDenied, CaError):
    """Vault refused meshca's token (403/401) even after logging in again."""


def _as_ca_error(error: VaultError) -> VaultError:
    if isinstance(error, CaError):
        return error
    kind = CaVaultUnavailable if isinstance(error, VaultUnavailable) else (
        CaVaultDenied if isinstance(error, VaultDenied) else CaVaultError)
    return kind(error.method, error.path, error.reason, error.status)


def vault_call(session: VaultCaller, operation: Callable[[Any], T], path: str) -> T:
    """session.call with Vault's errors raised as the CaError-flavoured classes above (no stack of hvac)."""
    try:
        return session.call(operation, path)
    except VaultError as error:
        raise _as_ca_error(error) from None


def response_data(response: Any, path: str) -> Mapping[str, Any]:
    """The `data` object of an hvac answer (a dict with the JSON adapter, a requests.Response otherwise)."""
    body = response.json() if hasattr(response, "json") and not isinstance(response, dict) else response
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise VaultAnswerInvalid(path, "the answer has no `data` object")
    return data


@dataclass(frozen=True)
class VaultChain:
    """Vault's issuing chain as meshca uses it: what leaves carry, and the roots peers trust."""

    issuing_pem: bytes  # the CA that signs (first of ca_chain)
    issuing: CertificateInfo
    carry_pem: bytes  # non-root CAs of the chain, issuing first: appended to every leaf (empty for a root mount)
    roots: tuple[tuple[bytes, CertificateInfo], ...]  # the self-signed certificates of the chain


def parse_vault_chain(blocks: Sequence[bytes], path: str, *, issued_pem: bytes = b"") -> VaultChain:
    """Split a ca_chain (issuing CA first, root last) into carried CAs and roots; checks every link.
    `issued_pem`, the certificate the answer is about, is left out (sign-intermediate lists it first)."""
    own = {b.strip() for b in crypto.split_pem_certificates(issued_pem)}
    pems = [b for block in blocks for b in crypto.split_pem_certificates(block) if b.strip() not in own]
    if not pems:
        raise VaultAnswerInvalid(path, "no CA certificate in the answer (is the PKI mount configured?)")
    try:
        infos = [crypto.parse_certificate_pem(p) for p in pems]
    except CryptoError as e:
        raise VaultAnswerInvalid(path, f"unparsable CA certificate: {e}") from None
    roots = tuple((p, i) for p, i in zip(pems, infos, strict=True) if crypto.is_self_signed(p))
    carried = [p for p in pems if not crypto.is_self_signed(p)]
    if not roots:
        raise VaultAnswerInvalid(
            path, "the CA chain holds no self-signed root; import the full chain (with the root) into the mount's issuer"
        )
    for child, parent in zip(carried, carried[1:] + [roots[0][0]]):  # nothing to check for a root mount
        if not crypto.certificate_issued_by(child, parent):
            raise VaultAnswerInvalid(path, "the CA chain is not in order (each certificate signed by the next)")
    if not all(i.is_ca for i in infos):
        raise VaultAnswerInvalid(path, "a certificate of the CA chain is not a CA certificate")
    return VaultChain(pems[0], infos[0], b"".join(carried), roots)
