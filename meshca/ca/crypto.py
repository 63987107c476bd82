"""The only module that touches `cryptography.hazmat`: keys, certificates, CSRs as typed values."""

from __future__ import annotations

import base64
import enum
import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import jwt.algorithms
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import (
    dsa,
    ec,
    ed448,
    ed25519,
    padding,
    rsa,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


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


def x509_authority_jwk(certificate_pem: bytes) -> dict[str, Any]:
    """The JWK of a CA certificate as a SPIFFE trust bundle holds it: the public key's parameters,
    `use: x509-svid` and the certificate itself (DER, base64) as the only `x5c` entry."""
    cert = _load_certificate(certificate_pem)
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, rsa.RSAPublicKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    else:
        raise CryptoError("only EC and RSA CA keys can be published in a SPIFFE bundle")
    der = cert.public_bytes(serialization.Encoding.DER)
    return {**jwk, "use": "x509-svid", "x5c": [base64.b64encode(der).decode("ascii")]}


def certificate_pem_from_der(der: bytes) -> bytes:
    """A DER certificate as PEM; CryptoError when it does not parse."""
    try:
        x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise CryptoError(f"not a DER certificate: {e}") from None
    return _pem(b"CERTIFICATE", der)


class CryptoError(ValueError):
    """Input that is not a well-formed key, certificate or CSR, or keys that do not belong together."""


# --- typed values -------------------------------------------------------------------------------

_CURVE_ALGORITHMS = {"secp256r1": KeyAlgorithm.EC_P256, "secp384r1": KeyAlgorithm.EC_P384}
_RSA_ALGORITHMS = {2048: KeyAlgorithm.RSA_2048, 3072: KeyAlgorithm.RSA_3072}


@dataclass(frozen=True)
class PublicKeyInfo:
    """A public key as plain facts: `kind` is "ec", "rsa", "ed25519", "ed448", "dsa" or "unknown"."""

    kind: str
    bits: int
    curve: str | None
    algorithm: KeyAlgorithm | None  # set when it is a key type meshca itself generates
    spki_der: bytes = field(repr=False)  # SubjectPublicKeyInfo DER


@dataclass(frozen=True)
class CertificateRequest:
    """A parsed PKCS#10 CSR; `other_names` lists SAN kinds other than URI/DNS/IP/email (e.g. "DirectoryName")."""

    public_key: PublicKeyInfo
    signature_valid: bool
    requests_ca: bool  # basicConstraints CA:true requested
    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    emails: tuple[str, ...]
    other_names: tuple[str, ...]


@dataclass(frozen=True)
class CertificateInfo:
    """A parsed X.509 certificate as plain facts (aware UTC datetimes)."""

    subject: str  # RFC 4514
    issuer: str
    serial_number: int
    not_before: datetime
    not_after: datetime
    is_ca: bool
    path_length: int | None
    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    public_key: PublicKeyInfo
    fingerprint_sha256: str  # lowercase hex


@dataclass(frozen=True)
class DistinguishedName:
    """The few subject attributes meshca puts in CA certificates."""

    common_name: str
    organization: str | None = None
    serial_number: str | None = None  # the X.520 serialNumber attribute, keeps rotated CA names distinct


# --- parsing ------------------------------------------------------------------------------------


def _public_key_info(key: Any) -> PublicKeyInfo:
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return PublicKeyInfo("ec", key.curve.key_size, key.curve.name, _CURVE_ALGORITHMS.get(key.curve.name), spki)
    if isinstance(key, rsa.RSAPublicKey):
        return PublicKeyInfo("rsa", key.key_size, None, _RSA_ALGORITHMS.get(key.key_size), spki)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return PublicKeyInfo("ed25519", 256, None, None, spki)
    if isinstance(key, ed448.Ed448PublicKey):
        return PublicKeyInfo("ed448", 456, None, None, spki)
    if isinstance(key, dsa.DSAPublicKey):
        return PublicKeyInfo("dsa", key.key_size, None, None, spki)
    return PublicKeyInfo("unknown", 0, None, None, spki)


def _load_private_key(private_key_pem: bytes) -> Any:
    try:
        return serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CryptoError(f"not a PEM private key: {e}") from None


def _load_certificate(certificate_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(certificate_pem)
    except ValueError as e:
        raise CryptoError(f"not a PEM certificate: {e}") from None


def private_key_info(private_key_pem: bytes) -> PublicKeyInfo:
    """Facts about a PEM private key's public half."""
    return _public_key_info(_load_private_key(private_key_pem).public_key())


def _san_lists(san: x509.SubjectAlternativeName) -> tuple[tuple[str, ...], ...]:
    uris: list[str] = []
    dns: list[str] = []
    ips: list[str] = []
    emails: list[str] = []
    others: list[str] = []
    for name in san:
        if isinstance(name, x509.UniformResourceIdentifier):
            uris.append(name.value)
        elif isinstance(name, x509.DNSName):
            dns.append(name.value)
        elif isinstance(name, x509.IPAddress):
            ips.append(str(name.value))
        elif isinstance(name, x509.RFC822Name):
            emails.append(name.value)
        else:
            others.append(type(name).__name__)
    return tuple(uris), tuple(dns), tuple(ips), tuple(emails), tuple(others)


def parse_csr_pem(csr_pem: bytes) -> CertificateRequest:
    """Parse a PEM PKCS#10 CSR; raises CryptoError when it is not one (a bad signature is reported, not raised)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        extensions = csr.extensions
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CryptoError(f"not a PEM certificate signing request: {e}") from None
    try:
        signature_valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        signature_valid = False
    requests_ca = False
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    others: tuple[str, ...] = ()
    for ext in extensions:
        if isinstance(ext.value, x509.BasicConstraints):
            requests_ca = ext.value.ca
        elif isinstance(ext.value, x509.SubjectAlternativeName):
            uris, dns, ips, emails, others = _san_lists(ext.value)
    return CertificateRequest(_public_key_info(key), signature_valid, requests_ca, uris, dns, ips, emails, others)


def build_csr_pem(
    private_key_pem: bytes,
    *,
    uris: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    emails: Sequence[str] = (),
    is_ca: bool = False,
    common_name: str | None = None,
) -> bytes:
    """A PEM CSR signed by `private_key_pem`, with the given SANs (none by default) and optional CA:true request."""
    key = _load_private_key(private_key_pem)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ip_addresses]
    names += [x509.RFC822Name(e) for e in emails]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=not common_name)
    if is_ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, _signature_hash(key)).public_bytes(serialization.Encoding.PEM)


def parse_certificate_pem(certificate_pem: bytes) -> CertificateInfo:
    """Facts about the first certificate in a PEM blob; raises CryptoError when there is none."""
    cert = _load_certificate(certificate_pem)
    is_ca, path_length = False, None
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    try:
        extensions = cert.extensions
    except ValueError as e:
        raise CryptoError(f"certificate has malformed extensions: {e}") from None
    for ext in extensions:
        if isinstance(ext.value, x509.BasicConstraints):
            is_ca, path_length = ext.value.ca, ext.value.path_length
        elif isinstance(ext.value, x509.SubjectAlternativeName):
            uris, dns, ips, _, _ = _san_lists(ext.value)
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial_number=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        is_ca=is_ca,
        path_length=path_length,
        uris=uris,
        dns_names=dns,
        ip_addresses=ips,
        public_key=_public_key_info(cert.public_key()),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
    )


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----\r?\n?", re.DOTALL)


def split_pem_certificates(pem: bytes) -> list[bytes]:
    """The PEM certificate blocks of a bundle, in order, each ending with a newline (no parsing)."""
    blocks = []
    for match in _PEM_CERTIFICATE.finditer(pem):
        block = match.group(0)
        blocks.append(block if block.endswith(b"\n") else block + b"\n")
    return blocks


def certificate_issued_by(certificate_pem: bytes, issuer_certificate_pem: bytes) -> bool:
    """True when the first certificate of `certificate_pem` names the issuer's subject and carries a
    valid signature by the issuer's key (for CAs whose private key is not here, e.g. Vault's root)."""
    try:
        cert = _load_certificate(certificate_pem)
        issuer = _load_certificate(issuer_certificate_pem)
        cert.verify_directly_issued_by(issuer)
    except (CryptoError, ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def is_self_signed(certificate_pem: bytes) -> bool:
    """True for a certificate that verifies with its own public key (a root)."""
    return certificate_issued_by(certificate_pem, certificate_pem)


CRL_REASONS: tuple[str, ...] = tuple(flag.value for flag in x509.ReasonFlags if flag is not x509.ReasonFlags.remove_from_crl)


@dataclass(frozen=True)
class RevokedSerial:
    """One CRL entry: a certificate serial, when it was revoked, and its RFC 5280 reason name (CRL_REASONS)."""

    serial_number: int
    revoked_at: datetime
    reason: str = "unspecified"


@dataclass(frozen=True)
class CrlInfo:
    """A parsed CRL as plain facts."""

    issuer: str  # RFC 4514
    this_update: datetime
    next_update: datetime | None
    crl_number: int | None
    revoked: tuple[RevokedSerial, ...]


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----\r?\n.*?-----END X509 CRL-----\r?\n?", re.DOTALL)


def split_pem_crls(pem: bytes) -> list[bytes]:
    """The PEM CRL blocks of a concatenation, in order (no parsing)."""
    return [match.group(0) for match in _PEM_CRL.finditer(pem)]


def parse_crl_pem(crl_pem: bytes) -> CrlInfo:
    """Facts about a PEM CRL; raises CryptoError when it is not one."""
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError as e:
        raise CryptoError(f"not a PEM CRL: {e}") from None
    revoked = []
    for item in crl:
        try:
            reason = item.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
        except x509.ExtensionNotFound:
            reason = "unspecified"
        revoked.append(RevokedSerial(item.serial_number, item.revocation_date_utc, reason))
    try:
        number: int | None = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    return CrlInfo(crl.issuer.rfc4514_string(), crl.last_update_utc, crl.next_update_utc, number, tuple(revoked))


def crl_lists(crl_pem: bytes, certificates: Sequence[tuple[str, int]]) -> tuple[str, int] | None:
    """The first (issuer RFC 4514, serial) of `certificates` this PEM CRL lists (its issuer that one's), or None;
    looked up without building every entry (a CRL of thousands is checked in microseconds). CryptoError: not a CRL."""
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError as e:
        raise CryptoError(f"not a PEM CRL: {e}") from None
    issuer = crl.issuer.rfc4514_string()
    for certificate_issuer, serial in certificates:
        if certificate_issuer == issuer and crl.get_revoked_certificate_by_serial_number(serial) is not None:
            return certificate_issuer, serial
    return None


def crl_issued_by(crl_pem: bytes, issuer_certificate_pem: bytes) -> bool:
    """True when the CRL names the issuer's subject and carries a valid signature by its key."""
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
        issuer = _load_certificate(issuer_certificate_pem)
    except (CryptoError, ValueError):
        return False
    return crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]


# --- signing ------------------------------------------------------------------------------------


def _signature_hash(key: Any) -> hashes.HashAlgorithm | None:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _x509_name(name: DistinguishedName) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name.common_name)]
    if name.organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, name.organization))
    if name.serial_number:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, name.serial_number))
    return x509.Name(attributes)


