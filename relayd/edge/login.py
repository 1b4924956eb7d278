"""Logging a device in at the edge: the challenge, the signed answer, and its check.

Pure: no I/O. The device signs, with its registered Ed25519 key,

    b"relayd/v1 edge-login\\n" + edge name + b"\\n" + device id + b"\\n" + nonce (32 bytes)

so a signature is good for one edge, one device and one challenge only. Every way to fail
(no such device, a removed one, a bad or malformed signature, a signature over another
challenge) gives the same answer after the same work: an unknown device is checked
against a dummy key.
"""

from __future__ import annotations

import re
import secrets
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from relayd.crypto import b64d, ed25519_public
from relayd.payload import DEVICE_ID

CONTEXT: Final = b"relayd/v1 edge-login\n"
NONCE_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
EDGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")  # always fullmatch()


def nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def message(edge: str, device: str, challenge: bytes) -> bytes:
    """The bytes a device signs to log in to `edge` with `challenge`."""
    return CONTEXT + edge.encode() + b"\n" + device.encode() + b"\n" + challenge


def sign(key: ed25519.Ed25519PrivateKey, edge: str, device: str, challenge: bytes) -> bytes:
    """The device's answer to a challenge (64 bytes)."""
    return key.sign(message(edge, device, challenge))


class Verifier:
    """Checks logins for one edge, doing the same work whatever the outcome."""

    def __init__(self, edge: str) -> None:
        if not EDGE_NAME.fullmatch(edge):
            raise ValueError("not an edge name")
        self.edge = edge
        self._dummy = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()

    def verify(self, sign_key: bytes | None, device: str, sig: str, challenge: bytes) -> bool:
        """Whether `sig` (base64url) is `device`'s signature over `challenge`; `sign_key`
        is the device's registered key, or None when there is no such device."""
        known = sign_key is not None and DEVICE_ID.fullmatch(device) is not None
        try:
            raw = b64d(sig)
        except ValueError:
            raw = b""
        well_formed = len(raw) == SIGNATURE_BYTES
        try:  # relayd.crypto's check, as at the inbound worker: a weak key registered
            # before relayd checked keys verifies forgeries made without any secret. The
            # dummy key is checked too: the check costs more than the signature's.
            key = ed25519_public(sign_key if known and sign_key is not None else self._dummy)
        except ValueError:  # a wrong length, or a WeakKeyError: never trust it blindly
            key, known = ed25519_public(self._dummy), False
        try:
            key.verify(raw if well_formed else bytes(SIGNATURE_BYTES),
                       message(self.edge, device if known else "-", challenge))
        except InvalidSignature:
            return False
        return known and well_formed
