"""Opaque ids, keyed hashes under the relay's secret (opaque.json), each with a label of
its own so that no two kinds ever coincide.

- conversation_id: what a business knows a user by. HMAC-SHA256 of (user, business,
  epoch), cut to 160 bits and written in base32: the same user gets unlinkable ids at
  different businesses, a new epoch gives an unlinkable new id, and the id encodes
  nothing readable.
- device_token: what the broker knows a device by (its queue's name and its binding's
  routing key), so that nobody without the secret can name a device's queue to probe it.
- inbox_token: what a business's inbox is named by, so that no other business can name
  it to read its depth or see whether it is consumed.
- reference: what logs and audit records name a user or a value by.
- pseudonym: what the store keys a user, a device or a message source by
  (relayd.store.pseudonym), so that its files hold no id.
- receipt_mac: what makes a receipt token (relayd.receipts) relayd's own.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac


def conversation_id(secret: bytes, user: str, business: str, epoch: int) -> str:
    message = b"\0".join((b"relayd/v1 conversation", user.encode(), business.encode(),
                          str(epoch).encode()))
    digest = hmac.new(secret, message, hashlib.sha256).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def _token(secret: bytes, label: bytes, value: str) -> str:
    """HMAC-SHA256 of `value` under `label`, 160 bits in base32 (32 characters of a-z2-7)."""
    digest = hmac.new(secret, label + b"\0" + value.encode(), hashlib.sha256).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


@functools.lru_cache(maxsize=65536)
def device_token(secret: bytes, device: str) -> str:
    """The device's name in the broker."""
    return _token(secret, b"relayd/v1 device queue", device)


@functools.lru_cache(maxsize=4096)
def inbox_token(secret: bytes, business: str) -> str:
    """The name of the business's inbox in the broker."""
    return _token(secret, b"relayd/v1 business inbox", business)


def reference(secret: bytes, kind: str, value: str) -> str:
    """A keyed hash to name a user or device in logs and audit records, never the id itself."""
    digest = hmac.new(secret, b"relayd/v1 ref " + kind.encode() + b"\0" + value.encode(),
                      hashlib.sha256).digest()[:9]
    return base64.b32encode(digest).decode("ascii").lower().rstrip("=")


@functools.lru_cache(maxsize=65536)
def pseudonym(secret: bytes, kind: str, value: str) -> str:
    """The store's name for a user, device or source: HMAC-SHA256, 160 bits in base32."""
    digest = hmac.new(secret, b"relayd/v1 store " + kind.encode() + b"\0" + value.encode(),
                      hashlib.sha256).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def receipt_mac(secret: bytes, business: str, conversation: str, message_id: str) -> str:
    """A keyed hash of one business message, 128 bits in base32: only relayd can write a
    receipt token that it will believe."""
    digest = hmac.new(secret, b"\0".join((b"relayd/v1 receipt", business.encode(),
                                          conversation.encode(), message_id.encode())),
                      hashlib.sha256).digest()[:16]
    return base64.b32encode(digest).decode("ascii").lower().rstrip("=")
