"""The primitives the contract names: HPKE suites, key encodings, Ed25519 and base64url.

Raw encodings, as carried in JSON and on the wire:
- X25519: the 32-byte public or private key.
- MLKEM768_X25519: public = ML-KEM-768 encapsulation key (1184 bytes) || X25519 public key
  (32 bytes); private = ML-KEM-768 seed (64 bytes) || X25519 private key (32 bytes).
- Ed25519: the 32-byte public or private key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from enum import StrEnum
from typing import TypeAlias

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PublicKey: TypeAlias = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey
PrivateKey: TypeAlias = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey

_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_MLKEM768_PUBLIC = 1184
_MLKEM_SEED = 64
_X25519 = 32


class Kem(StrEnum):
    X25519 = "X25519"
    MLKEM768_X25519 = "MLKEM768_X25519"

    @property
    def suite(self) -> hpke.Suite:
        return _SUITES[self]

    @property
    def enc_length(self) -> int:
        return _ENC_LENGTHS[self]

    def generate(self) -> tuple[PrivateKey, bytes]:
        """A new private key, and its raw encoding for the key file."""
        x = x25519.X25519PrivateKey.generate()
        if self is Kem.X25519:
            return x, x.private_bytes_raw()
        seed = mlkem.MLKEM768PrivateKey.generate().private_bytes_raw()
        return self.private_key(seed + x.private_bytes_raw()), seed + x.private_bytes_raw()

    def private_key(self, raw: bytes) -> PrivateKey:
        """Decode a raw private key; ValueError when it has the wrong length."""
        if self is Kem.X25519:
            return x25519.X25519PrivateKey.from_private_bytes(raw)
        if len(raw) != _MLKEM_SEED + _X25519:
            raise ValueError("an MLKEM768_X25519 private key is 96 bytes")
        m = mlkem.MLKEM768PrivateKey.from_seed_bytes(raw[:_MLKEM_SEED])
        return hpke.MLKEM768X25519PrivateKey(
            m, x25519.X25519PrivateKey.from_private_bytes(raw[_MLKEM_SEED:])
        )

    def public_key(self, raw: bytes) -> PublicKey:
        """Decode a raw public key; ValueError when it has the wrong length or shape."""
        if self is Kem.X25519:
            return x25519.X25519PublicKey.from_public_bytes(raw)
        if len(raw) != _MLKEM768_PUBLIC + _X25519:
            raise ValueError("an MLKEM768_X25519 public key is 1216 bytes")
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUBLIC]),
            x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM768_PUBLIC:]),
        )


_SUITES = {
    kem: hpke.Suite(
        getattr(hpke.KEM, kem.value), hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305
    )
    for kem in Kem
}
_ENC_LENGTHS: dict[Kem, int] = {kem: getattr(hpke.KEM, kem.value).enc_length() for kem in Kem}


def raw_public(kem: Kem, raw_private: bytes) -> bytes:
    """The raw public key that belongs to a raw private key of `kem`."""
    x_raw = raw_private[-_X25519:] if kem is Kem.MLKEM768_X25519 else raw_private
    x_public = x25519.X25519PrivateKey.from_private_bytes(x_raw).public_key().public_bytes_raw()
    if kem is Kem.X25519:
        return x_public
    m = mlkem.MLKEM768PrivateKey.from_seed_bytes(raw_private[:_MLKEM_SEED])
    return m.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) + x_public


def signing_public(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def fingerprint(raw: bytes) -> str:
    """A short, stable name for a public key: SHA-256, first 16 bytes, base64url."""
    return b64e(hashlib.sha256(raw).digest()[:16])


def b64e(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    """Decode base64url with or without padding; ValueError on anything else."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text):
        raise ValueError("not base64url text")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url text") from exc