def _ca_extensions(subject_key: Any, issuer_key: Any, uris: Sequence[str], path_length: int | None) -> list[x509.Extension[Any]]:
    ext = x509.Extension
    extensions: list[x509.Extension[Any]] = [
        ext(x509.BasicConstraints.oid, True, x509.BasicConstraints(ca=True, path_length=path_length)),
        ext(
            x509.KeyUsage.oid,
            True,
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
        ),
        ext(x509.SubjectKeyIdentifier.oid, False, x509.SubjectKeyIdentifier.from_public_key(subject_key)),
        ext(x509.AuthorityKeyIdentifier.oid, False, x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key)),
    ]
    if uris:
        # The trust domain's SPIFFE ID on CA certificates, as SPIRE does; the subject is non-empty.
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        extensions.append(ext(x509.SubjectAlternativeName.oid, False, san))
    return extensions


def _utc_seconds(when: datetime) -> datetime:
    if when.tzinfo is timezone.utc and not when.microsecond:
        return when
    if when.tzinfo is None:
        raise ValueError(f"datetime {when!r} must be timezone-aware")
    return when.astimezone(timezone.utc).replace(microsecond=0)


def self_signed_ca_certificate_pem(
    private_key_pem: bytes,
    *,
    subject: DistinguishedName,
    uris: Sequence[str],
    not_before: datetime,
    not_after: datetime,
    serial_number: int,
) -> bytes:
    """A self-signed root CA certificate (CA:true, no path length, keyCertSign+cRLSign) as PEM."""
    key = _load_private_key(private_key_pem)
    name = _x509_name(subject)
    cert = x509.CertificateBuilder(
        issuer_name=name,
        subject_name=name,
        public_key=key.public_key(),
        serial_number=serial_number,
        not_valid_before=_utc_seconds(not_before),
        not_valid_after=_utc_seconds(not_after),
        extensions=_ca_extensions(key.public_key(), key.public_key(), uris, None),
    ).sign(key, _signature_hash(key))
    return cert.public_bytes(serialization.Encoding.PEM)


