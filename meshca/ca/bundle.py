"""The trust bundle in the SPIFFE bundle format (a JWK Set of `use: x509-svid` CA keys), written and read."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from meshca.ca.crypto import (
    CryptoError,
    certificate_pem_from_der,
    parse_certificate_pem,
    split_pem_certificates,
    x509_authority_jwk,
)

MAX_BUNDLE_BYTES = 1024 * 1024


class BundleError(ValueError):
    """A SPIFFE bundle document that cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class SpiffeBundle:
    """The X.509 authorities of a trust domain (PEM, in the document's order) and its metadata."""

    roots_pem: tuple[bytes, ...]
    sequence: int | None = None
    refresh_hint: timedelta | None = None

    @property
    def pem(self) -> bytes:
        return b"".join(self.roots_pem)


def encode_spiffe_bundle(bundle_pem: bytes, sequence: int, refresh_hint: timedelta) -> bytes:
    """The SPIFFE bundle document (JSON) of a PEM bundle, its certificates in their order."""
    document: dict[str, Any] = {
        "keys": [x509_authority_jwk(block) for block in split_pem_certificates(bundle_pem)],
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": max(1, int(refresh_hint.total_seconds())),
    }
    return json.dumps(document, indent=2).encode() + b"\n"


def decode_spiffe_bundle(data: bytes) -> SpiffeBundle:
    """The X.509 authorities of a SPIFFE bundle document; JWT-SVID keys are ignored. BundleError when it is
    not a JWK Set, an x509-svid key does not carry exactly one CA certificate, or it has none."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle document is larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"bundle document is not JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise BundleError("bundle document is not a JWK Set (no 'keys' list)")
    roots: list[bytes] = []
    for index, key in enumerate(document["keys"]):
        if not isinstance(key, dict) or key.get("use") != "x509-svid":
            continue
        x5c = key.get("x5c")
        if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
            raise BundleError(f"keys[{index}]: an x509-svid key must carry exactly one certificate in x5c")
        try:
            pem = certificate_pem_from_der(base64.b64decode(x5c[0], validate=True))
            is_ca = parse_certificate_pem(pem).is_ca
        except (binascii.Error, CryptoError) as error:
            raise BundleError(f"keys[{index}].x5c[0]: {error}") from None
        if not is_ca:
            raise BundleError(f"keys[{index}]: the certificate is not a CA certificate")
        roots.append(pem)
    if not roots:
        raise BundleError("bundle document holds no X.509 authority (no key with use x509-svid)")
    sequence = document.get("spiffe_sequence")
    hint = document.get("spiffe_refresh_hint")
    return SpiffeBundle(
        tuple(roots),
        sequence if isinstance(sequence, int) and not isinstance(sequence, bool) else None,
        timedelta(seconds=hint) if isinstance(hint, int) and not isinstance(hint, bool) and hint > 0 else None,
    )
