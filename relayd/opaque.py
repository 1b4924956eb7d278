"""Opaque conversation ids: what a business knows a user by.

HMAC-SHA256 under the relay's secret of (user, business, epoch), cut to 160 bits and
written in base32: the same user gets unlinkable ids at different businesses, a new
epoch gives an unlinkable new id, and the id encodes nothing readable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def conversation_id(secret: bytes, user: str, business: str, epoch: int) -> str:
    message = b"\0".join((b"relayd/v1 conversation", user.encode(), business.encode(),
                          str(epoch).encode()))
    digest = hmac.new(secret, message, hashlib.sha256).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


def reference(secret: bytes, kind: str, value: str) -> str:
    """A keyed hash to name a user or device in logs and audit records, never the id itself."""
    digest = hmac.new(secret, b"relayd/v1 ref " + kind.encode() + b"\0" + value.encode(),
                      hashlib.sha256).digest()[:9]
    return base64.b32encode(digest).decode("ascii").lower().rstrip("=")
