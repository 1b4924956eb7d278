"""Sealing and opening, exactly as the contract says.

HPKE single-shot Base mode, empty aad, info = b"relayd/v1 " + direction + b" " + kid.
Plaintext = Ed25519 signature (64 bytes) || payload; the signature covers
b"relayd/v1 " + direction + b"\\n" + payload. The AMQP body is enc || ct.

Every failure raises EnvelopeError with one reason code; nothing in a payload is acted
on before the signature checks out.
"""

from __future__ import annotations

from typing import Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from relayd.crypto import Kem, PrivateKey, PublicKey
from relayd.errors import EnvelopeError

Direction = Literal["up", "down"]
SIGNATURE_BYTES: Final = 64
CONTENT_TYPE: Final = "application/vnd.relayd.sealed"
KID_HEADER: Final = "relayd-kid"
DEVICE_HEADER: Final = "x-relayd-device"  # set by the edge: the device logged in
_PREFIX: Final = b"relayd/v1 "


def info(direction: Direction, kid: str) -> bytes:
    return _PREFIX + direction.encode() + b" " + kid.encode()


def signed_bytes(direction: Direction, payload: bytes) -> bytes:
    return _PREFIX + direction.encode() + b"\n" + payload


def seal(
    payload: bytes,
    *,
    direction: Direction,
    kid: str,
    kem: Kem,
    recipient: PublicKey,
    signer: ed25519.Ed25519PrivateKey,
) -> bytes:
    """Sign `payload` with `signer`, then encrypt it to `recipient` under `kid`."""
    signature = signer.sign(signed_bytes(direction, payload))
    return kem.suite.encrypt(signature + payload, recipient, info=info(direction, kid))


def open_sealed(
    body: bytes, *, direction: Direction, kid: str, kem: Kem, private: PrivateKey
) -> tuple[bytes, bytes]:
    """Decrypt `body`; return (signature, payload), still unverified."""
    if len(body) <= kem.enc_length:
        raise EnvelopeError("malformed", "shorter than the KEM's enc")
    try:
        plain = kem.suite.decrypt(body, private, info=info(direction, kid))
    except Exception:  # the binding raises several types; each means the same
        raise EnvelopeError("decrypt_failed", "HPKE open failed") from None
    if len(plain) <= SIGNATURE_BYTES:
        raise EnvelopeError("malformed", "no payload after the signature")
    return plain[:SIGNATURE_BYTES], plain[SIGNATURE_BYTES:]


def verify(
    signature: bytes, payload: bytes, *, direction: Direction, signer: ed25519.Ed25519PublicKey
) -> None:
    """Raise EnvelopeError("bad_signature") unless `signer` signed `payload` for `direction`."""
    try:
        signer.verify(signature, signed_bytes(direction, payload))
    except InvalidSignature:
        raise EnvelopeError("bad_signature", "signature does not verify") from None
