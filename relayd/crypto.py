"""The primitives the contract names: HPKE suites, key encodings, Ed25519 and base64url.

Raw encodings, as carried in JSON and on the wire:
- X25519: the 32-byte public or private key.
- MLKEM768_X25519: public = ML-KEM-768 encapsulation key (1184 bytes) || X25519 public key
  (32 bytes); private = ML-KEM-768 seed (64 bytes) || X25519 private key (32 bytes).
- Ed25519: the 32-byte public or private key.

Every public key that comes in (a device's, the relay's own, the relay's as a device reads
it) is decoded by one function per kind: x25519_public, mlkem768_x25519_public (through
Kem.public_key) and ed25519_public. Each refuses, with WeakKeyError, the keys that decode
but must never be used: low-order points (all zero among them), which give every sender
the same shared secret or let a signature verify without any secret, and non-canonical
encodings, which let one key have several names.
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
_MLKEM768_T = 1152  # the encoded vector t; the last 32 bytes of the key are the seed rho
_Q = 3329  # ML-KEM's modulus
# FIPS 203's zetas: 17^BitRev7(i) mod q, for the NTT and its inverse (Algorithm 10)
_ZETAS = [pow(17, int(f"{i:07b}"[::-1], 2), _Q) for i in range(128)]
_MLKEM_SEED = 64
_X25519 = 32
_ED25519 = 32
_P = 2**255 - 19  # the field of Curve25519 and of edwards25519

# The u-coordinates of the points of order 1, 2, 4 and 8 of Curve25519 and its twist (RFC
# 7748 section 6; libsodium's blocklist of crypto_scalarmult_curve25519 lists them and
# their encodings plus p and p+1): a clamped private key times any of them is 0.
X25519_LOW_ORDER = frozenset({
    0, 1, _P - 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
})
# The y-coordinates of the eight points of order 1, 2, 4 and 8 of edwards25519 (the
# identity is y = 1); libsodium's ge25519_has_small_order blocklist.
_Y8 = 2707385501144840649318225287225658788936804267575313519463743609750303402022
ED25519_SMALL_ORDER_Y = frozenset({1, _P - 1, 0, _Y8, _P - _Y8})
_D = -121665 * pow(121666, -1, _P) % _P  # edwards25519's d
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


class WeakKeyError(ValueError):
    """A public key that decodes but must never be used (low order, or not canonical)."""


def x25519_public(raw: bytes) -> x25519.X25519PublicKey:
    """An X25519 public key; ValueError unless it is 32 bytes, canonical (u < p, so the
    top bit clear) and not of low order."""
    if len(raw) != _X25519:
        raise ValueError("an X25519 public key is 32 bytes")
    u = int.from_bytes(raw, "little")
    if u >= _P:
        raise WeakKeyError("the X25519 public key is not canonical (u >= 2^255-19)")
    if u in X25519_LOW_ORDER:
        raise WeakKeyError("the X25519 public key is a low-order point (all zero is one): "
                           "anyone could compute what is sealed to it")
    return x25519.X25519PublicKey.from_public_bytes(raw)


def mlkem768_x25519_public(raw: bytes) -> hpke.MLKEM768X25519PublicKey:
    """An MLKEM768_X25519 public key: its X25519 half as x25519_public checks it, and an
    ML-KEM-768 encapsulation key that passes FIPS 203's checks (its length, and every
    coefficient below q: cryptography's decoder does that one) and whose vector t is not
    small (see _small_t)."""
    if len(raw) != _MLKEM768_PUBLIC + _X25519:
        raise ValueError("an MLKEM768_X25519 public key is 1216 bytes")
    x = x25519_public(raw[_MLKEM768_PUBLIC:])
    try:
        m = mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUBLIC])
    except ValueError:  # its message names the length, whatever failed
        raise WeakKeyError("the ML-KEM-768 encapsulation key fails FIPS 203's modulus "
                           "check (a coefficient is not below q = 3329)") from None
    if _small_t(raw[:_MLKEM768_T]):
        raise WeakKeyError("the ML-KEM-768 encapsulation key's vector t is zero or small: "
                           "anyone could compute what is sealed to it")
    return hpke.MLKEM768X25519PublicKey(m, x)


def _small_t(encoded: bytes) -> bool:
    """Whether every coefficient of t (the key's three polynomials, out of the NTT
    domain they are encoded in) lies within q/4 of zero. A ciphertext's v is t·r + e2 +
    round(q/2)·m with r and e2 small, so for such a t it shows m, and with m the shared
    secret, to anyone: t = 0 is the extreme case. An honest t = A·s + e is uniform, and
    is this small with probability 2^-768. At most about 1 ms."""
    coefficients = []
    for i in range(0, len(encoded), 3):  # ByteDecode12: two 12-bit values in 3 bytes
        b0, b1, b2 = encoded[i:i + 3]
        coefficients += [b0 | (b1 & 0x0F) << 8, b1 >> 4 | b2 << 4]
    return all(min(c, _Q - c) <= _Q // 4
               for k in range(0, len(coefficients), 256)
               for c in _inverse_ntt(coefficients[k:k + 256]))


def _inverse_ntt(f_hat: list[int]) -> list[int]:
    """FIPS 203, Algorithm 10: a polynomial from its NTT representation."""
    f, i, length = list(f_hat), 127, 2
    while length <= 128:
        for start in range(0, 256, 2 * length):
            zeta, i = _ZETAS[i], i - 1
            for j in range(start, start + length):
                t = f[j]
                f[j] = (t + f[j + length]) % _Q
                f[j + length] = zeta * (f[j + length] - t) % _Q
        length *= 2
    return [c * 3303 % _Q for c in f]  # 3303 = 128^-1 mod q


def ed25519_public(raw: bytes) -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key; ValueError unless it is 32 bytes, the canonical encoding of a
    point of edwards25519 (RFC 8032 section 5.1.3: y < p), and not one of the eight
    points of small order, under which a signature can verify without any secret key (the
    identity point verifies a zero signature on anything). The other non-canonical
    encodings, x = 0 with the sign bit set, are at y = 1 and p-1: refused as small order.
    """
    if len(raw) != _ED25519:
        raise ValueError("an Ed25519 public key is 32 bytes")
    y = int.from_bytes(raw, "little") & (2**255 - 1)  # bit 255 is the sign of x
    if y >= _P:
        raise WeakKeyError("the Ed25519 public key is not canonical (y >= 2^255-19)")
    if y in ED25519_SMALL_ORDER_Y:
        raise WeakKeyError("the Ed25519 public key is a point of small order (the identity "
                           "and all zero are two): a signature could verify without a key")
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P  # x^2 = u / v
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if v * x * x % _P == -u % _P:
        x = x * _SQRT_M1 % _P
    if v * x * x % _P != u:
        raise WeakKeyError("the Ed25519 public key is not a point of edwards25519")
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


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
        """Decode a raw public key; ValueError when it has the wrong length or shape, and
        WeakKeyError (a ValueError) when it must not be used."""
        if self is Kem.X25519:
            return x25519_public(raw)
        return mlkem768_x25519_public(raw)


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
