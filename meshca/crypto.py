"""The only module that touches `cryptography.hazmat`: keys, certificates, CSRs as typed values."""

from __future__ import annotations

import enum
from typing import Any

import jwt.algorithms
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


class KeyAlgorithm(enum.Enum):
    """Key types meshca can generate; ECDSA P-256 is the default everywhere."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"


def _generate(algorithm: KeyAlgorithm) -> Any:
    if algorithm is KeyAlgorithm.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm is KeyAlgorithm.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm is KeyAlgorithm.RSA_2048:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm is KeyAlgorithm.RSA_3072:
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ValueError(f"unsupported key algorithm {algorithm!r}")


def generate_private_key_pem(algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> bytes:
    """A new private key as unencrypted PKCS#8 PEM."""
    return _generate(algorithm).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(private_key_pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo PEM of a PEM private key."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_jwk(public_pem: bytes, key_id: str) -> dict[str, Any]:
    """A JWK (RFC 7517) dict for an EC or RSA public key, with `kid`, `use` and `alg` set."""
    key = serialization.load_pem_public_key(public_pem)
    if isinstance(key, ec.EllipticCurvePublicKey):
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
        alg = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}[jwk["crv"]]
    elif isinstance(key, rsa.RSAPublicKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
        alg = "RS256"
    else:
        raise ValueError("only EC and RSA public keys can be published as JWK")
    return {**jwk, "kid": key_id, "use": "sig", "alg": alg}