# Minimal DER writer for the leaf hot path: cryptography's builder costs ~50 µs more per
# certificate than the signature itself, which alone would cap issuance below 10,000/s.


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _der_length(len(content)) + content


def _der_positive_integer(value: int) -> bytes:
    # bit_length // 8 + 1 bytes always leaves the sign bit clear and is minimal for value > 0.
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _der_time(when: datetime) -> bytes:
    # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050. f-strings beat strftime here.
    year = when.year
    rest = f"{when.month:02d}{when.day:02d}{when.hour:02d}{when.minute:02d}{when.second:02d}Z"
    if 1950 <= year < 2050:
        return b"\x17\x0d" + f"{year % 100:02d}{rest}".encode("ascii")
    return b"\x18\x0f" + f"{year:04d}{rest}".encode("ascii")


def _der_oid(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _tlv(0x06, bytes(body))


def _der_extension(oid_der: bytes, critical: bool, value_der: bytes) -> bytes:
    return _tlv(0x30, oid_der + (b"\x01\x01\xff" if critical else b"") + _tlv(0x04, value_der))


def _read_tlv(der: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the TLV at `offset`."""
    tag = der[offset]
    first = der[offset + 1]
    if first < 0x80:
        return tag, offset + 2, offset + 2 + first
    count = first & 0x7F
    length = int.from_bytes(der[offset + 2 : offset + 2 + count], "big")
    start = offset + 2 + count
    return tag, start, start + length


def _subject_key_identifier(spki_der: bytes) -> bytes:
    """RFC 5280 4.2.1.2 method (1): SHA-1 of the subjectPublicKey BIT STRING value."""
    _, seq_start, _ = _read_tlv(spki_der, 0)
    _, _, algorithm_end = _read_tlv(spki_der, seq_start)
    _, bits_start, bits_end = _read_tlv(spki_der, algorithm_end)
    return hashlib.sha1(spki_der[bits_start + 1 : bits_end]).digest()  # skip the unused-bits byte


def _pem(label: bytes, der: bytes) -> bytes:
    b64 = base64.b64encode(der)
    lines = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN " + label + b"-----\n" + lines + b"\n-----END " + label + b"-----\n"


_LEAF_KEY_USAGE = {
    rsa_key: x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    for rsa_key in (False, True)
}
_SAN_OID = x509.SubjectAlternativeName.oid
_SKI_OID = x509.SubjectKeyIdentifier.oid
_SAN_OID_DER = _der_oid(_SAN_OID)
_SKI_OID_DER = _der_oid(_SKI_OID)
_VERSION_V3 = b"\xa0\x03\x02\x01\x02"
_EMPTY_NAME = b"\x30\x00"
_PRIVATE_KEY_PEM = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
_SPKI_DER = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
# AlgorithmIdentifier DER for the signatures an issuer key makes (RFC 5758 3.2, RFC 4055 5).
_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
_ECDSA_SHA384 = bytes.fromhex("300a06082a8648ce3d040303")
_RSA_SHA256 = bytes.fromhex("300d06092a864886f70d01010b0500")


class Issuer:
    """A CA certificate and its private key, parsed once; signs CA, workload and server certificates.

    Immutable after construction and safe to share between threads.
    """

    def __init__(self, certificate_pem: bytes, private_key_pem: bytes) -> None:
        """Raises CryptoError if either PEM is malformed, the key is not the certificate's, or it is no CA."""
        cert = _load_certificate(certificate_pem)
        key = _load_private_key(private_key_pem)
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise CryptoError(f"CA key type {type(key).__name__} is not supported (EC or RSA only)")
        if key.public_key() != cert.public_key():
            raise CryptoError("the private key does not belong to the certificate")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except (x509.ExtensionNotFound, ValueError):
            bc = None
        if bc is None or not bc.ca:
            raise CryptoError("the certificate is not a CA certificate (basicConstraints CA:true missing)")
        self._cert = cert
        self._key = key
        self._info = parse_certificate_pem(certificate_pem)
        self._certificate_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._name = cert.subject
        self._hash = _signature_hash(key)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            self._signature_algorithm_der = _ECDSA_SHA384 if key.curve.key_size >= 384 else _ECDSA_SHA256
            ecdsa = ec.ECDSA(self._hash)
            self._sign: Callable[[bytes], bytes] = lambda tbs: key.sign(tbs, ecdsa)
        else:
            self._signature_algorithm_der = _RSA_SHA256
            pkcs1 = padding.PKCS1v15()
            self._sign = lambda tbs: key.sign(tbs, pkcs1, hashes.SHA256())
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        # TBS pieces identical for every leaf this issuer signs; built once.
        self._leaf_issuer_der = self._name.public_bytes()
        self._leaf_fixed_head = {
            rsa_key: _der_extension(
                _der_oid(x509.BasicConstraints.oid), True, x509.BasicConstraints(ca=False, path_length=None).public_bytes()
            )
            + _der_extension(_der_oid(x509.KeyUsage.oid), True, _LEAF_KEY_USAGE[rsa_key].public_bytes())
            + _der_extension(_der_oid(x509.ExtendedKeyUsage.oid), False, eku.public_bytes())
            for rsa_key in (False, True)
        }
        self._leaf_aki_ext = _der_extension(_der_oid(x509.AuthorityKeyIdentifier.oid), False, aki.public_bytes())
        self._aki = aki

    @property
    def certificate_pem(self) -> bytes:
        """The issuer's own certificate, PEM (cached)."""
        return self._certificate_pem

    @property
    def info(self) -> CertificateInfo:
        return self._info

    @property
    def key_info(self) -> PublicKeyInfo:
        return self._info.public_key

    def issued(self, certificate_pem: bytes) -> bool:
        """True when `certificate_pem` names this CA as issuer and carries a valid signature by its key."""
        try:
            _load_certificate(certificate_pem).verify_directly_issued_by(self._cert)
        except (CryptoError, ValueError, TypeError, InvalidSignature):
            return False
        return True

    def sign_ca_certificate(
        self,
        subject_public_key_pem: bytes,
        *,
        subject: DistinguishedName,
        uris: Sequence[str],
        not_before: datetime,
        not_after: datetime,
        serial_number: int,
        path_length: int | None,
    ) -> bytes:
        """A subordinate CA certificate (CA:true with `path_length`, keyCertSign+cRLSign) as PEM."""
        try:
            subject_key = serialization.load_pem_public_key(subject_public_key_pem)
        except (ValueError, UnsupportedAlgorithm) as e:
            raise CryptoError(f"not a PEM public key: {e}") from None
        cert = x509.CertificateBuilder(
            issuer_name=self._name,
            subject_name=_x509_name(subject),
            public_key=subject_key,
            serial_number=serial_number,
            not_valid_before=_utc_seconds(not_before),
            not_valid_after=_utc_seconds(not_after),
            extensions=_ca_extensions(subject_key, self._key.public_key(), uris, path_length),
        ).sign(self._key, self._hash)
        return cert.public_bytes(serialization.Encoding.PEM)

    def sign_leaf(
        self, public_key: PublicKeyInfo, *, uri: str, not_before: datetime, not_after: datetime, serial_number: int
    ) -> bytes:
        """An X.509-SVID leaf for `public_key` whose only identity is the URI SAN `uri`, as PEM.

        Empty subject; basicConstraints CA:false, keyUsage digitalSignature (+keyEncipherment for
        RSA keys), SAN critical; EKU serverAuth+clientAuth; SKI/AKI. Times are truncated to seconds.
        """
        return self._leaf_pem(public_key.kind == "rsa", public_key.spki_der, uri, not_before, not_after, serial_number)

    def _leaf_pem(
        self, is_rsa: bool, spki: bytes, uri: str, not_before: datetime, not_after: datetime, serial_number: int
    ) -> bytes:
        san_value = _tlv(0x30, _tlv(0x86, uri.encode("ascii")))  # GeneralNames { [6] IA5String }
        extensions = (
            self._leaf_fixed_head[is_rsa]
            + _der_extension(_SAN_OID_DER, True, san_value)
            + _der_extension(_SKI_OID_DER, False, _tlv(0x04, _subject_key_identifier(spki)))
            + self._leaf_aki_ext
        )
        tbs = _tlv(
            0x30,
            _VERSION_V3
            + _der_positive_integer(serial_number)
            + self._signature_algorithm_der
            + self._leaf_issuer_der
            + _tlv(0x30, _der_time(_utc_seconds(not_before)) + _der_time(_utc_seconds(not_after)))
            + _EMPTY_NAME
            + spki
            + _tlv(0xA3, _tlv(0x30, extensions)),
        )
        signature = self._sign(tbs)
        return _pem(b"CERTIFICATE", _tlv(0x30, tbs + self._signature_algorithm_der + _tlv(0x03, b"\x00" + signature)))

    def issue_leaf(
        self,
        *,
        uri: str,
        not_before: datetime,
        not_after: datetime,
        serial_number: int,
        key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
    ) -> tuple[bytes, bytes]:
        """A new key pair and its leaf certificate (see sign_leaf): (certificate PEM, PKCS#8 private key PEM)."""
        key = _generate(key_algorithm)
        spki = key.public_key().public_bytes(*_SPKI_DER)
        is_rsa = isinstance(key, rsa.RSAPrivateKey)
        cert_pem = self._leaf_pem(is_rsa, spki, uri, not_before, not_after, serial_number)
        return cert_pem, key.private_bytes(*_PRIVATE_KEY_PEM)

    def issue_server_certificate(
        self,
        *,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str],
        not_before: datetime,
        not_after: datetime,
        serial_number: int,
        key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
    ) -> tuple[bytes, bytes]:
        """A new key pair and a TLS server certificate (EKU serverAuth, DNS/IP SANs, empty subject)."""
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        try:
            names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ip_addresses]
        except ValueError as e:
            raise CryptoError(str(e)) from None
        if not names:
            raise CryptoError("a server certificate needs at least one DNS name or IP address")
        key = _generate(key_algorithm)
        is_rsa = isinstance(key, rsa.RSAPrivateKey)
        ext = x509.Extension
        cert = x509.CertificateBuilder(
            issuer_name=self._name,
            subject_name=x509.Name([]),
            public_key=key.public_key(),
            serial_number=serial_number,
            not_valid_before=_utc_seconds(not_before),
            not_valid_after=_utc_seconds(not_after),
            extensions=[
                ext(x509.BasicConstraints.oid, True, x509.BasicConstraints(ca=False, path_length=None)),
                ext(x509.KeyUsage.oid, True, _LEAF_KEY_USAGE[is_rsa]),
                ext(x509.ExtendedKeyUsage.oid, False, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])),
                ext(_SAN_OID, True, x509.SubjectAlternativeName(names)),
                ext(_SKI_OID, False, x509.SubjectKeyIdentifier.from_public_key(key.public_key())),
                ext(x509.AuthorityKeyIdentifier.oid, False, self._aki),
            ],
        ).sign(self._key, self._hash)
        return cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(*_PRIVATE_KEY_PEM)


    def sign_crl(
        self,
        revoked: Sequence[RevokedSerial],
        *,
        this_update: datetime,
        next_update: datetime,
        crl_number: int,
    ) -> bytes:
        """A v2 CRL signed by this CA listing `revoked` (AKI and CRL number set), as PEM."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._name)
            .last_update(_utc_seconds(this_update))
            .next_update(_utc_seconds(next_update))
            .add_extension(self._aki, critical=False)
            .add_extension(x509.CRLNumber(crl_number), critical=False)
        )
        for entry in revoked:
            item = x509.RevokedCertificateBuilder().serial_number(entry.serial_number).revocation_date(
                _utc_seconds(entry.revoked_at)
            )
            if entry.reason != "unspecified":  # RFC 5280 5.3.1: leave the reason code out rather than unspecified
                item = item.add_extension(x509.CRLReason(x509.ReasonFlags(entry.reason)), critical=False)
            builder = builder.add_revoked_certificate(item.build())
        return builder.sign(self._key, self._hash).public_bytes(serialization.Encoding.PEM)

# --- sealing (CA private keys at rest in a shared store) ------------------------------------------

SEALED_PREFIX = b"meshca-sealed-v1:"
SEAL_KEY_BYTES = 32
_NONCE_BYTES = 12


def seal(kek: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """`plaintext` encrypted and authenticated with AES-256-GCM under `kek` (32 bytes), bound to `aad`
    (e.g. the file name, so a sealed value cannot be moved to another name): prefix, random nonce, ciphertext."""
    nonce = os.urandom(_NONCE_BYTES)
    return SEALED_PREFIX + nonce + AESGCM(_seal_key(kek)).encrypt(nonce, plaintext, aad)


def unseal(kek: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of `seal(kek, plaintext, aad)`; CryptoError (naming no key material) when `sealed`
    is not a sealed value, or the KEK, the aad or the bytes differ from those it was sealed with."""
    key = _seal_key(kek)
    if not sealed.startswith(SEALED_PREFIX):
        raise CryptoError("not a sealed value (no meshca-sealed-v1 prefix): stored in clear or by something else")
    body = sealed[len(SEALED_PREFIX) :]
    if len(body) < _NONCE_BYTES + 16:
        raise CryptoError("sealed value is truncated")
    try:
        return AESGCM(key).decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], aad)
    except InvalidTag:
        raise CryptoError(
            "cannot unseal: wrong key-encryption key, or the sealed value was altered or moved to another name"
        ) from None


def _seal_key(kek: bytes) -> bytes:
    if len(kek) != SEAL_KEY_BYTES:
        raise CryptoError(f"the key-encryption key must be {SEAL_KEY_BYTES} bytes, got {len(kek)}")
    return kek
