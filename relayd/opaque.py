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

The names of users and devices are kept in memory once computed (the hot path asks for
them on every message), but never longer than FORGET_SECONDS: a cache keyed by ids is
emptied at its first use after that long, so that an erased user's ids leave a worker's
memory within that bound (docs/privacy.md, "A worker's memory").
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

FORGET_SECONDS = 60.0
R = TypeVar("R")


def forgetful(maxsize: int) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """functools.lru_cache(maxsize), emptied at its first call once it has been held
    FORGET_SECONDS: for caches keyed by ids or keys of people."""
    def wrap(compute: Callable[..., R]) -> Callable[..., R]:
        cached = functools.lru_cache(maxsize)(compute)
        since = time.monotonic()

        @functools.wraps(compute)
        def call(*args: Hashable) -> R:
            nonlocal since
            if time.monotonic() - since > FORGET_SECONDS:
                cached.cache_clear()
                since = time.monotonic()
            return cached(*args)
        return call
    return wrap


def conversation_id(secret: bytes, user: str, business: str, epoch: int) -> str:
    message = b"\0".join((b"relayd/v1 conversation", user.encode(), business.encode(),
                          str(epoch).encode()))
    digest = hmac.new(secret, message, hashlib.sha256).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def _token(secret: bytes, label: bytes, value: str) -> str:
    """HMAC-SHA256 of `value` under `label`, 160 bits in base32 (32 characters of a-z2-7)."""
    digest = hmac.new(secret, label + b"\0" + value.encode(), hashlib.sha256).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


@forgetful(maxsize=65536)
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


def pseudonym(secret: bytes, kind: str, value: str) -> str:
    """The store's name for a user, device or source: HMAC-SHA256, 160 bits in base32.
    Not cached: a source is new with each message (see person_pseudonym)."""
    digest = hmac.new(secret, b"relayd/v1 store " + kind.encode() + b"\0" + value.encode(),
                      hashlib.sha256).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


@forgetful(maxsize=65536)
def person_pseudonym(secret: bytes, kind: str, value: str) -> str:
    """pseudonym() of a user or a device, which the hot path asks for again and again."""
    return pseudonym(secret, kind, value)


def receipt_mac(secret: bytes, business: str, conversation: str, message_id: str) -> str:
    """A keyed hash of one business message, 128 bits in base32: only relayd can write a
    receipt token that it will believe."""
    digest = hmac.new(secret, b"\0".join((b"relayd/v1 receipt", business.encode(),
                                          conversation.encode(), message_id.encode())),
                      hashlib.sha256).digest()[:16]
    return base64.b32encode(digest).decode("ascii").lower().rstrip("=")
