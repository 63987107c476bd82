"""Sealing CA keys for the store: AES-256-GCM under the KEK, bound to the file name; every misuse is one clear error."""

from __future__ import annotations

import secrets

import pytest

from meshca.ca.crypto import SEALED_PREFIX, CryptoError, generate_private_key_pem, seal, unseal


def test_a_sealed_key_opens_only_with_its_kek_and_name() -> None:
    kek, key_pem = secrets.token_bytes(32), generate_private_key_pem()
    sealed = seal(kek, key_pem, b"root-0123456789abcdef-key.pem")
    assert sealed.startswith(SEALED_PREFIX) and b"PRIVATE KEY" not in sealed and key_pem not in sealed
    assert seal(kek, key_pem, b"x") != seal(kek, key_pem, b"x")  # a fresh nonce each time
    assert unseal(kek, sealed, b"root-0123456789abcdef-key.pem") == key_pem

    wrong = secrets.token_bytes(32)
    with pytest.raises(CryptoError, match="wrong key-encryption key") as raised:
        unseal(wrong, sealed, b"root-0123456789abcdef-key.pem")
    assert wrong.hex() not in str(raised.value) and kek.hex() not in str(raised.value)
    with pytest.raises(CryptoError, match="moved to another name"):
        unseal(kek, sealed, b"intermediate-0123456789abcdef-key.pem")
    tampered = bytearray(sealed)
    tampered[-5] ^= 1
    with pytest.raises(CryptoError, match="altered"):
        unseal(kek, bytes(tampered), b"root-0123456789abcdef-key.pem")
    with pytest.raises(CryptoError, match="not a sealed value"):
        unseal(kek, key_pem, b"root-0123456789abcdef-key.pem")
    with pytest.raises(CryptoError, match="truncated"):
        unseal(kek, SEALED_PREFIX + b"abc", b"n")
    with pytest.raises(CryptoError, match="must be 32 bytes, got 16"):
        seal(kek[:16], key_pem, b"n")
