"""Internal CA: chain validity, SVID profile, TTL policy, CSR policy and on-disk state handling."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import stat
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from fakes import T0, FakeClock

from meshca.ca import crypto
from meshca.ca.api import (
    CaAlreadyExists,
    CaSettings,
    CaStateError,
    CsrRejected,
    IdentityRejected,
    InvalidSettings,
    InvalidTtl,
    IssuerExpired,
)
from meshca.ca.crypto import KeyAlgorithm
from meshca.ca.internal import CertificateAuthority
from meshca.ca.state import (
    JOURNAL_FILE,
    LOCK_FILE,
    METADATA_FILE,
    V1_INTERMEDIATE_CERT_FILE,
    V1_INTERMEDIATE_KEY_FILE,
    V1_ROOT_CERT_FILE,
    V1_ROOT_KEY_FILE,
    slot_files,
)
from meshca.identity.spiffe import SpiffeId

TD = "example.org"
WORKLOAD = SpiffeId.for_service_account(TD, "shop", "frontend")
OTHER = SpiffeId.for_service_account(TD, "shop", "payments")

# Made with `openssl req -new -newkey rsa:1024` / `-newkey ed25519`: key types the CA must refuse.
RSA_1024_CSR = b"""-----BEGIN CERTIFICATE REQUEST-----
MIIBTjCBuAIBADAPMQ0wCwYDVQQDDAR3ZWFrMIGfMA0GCSqGSIb3DQEBAQUAA4GN
ADCBiQKBgQDP+o7xg399wRz62Ty8OJI8OuTl9U/aFR5uY+kO5IhQ1XVJRUQAUJR9
FuoX0W27HJT/vEwgqzgJnWilC5lIVtlQq2LuLJOggr3cC1HGtIeKC1tpUxBvt6eF
vADO4PslbeVADbchL3qkX23nMkK3Wd7E9Kz2oALQd5KGT5AKy/TtvQIDAQABoAAw
DQYJKoZIhvcNAQELBQADgYEAzJfEr5tflyN7ONxv8ghtPgTsCwPirehptowdHkVn
xD14WE2ho1zirLveojZasvsCBNFZ4Q/u8+gFsnVT/WoPZ+nqDrhDx1fgAxtiTr5l
1JVizb9Qv7e1ta8I8IzUJ/6QGyF5f2gNCwP7KT+TSALkzIWIrj73qwt4yXKaRlZO
oYc=
-----END CERTIFICATE REQUEST-----
"""
ED25519_CSR = b"""-----BEGIN CERTIFICATE REQUEST-----
MIGMMEACAQAwDTELMAkGA1UEAwwCZWQwKjAFBgMrZXADIQD8fEJ2x+jCchrV0J1W
cL4MEUjMA9ILvQZFFAvKSIZoy6AAMAUGAytlcANBAK0iAC5YGoomD3FsU3sU5nH7
zV4u7E3+y9QfXi0vQlNc9F+O9ZNi7h0MFhcOmEfTu6L4FVBJ1klaw3pvdpnjwgo=
-----END CERTIFICATE REQUEST-----
"""


@pytest.fixture
def ca(tmp_path: Path, clock: FakeClock) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", CaSettings(TD), clock)


def load_certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def verify_client_chain(bundle_pem: bytes, chain_pem: bytes, at: datetime) -> x509.verification.VerifiedClient:
    leaf, *intermediates = load_certs(chain_pem)
    verifier = PolicyBuilder().store(Store(load_certs(bundle_pem))).time(at).build_client_verifier()
    return verifier.verify(leaf, intermediates)


def ext(cert: x509.Certificate, kind: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def tamper_signature(pem: bytes) -> bytes:
    """Flip a bit near the end of the DER (inside the signature value) and re-wrap as PEM."""
    lines = pem.strip().splitlines()
    der = bytearray(base64.b64decode(b"".join(lines[1:-1])))
    der[-3] ^= 0x01
    body = base64.b64encode(bytes(der))
    wrapped = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return lines[0] + b"\n" + wrapped + b"\n" + lines[-1] + b"\n"


# --- workload leaves ------------------------------------------------------------------------------


def test_workload_chain_verifies_to_root_with_spiffe_uri_as_only_identity(ca: CertificateAuthority) -> None:
    issued = ca.issue_workload(WORKLOAD)

    verified = verify_client_chain(ca.trust_bundle_pem(), issued.chain_pem, T0)

    assert verified.subjects == [x509.UniformResourceIdentifier(WORKLOAD.uri)]
    assert len(verified.chain) == 3
    assert issued.spiffe_id == WORKLOAD


def test_leaf_follows_x509_svid_profile(ca: CertificateAuthority) -> None:
    issued = ca.issue_workload(WORKLOAD)
    leaf, intermediate = load_certs(issued.chain_pem)

    assert leaf.subject == x509.Name([])
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(WORKLOAD.uri)]
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature and not ku.value.key_encipherment and not ku.value.key_cert_sign
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ext(leaf, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    assert (
        ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier
        == ext(intermediate, x509.SubjectKeyIdentifier).value.digest
    )
    assert leaf.serial_number == issued.serial_number > 2**64


def test_issued_values_match_certificate_and_key(ca: CertificateAuthority) -> None:
    issued = ca.issue_workload(WORKLOAD)
    leaf = x509.load_pem_x509_certificate(issued.certificate_pem)

    assert issued.chain_pem == issued.certificate_pem + ca.intermediate_certificate_pem
    assert leaf.not_valid_before_utc == issued.not_before
    assert leaf.not_valid_after_utc == issued.not_after
    assert issued.private_key_pem is not None
    key_info = crypto.private_key_info(issued.private_key_pem)
    assert key_info.algorithm is KeyAlgorithm.EC_P256
    assert key_info.spki_der == crypto.parse_certificate_pem(issued.certificate_pem).public_key.spki_der


def test_private_key_never_in_repr_or_str(ca: CertificateAuthority) -> None:
    issued = ca.issue_workload(WORKLOAD)
    assert issued.private_key_pem is not None

    for text in (repr(issued), str(issued)):
        assert "PRIVATE KEY" not in text
        assert issued.private_key_pem.decode() not in text
        assert "private_key_pem" not in text


def test_serials_are_random_positive_and_unique(ca: CertificateAuthority) -> None:
    serials = {ca.issue_workload(WORKLOAD).serial_number for _ in range(200)}
    assert len(serials) == 200
    assert all(2**64 < s < 2**159 for s in serials)


def test_spiffe_id_from_another_trust_domain_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(IdentityRejected, match="other.org") as info:
        ca.issue_workload(SpiffeId.for_service_account("other.org", "a", "b"))
    assert isinstance(info.value, ValueError)
    with pytest.raises(IdentityRejected, match="trust domain itself"):
        ca.issue_workload(SpiffeId(TD))


# --- validity window ------------------------------------------------------------------------------


def test_default_ttl_is_one_hour_and_not_before_backdated_60s(ca: CertificateAuthority, clock: FakeClock) -> None:
    clock.now = T0 + timedelta(minutes=10, microseconds=123456)
    now = T0 + timedelta(minutes=10)

    issued = ca.issue_workload(WORKLOAD)

    assert issued.not_before == now - timedelta(seconds=60)
    assert issued.not_after == now + timedelta(hours=1)
    # The backdated window is real: a peer whose clock lags 30 s accepts it, 90 s does not.
    verify_client_chain(ca.trust_bundle_pem(), issued.chain_pem, now - timedelta(seconds=30))
    with pytest.raises(VerificationError):
        verify_client_chain(ca.trust_bundle_pem(), issued.chain_pem, now - timedelta(seconds=90))


def test_ttl_and_backdate_settings_are_honoured(tmp_path: Path, clock: FakeClock) -> None:
    settings = CaSettings(TD, leaf_ttl_default=timedelta(hours=4), backdate=timedelta(seconds=5))
    clock.now = T0 + timedelta(hours=1)
    ca = CertificateAuthority.init(tmp_path / "ca", settings, clock)

    default = ca.issue_workload(WORKLOAD)
    explicit = ca.issue_workload(WORKLOAD, ttl=timedelta(minutes=30))

    assert (default.not_before, default.not_after) == (clock.now - timedelta(seconds=5), clock.now + timedelta(hours=4))
    assert explicit.not_after == clock.now + timedelta(minutes=30)


def test_ttl_below_minimum_is_rejected_naming_ttl_and_bounds(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidTtl) as info:
        ca.issue_workload(WORKLOAD, ttl=timedelta(minutes=1))
    message = str(info.value)
    assert "TTL 1m is below the minimum 5m (allowed 5m to 90d" in message
    with pytest.raises(InvalidTtl):
        ca.issue_workload(WORKLOAD, ttl=timedelta(0))


def test_ttl_above_maximum_is_clamped(tmp_path: Path, clock: FakeClock) -> None:
    settings = CaSettings(TD, leaf_ttl_max=timedelta(days=2), leaf_ttl_default=timedelta(hours=1))
    ca = CertificateAuthority.init(tmp_path / "ca", settings, clock)

    issued = ca.issue_workload(WORKLOAD, ttl=timedelta(days=10))

    assert issued.not_after == T0 + timedelta(days=2)


def test_ttl_is_capped_at_intermediate_expiry(tmp_path: Path, clock: FakeClock) -> None:
    settings = CaSettings(TD, intermediate_ttl=timedelta(hours=2))
    ca = CertificateAuthority.init(tmp_path / "ca", settings, clock)
    intermediate = x509.load_pem_x509_certificate(ca.intermediate_certificate_pem)
    assert intermediate.not_valid_after_utc == T0 + timedelta(hours=2) == ca.intermediate_not_after

    clock.now = T0 + timedelta(hours=1, minutes=30)
    issued = ca.issue_workload(WORKLOAD)  # default 1 h would end at 2h30

    assert issued.not_after == intermediate.not_valid_after_utc
    leaf = x509.load_pem_x509_certificate(issued.certificate_pem)
    assert leaf.not_valid_after_utc == T0 + timedelta(hours=2)
    verify_client_chain(ca.trust_bundle_pem(), issued.chain_pem, clock.now)

    clock.now = T0 + timedelta(hours=2)
    with pytest.raises(IssuerExpired, match="rotate"):
        ca.issue_workload(WORKLOAD)


def test_naive_clock_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        CertificateAuthority.init(tmp_path / "ca", CaSettings(TD), lambda: datetime(2026, 1, 1))


# --- CA certificates and key types ----------------------------------------------------------------


def test_root_and_intermediate_profiles(ca: CertificateAuthority) -> None:
    (root,) = load_certs(ca.trust_bundle_pem())
    intermediate = x509.load_pem_x509_certificate(ca.intermediate_certificate_pem)

    root.verify_directly_issued_by(root)
    intermediate.verify_directly_issued_by(root)
    assert ext(root, x509.BasicConstraints).critical
    assert ext(root, x509.BasicConstraints).value == x509.BasicConstraints(ca=True, path_length=None)
    assert ext(intermediate, x509.BasicConstraints).value == x509.BasicConstraints(ca=True, path_length=0)
    for cert in (root, intermediate):
        ku = ext(cert, x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
        assert list(ext(cert, x509.SubjectAlternativeName).value) == [x509.UniformResourceIdentifier(f"spiffe://{TD}")]
    assert root.not_valid_before_utc == T0 - timedelta(seconds=60)
    assert root.not_valid_after_utc == T0 + timedelta(days=365)
    assert intermediate.not_valid_after_utc == T0 + timedelta(days=30)


@pytest.mark.parametrize(
    ("algorithm", "kind", "bits"),
    [
        (KeyAlgorithm.EC_P256, "ec", 256),
        (KeyAlgorithm.EC_P384, "ec", 384),
        (KeyAlgorithm.RSA_2048, "rsa", 2048),
        (KeyAlgorithm.RSA_3072, "rsa", 3072),
    ],
)
def test_ca_key_algorithms(tmp_path: Path, clock: FakeClock, algorithm: KeyAlgorithm, kind: str, bits: int) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", CaSettings(TD, key_algorithm=algorithm), clock)
    issued = ca.issue_workload(WORKLOAD)

    for pem in (ca.trust_bundle_pem(), ca.intermediate_certificate_pem):
        key = crypto.parse_certificate_pem(pem).public_key
        assert (key.kind, key.bits) == (kind, bits)
    assert crypto.parse_certificate_pem(issued.certificate_pem).public_key.algorithm is KeyAlgorithm.EC_P256
    verified = verify_client_chain(ca.trust_bundle_pem(), issued.chain_pem, T0)
    assert verified.subjects == [x509.UniformResourceIdentifier(WORKLOAD.uri)]
    assert CertificateAuthority.load(tmp_path / "ca", clock).settings.key_algorithm is algorithm


def test_rsa_leaf_keys_get_key_encipherment(tmp_path: Path, clock: FakeClock) -> None:
    settings = CaSettings(TD, leaf_key_algorithm=KeyAlgorithm.RSA_2048)
    ca = CertificateAuthority.init(tmp_path / "ca", settings, clock)

    leaf = x509.load_pem_x509_certificate(ca.issue_workload(WORKLOAD).certificate_pem)

    ku = ext(leaf, x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment
    verify_client_chain(ca.trust_bundle_pem(), ca.issue_workload(WORKLOAD).chain_pem, T0)


def test_settings_are_validated() -> None:
    with pytest.raises(InvalidSettings, match="min <= default <= max"):
        CaSettings(TD, leaf_ttl_default=timedelta(minutes=1))
    with pytest.raises(InvalidSettings, match="intermediate_ttl"):
        CaSettings(TD, root_ttl=timedelta(days=10), intermediate_ttl=timedelta(days=20))
    with pytest.raises(InvalidSettings, match="trust domain"):
        CaSettings("Not A Domain")


# --- server certificate ---------------------------------------------------------------------------


def test_server_certificate_for_meshca_endpoint(ca: CertificateAuthority) -> None:
    issued = ca.issue_server_certificate(["meshca.internal", "localhost"], ["127.0.0.1"], timedelta(days=7))
    leaf, *intermediates = load_certs(issued.chain_pem)
    store = Store(load_certs(ca.trust_bundle_pem()))

    assert issued.spiffe_id is None and issued.private_key_pem is not None
    assert issued.not_after == T0 + timedelta(days=7)
    for subject in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        PolicyBuilder().store(store).time(T0).build_server_verifier(subject).verify(leaf, intermediates)
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ext(leaf, x509.BasicConstraints).value.ca is False
    with pytest.raises(VerificationError):  # not usable as a client (workload) certificate
        PolicyBuilder().store(store).time(T0).build_client_verifier().verify(leaf, intermediates)


def test_server_certificate_rejects_bad_names(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="at least one"):
        ca.issue_server_certificate([], [], timedelta(days=1))
    with pytest.raises(ValueError, match="not a valid DNS name"):
        ca.issue_server_certificate(["bad name"], [], timedelta(days=1))
    with pytest.raises(ValueError, match="not a valid IP address"):
        ca.issue_server_certificate([], ["300.1.1.1"], timedelta(days=1))


# --- state directory ------------------------------------------------------------------------------


def write_v1_state(state_dir: Path, settings: CaSettings, now: datetime) -> None:
    """A format-1 state directory exactly as `CertificateAuthority.init` wrote it before slots existed."""
    os.makedirs(state_dir, 0o700, exist_ok=True)
    not_before = now - settings.backdate
    td = settings.trust_domain
    td_uri = SpiffeId(td).uri
    root_key = crypto.generate_private_key_pem(settings.key_algorithm)
    root_serial = 0x4000_0000_0000_0000_0000_0000_0000_0001
    root_pem = crypto.self_signed_ca_certificate_pem(
        root_key,
        subject=crypto.DistinguishedName("meshca root CA", organization=td, serial_number=f"{root_serial:x}"),
        uris=[td_uri],
        not_before=not_before,
        not_after=now + settings.root_ttl,
        serial_number=root_serial,
    )
    root = crypto.Issuer(root_pem, root_key)
    intermediate_key = crypto.generate_private_key_pem(settings.key_algorithm)
    intermediate_serial = root_serial + 1
    intermediate_pem = root.sign_ca_certificate(
        crypto.public_key_pem(intermediate_key),
        subject=crypto.DistinguishedName(
            "meshca intermediate CA", organization=td, serial_number=f"{intermediate_serial:x}"
        ),
        uris=[td_uri],
        not_before=not_before,
        not_after=min(now + settings.intermediate_ttl, root.info.not_after),
        serial_number=intermediate_serial,
        path_length=0,
    )
    v1_settings = {key: value for key, value in settings.to_json().items() if key in V1_SETTING_KEYS}
    metadata = {
        "format_version": 1,
        "trust_domain": td,
        "key_algorithm": settings.key_algorithm.value,
        "created_at": now.isoformat(),
        "settings": v1_settings,
    }
    for name, data, mode in (
        (V1_ROOT_KEY_FILE, root_key, 0o600),
        (V1_ROOT_CERT_FILE, root_pem, 0o644),
        (V1_INTERMEDIATE_KEY_FILE, intermediate_key, 0o600),
        (V1_INTERMEDIATE_CERT_FILE, intermediate_pem, 0o644),
        (METADATA_FILE, (json.dumps(metadata, indent=2) + "\n").encode(), 0o644),
    ):
        fd = os.open(state_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        os.write(fd, data)
        os.close(fd)


V1_SETTING_KEYS = (
    "root_ttl_seconds",
    "intermediate_ttl_seconds",
    "leaf_ttl_default_seconds",
    "leaf_ttl_min_seconds",
    "leaf_ttl_max_seconds",
    "backdate_seconds",
    "leaf_key_algorithm",
)


def slot_paths(state: Path, kind: str, state_name: str = "active") -> tuple[Path, Path]:
    """(certificate, key) paths of the slot of `kind` in `state_name` according to ca.json."""
    metadata = json.loads((state / METADATA_FILE).read_text())
    (slot,) = [s for s in metadata["slots"] if s["kind"] == kind and s["state"] == state_name]
    cert, key = slot_files(kind, slot["id"])
    return state / cert, state / key


def test_state_round_trip(tmp_path: Path, clock: FakeClock) -> None:
    settings = CaSettings(TD, leaf_ttl_default=timedelta(minutes=20), backdate=timedelta(seconds=10))
    original = CertificateAuthority.init(tmp_path / "ca", settings, clock)

    loaded = CertificateAuthority.load(tmp_path / "ca", clock)

    assert loaded.settings == settings
    assert loaded.trust_domain == TD
    assert loaded.generation == original.generation == 1
    assert loaded.trust_bundle_pem() == original.trust_bundle_pem()
    assert loaded.intermediate_certificate_pem == original.intermediate_certificate_pem
    issued = loaded.issue_workload(WORKLOAD)
    assert issued.not_after - issued.not_before == timedelta(minutes=20, seconds=10)
    verify_client_chain(original.trust_bundle_pem(), issued.chain_pem, T0)
    metadata = json.loads((tmp_path / "ca" / METADATA_FILE).read_text())
    assert metadata["format_version"] == 2
    assert metadata["trust_domain"] == TD
    assert metadata["key_algorithm"] == "ec-p256"
    assert metadata["generation"] == 1
    assert [(s["kind"], s["state"]) for s in metadata["slots"]] == [("root", "active"), ("intermediate", "active")]


def test_state_file_modes(ca: CertificateAuthority, tmp_path: Path) -> None:
    state = tmp_path / "ca"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    root_cert, root_key = slot_paths(state, "root")
    intermediate_cert, intermediate_key = slot_paths(state, "intermediate")
    for key in (root_key, intermediate_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    expected = {METADATA_FILE, JOURNAL_FILE, LOCK_FILE, root_cert.name, root_key.name, intermediate_cert.name,
                intermediate_key.name}
    assert set(os.listdir(state)) == expected  # no temp files left behind


def test_existing_directory_is_tightened_before_keys_are_written(tmp_path: Path, clock: FakeClock) -> None:
    state = tmp_path / "ca"
    state.mkdir(mode=0o755)
    CertificateAuthority.init(state, CaSettings(TD), clock)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_init_refuses_to_overwrite(ca: CertificateAuthority, tmp_path: Path, clock: FakeClock) -> None:
    state = tmp_path / "ca"
    before = {name: (state / name).read_bytes() for name in os.listdir(state)}

    with pytest.raises(CaAlreadyExists, match="refusing to overwrite"):
        CertificateAuthority.init(state, CaSettings(TD), clock)

    assert {name: (state / name).read_bytes() for name in os.listdir(state)} == before


def test_init_refuses_partial_state(tmp_path: Path, clock: FakeClock) -> None:
    state = tmp_path / "ca"
    state.mkdir()
    (state / V1_ROOT_KEY_FILE).write_bytes(b"left over")
    with pytest.raises(CaAlreadyExists, match=V1_ROOT_KEY_FILE):
        CertificateAuthority.init(state, CaSettings(TD), clock)
    assert (state / V1_ROOT_KEY_FILE).read_bytes() == b"left over"


def test_load_of_missing_directory_fails_without_creating(tmp_path: Path, clock: FakeClock) -> None:
    with pytest.raises(CaStateError, match="does not exist"):
        CertificateAuthority.load(tmp_path / "nope", clock)
    assert not (tmp_path / "nope").exists()


def _garbage(path: Path) -> None:
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_metadata(state: Path, change) -> None:  # type: ignore[no-untyped-def]
    data = json.loads((state / METADATA_FILE).read_text())
    change(data)
    (state / METADATA_FILE).write_text(json.dumps(data))


# Format 1: what `load` finds in a directory written before slots existed; it refuses to migrate damage.


def _swap_v1_keys(state: Path, _: str) -> None:
    root_key = (state / V1_ROOT_KEY_FILE).read_bytes()
    (state / V1_ROOT_KEY_FILE).write_bytes((state / V1_INTERMEDIATE_KEY_FILE).read_bytes())
    (state / V1_INTERMEDIATE_KEY_FILE).write_bytes(root_key)


def _edit_json(change):  # type: ignore[no-untyped-def]
    return lambda state, _: _edit_metadata(state, change)


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        (lambda s, n: (s / n).unlink(), V1_ROOT_CERT_FILE, "missing"),
        (lambda s, n: (s / n).unlink(), V1_INTERMEDIATE_KEY_FILE, "missing"),
        (lambda s, n: (s / n).unlink(), METADATA_FILE, "missing"),
        (lambda s, n: _garbage(s / n), V1_ROOT_CERT_FILE, "not a PEM certificate"),
        (lambda s, n: _garbage(s / n), V1_INTERMEDIATE_CERT_FILE, "not a PEM certificate"),
        (lambda s, n: _truncate(s / n), V1_INTERMEDIATE_KEY_FILE, "not a PEM private key"),
        (_swap_v1_keys, V1_ROOT_CERT_FILE, "does not belong"),
        (lambda s, n: (s / n).write_text("{not json"), METADATA_FILE, "not valid JSON"),
        (_edit_json(lambda d: d.pop("trust_domain")), METADATA_FILE, "missing key 'trust_domain'"),
        (_edit_json(lambda d: d["settings"].pop("leaf_ttl_max_seconds")), METADATA_FILE, "leaf_ttl_max_seconds"),
        (_edit_json(lambda d: d.update(format_version=99)), METADATA_FILE, "format_version"),
        (_edit_json(lambda d: d.update(key_algorithm="dsa-512")), METADATA_FILE, "dsa-512"),
        (_edit_json(lambda d: d.update(trust_domain="other.org")), V1_ROOT_CERT_FILE, "other.org"),
    ],
)
def test_load_refuses_corrupt_v1_state(tmp_path: Path, clock: FakeClock, damage, file: str, problem: str) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "ca"
    write_v1_state(state, CaSettings(TD), T0)
    damage(state, file)
    before = {name: (state / name).read_bytes() for name in os.listdir(state) if name != LOCK_FILE}

    with pytest.raises(CaStateError) as info:
        CertificateAuthority.load(state, clock)

    assert file in str(info.value) and problem in str(info.value)
    assert {name: (state / name).read_bytes() for name in os.listdir(state) if name != LOCK_FILE} == before


def test_load_refuses_v1_intermediate_from_another_ca(tmp_path: Path, clock: FakeClock) -> None:
    write_v1_state(tmp_path / "a", CaSettings(TD), T0)
    write_v1_state(tmp_path / "b", CaSettings(TD), T0)
    for name in (V1_INTERMEDIATE_CERT_FILE, V1_INTERMEDIATE_KEY_FILE):
        (tmp_path / "a" / name).write_bytes((tmp_path / "b" / name).read_bytes())

    with pytest.raises(CaStateError, match="not signed by the root"):
        CertificateAuthority.load(tmp_path / "a", clock)


# Format 2: slot files named by ca.json.


def _swap_v2_keys(state: Path) -> None:
    (_, root_key), (_, intermediate_key) = slot_paths(state, "root"), slot_paths(state, "intermediate")
    data = root_key.read_bytes()
    root_key.write_bytes(intermediate_key.read_bytes())
    intermediate_key.write_bytes(data)


@pytest.mark.parametrize(
    ("damage", "target", "problem"),
    [
        (lambda s: slot_paths(s, "root")[0].unlink(), "root cert", "missing"),
        (lambda s: slot_paths(s, "intermediate")[1].unlink(), "intermediate key", "missing"),
        (lambda s: (s / METADATA_FILE).unlink(), "metadata", "missing"),
        (lambda s: _garbage(slot_paths(s, "root")[0]), "root cert", "not a PEM certificate"),
        (lambda s: _garbage(slot_paths(s, "intermediate")[0]), "intermediate cert", "not a PEM certificate"),
        (lambda s: _truncate(slot_paths(s, "intermediate")[1]), "intermediate key", "not a PEM private key"),
        (_swap_v2_keys, "root cert", "does not belong"),
        (lambda s: (s / METADATA_FILE).write_text("{not json"), "metadata", "not valid JSON"),
        (lambda s: _edit_metadata(s, lambda d: d.pop("trust_domain")), "metadata", "missing key 'trust_domain'"),
        (lambda s: _edit_metadata(s, lambda d: d["settings"].pop("leaf_ttl_max_seconds")), "metadata",
         "leaf_ttl_max_seconds"),
        (lambda s: _edit_metadata(s, lambda d: d.update(format_version=99)), "metadata", "format_version"),
        (lambda s: _edit_metadata(s, lambda d: d.update(key_algorithm="dsa-512")), "metadata", "dsa-512"),
        (lambda s: _edit_metadata(s, lambda d: d.update(trust_domain="other.org")), "root cert", "other.org"),
        (lambda s: _edit_metadata(s, lambda d: d.update(generation=0)), "metadata", "generation"),
        (lambda s: _edit_metadata(s, lambda d: d["slots"].pop()), "metadata", "exactly one active"),
        (lambda s: _edit_metadata(s, lambda d: d["slots"][0].update(state="old")), "metadata", "retire_after"),
        (lambda s: _edit_metadata(s, lambda d: d["slots"][1].update(not_after=T0.isoformat())), "metadata",
         "does not match"),
        (lambda s: (s / V1_INTERMEDIATE_CERT_FILE).write_text("not a certificate"), "v1 intermediate", "format-1"),
    ],
)
def test_load_refuses_corrupt_state(ca: CertificateAuthority, tmp_path: Path, clock: FakeClock, damage, target: str, problem: str) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "ca"
    files = {
        "root cert": slot_paths(state, "root")[0].name,
        "intermediate cert": slot_paths(state, "intermediate")[0].name,
        "intermediate key": slot_paths(state, "intermediate")[1].name,
        "metadata": METADATA_FILE,
        "v1 intermediate": V1_INTERMEDIATE_CERT_FILE,
    }
    damage(state)

    with pytest.raises(CaStateError) as info:
        CertificateAuthority.load(state, clock)

    assert files[target] in str(info.value) and problem in str(info.value)


def test_load_refuses_intermediate_from_another_ca(tmp_path: Path, clock: FakeClock) -> None:
    CertificateAuthority.init(tmp_path / "a", CaSettings(TD), clock)
    CertificateAuthority.init(tmp_path / "b", CaSettings(TD), clock)
    for path in slot_paths(tmp_path / "b", "intermediate"):
        (tmp_path / "a" / path.name).write_bytes(path.read_bytes())
        (tmp_path / "a" / path.name).chmod(0o600)
    foreign = json.loads((tmp_path / "b" / METADATA_FILE).read_text())["slots"][1]

    def adopt(data: dict) -> None:  # type: ignore[type-arg]
        data["slots"][1].update(id=foreign["id"], not_before=foreign["not_before"], not_after=foreign["not_after"])

    _edit_metadata(tmp_path / "a", adopt)

    with pytest.raises(CaStateError, match="not signed by root"):
        CertificateAuthority.load(tmp_path / "a", clock)


def test_load_refuses_intermediate_key_not_matching(tmp_path: Path, clock: FakeClock) -> None:
    CertificateAuthority.init(tmp_path / "a", CaSettings(TD), clock)
    cert, key = slot_paths(tmp_path / "a", "intermediate")
    key.write_bytes(crypto.generate_private_key_pem())

    with pytest.raises(CaStateError, match=f"{cert.name}.*does not belong"):
        CertificateAuthority.load(tmp_path / "a", clock)


# --- CSRs -----------------------------------------------------------------------------------------


def test_csr_without_san_gets_caller_identity(ca: CertificateAuthority) -> None:
    key = crypto.generate_private_key_pem()
    csr = crypto.build_csr_pem(key, common_name="anything the client likes")

    issued = ca.sign_csr(csr, WORKLOAD)

    leaf = x509.load_pem_x509_certificate(issued.certificate_pem)
    assert issued.private_key_pem is None and issued.spiffe_id == WORKLOAD
    assert leaf.subject == x509.Name([])  # the CSR's subject is ignored
    assert list(ext(leaf, x509.SubjectAlternativeName).value) == [x509.UniformResourceIdentifier(WORKLOAD.uri)]
    assert crypto.parse_certificate_pem(issued.certificate_pem).public_key.spki_der == crypto.private_key_info(key).spki_der
    verified = verify_client_chain(ca.trust_bundle_pem(), issued.chain_pem, T0)
    assert verified.subjects == [x509.UniformResourceIdentifier(WORKLOAD.uri)]


def test_csr_naming_exactly_the_caller_is_accepted_with_ttl(ca: CertificateAuthority) -> None:
    csr = crypto.build_csr_pem(crypto.generate_private_key_pem(KeyAlgorithm.EC_P384), uris=[WORKLOAD.uri])

    issued = ca.sign_csr(csr, WORKLOAD, timedelta(minutes=10))

    assert issued.not_after == T0 + timedelta(minutes=10)
    verify_client_chain(ca.trust_bundle_pem(), issued.chain_pem, T0)


def test_rsa_csr_is_accepted_with_key_encipherment(ca: CertificateAuthority) -> None:
    csr = crypto.build_csr_pem(crypto.generate_private_key_pem(KeyAlgorithm.RSA_2048))

    leaf = x509.load_pem_x509_certificate(ca.sign_csr(csr, WORKLOAD).certificate_pem)

    assert ext(leaf, x509.KeyUsage).value.key_encipherment


def test_csr_for_another_identity_is_permission_denied(ca: CertificateAuthority) -> None:
    csr = crypto.build_csr_pem(crypto.generate_private_key_pem(), uris=[WORKLOAD.uri, OTHER.uri])

    with pytest.raises(CsrRejected) as info:
        ca.sign_csr(csr, WORKLOAD)

    assert info.value.kind == "permission_denied"
    assert OTHER.uri in info.value.reason and WORKLOAD.uri in info.value.reason


@pytest.mark.parametrize(
    ("make_csr", "fragment"),
    [
        (lambda k: crypto.build_csr_pem(k, is_ca=True), "CA certificates cannot be requested"),
        (lambda k: crypto.build_csr_pem(k, uris=[WORKLOAD.uri], is_ca=True), "CA certificates cannot be requested"),
        (lambda k: crypto.build_csr_pem(k, dns_names=["frontend.shop.svc"]), "frontend.shop.svc"),
        (lambda k: crypto.build_csr_pem(k, uris=[WORKLOAD.uri], ip_addresses=["10.0.0.1"]), "10.0.0.1"),
        (lambda k: crypto.build_csr_pem(k, emails=["a@example.org"]), "a@example.org"),
        (lambda k: tamper_signature(crypto.build_csr_pem(k)), "signature does not verify"),
        (lambda k: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "cannot be parsed"),
        (lambda k: b"hello", "cannot be parsed"),
        (lambda k: RSA_1024_CSR, "1024 bits"),
        (lambda k: ED25519_CSR, "ed25519"),
        (lambda k: b"x" * 70_000, "larger than"),
    ],
)
def test_invalid_csrs_are_invalid_argument(ca: CertificateAuthority, make_csr, fragment: str) -> None:  # type: ignore[no-untyped-def]
    csr = make_csr(crypto.generate_private_key_pem())

    with pytest.raises(CsrRejected) as info:
        ca.sign_csr(csr, WORKLOAD)

    assert info.value.kind == "invalid_argument"
    assert fragment in info.value.reason


def test_csr_for_caller_outside_trust_domain_is_refused(ca: CertificateAuthority) -> None:
    stranger = SpiffeId.for_service_account("other.org", "shop", "frontend")
    csr = crypto.build_csr_pem(crypto.generate_private_key_pem())
    with pytest.raises(IdentityRejected):
        ca.sign_csr(csr, stranger)


def test_csr_helpers_round_trip() -> None:
    key = crypto.generate_private_key_pem()
    parsed = crypto.parse_csr_pem(
        crypto.build_csr_pem(key, uris=[WORKLOAD.uri], dns_names=["a.example"], ip_addresses=["::1"], emails=["x@y.z"])
    )
    assert parsed.signature_valid and not parsed.requests_ca
    assert (parsed.uris, parsed.dns_names, parsed.ip_addresses, parsed.emails) == (
        (WORKLOAD.uri,),
        ("a.example",),
        ("::1",),
        ("x@y.z",),
    )
    assert "spki_der" not in repr(parsed.public_key)
    assert not crypto.parse_csr_pem(tamper_signature(crypto.build_csr_pem(key))).signature_valid
