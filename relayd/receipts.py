"""Receipts: a business learns, once per message, that one of the user's devices
acknowledged its `message` at the edge (`delivered`), or that it expired undelivered in
their queues (`expired`): whichever happened first, and nothing of the devices.

relayd puts a token (header x-relayd-receipt) on each device's copy of a business
`message`: the business, the conversation and the message id, sealed (AES-256-GCM) under
a key of the opaque secret's, so that a copy that expired into relayd.dead names nothing
in clear. It comes back to relayd.receipts two ways:
- the edge publishes it, alone, to the ingress exchange (routing key `receipt`) once it
  acked the copy for the device that acknowledged it;
- a copy that outlives the device queue's TTL is dead-lettered by the broker to
  relayd.dead, headers and all, and relayd.expired passes on those whose
  x-first-death-reason is `expired`.
A token that does not open is dead-lettered as `bad_receipt`: a business cannot
write one (it may get a header of its own into relayd.dead through the broker), nor can a
device (it never sees the headers; the edge sends only what it acknowledged).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import uuid
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relayd import opaque, payload
from relayd.amqp import RECEIPT_HEADER, Delivery
from relayd.config import Settings
from relayd.consume import Work, retried
from relayd.deliver import Sink, now_ms
from relayd.errors import PermanentError
from relayd.keys import KeySource
from relayd.store import Store

HEADER: Final = RECEIPT_HEADER
NAMESPACE: Final = uuid.UUID("a1d3c0f2-6b4e-4f1a-9c8d-3e2f1b0a9d47")
MINUTE_MS: Final = 60_000


NONCE_BYTES: Final = 12
_LABEL: Final = b"relayd/v1 receipt token"


@functools.lru_cache(maxsize=4)
def _cipher(secret: bytes) -> AESGCM:
    return AESGCM(hmac.new(secret, _LABEL, hashlib.sha256).digest())


def token(secret: bytes, business: str, conversation: str, message_id: str) -> str:
    """The receipt token of one business message: its ids sealed, in base64url."""
    nonce = os.urandom(NONCE_BYTES)
    ids = "\0".join((business, conversation, message_id)).encode()
    return base64.urlsafe_b64encode(nonce + _cipher(secret).encrypt(nonce, ids, _LABEL)).decode()


def read(secret: bytes, value: object) -> tuple[str, str, str]:
    """(business, conversation, message id) of a token relayd wrote; bad_receipt else."""
    if isinstance(value, str) and " " in value:
        return _read_in_clear(secret, value)
    try:
        sealed = base64.urlsafe_b64decode(value if isinstance(value, str) else "")
        ids = _cipher(secret).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _LABEL)
        business, conversation, message_id = ids.decode().split("\0")
    except (ValueError, InvalidTag):  # not base64, too short, forged, not three ids
        raise PermanentError("bad_receipt", "not a receipt token of this relay") from None
    return business, conversation, message_id


def _read_in_clear(secret: bytes, value: str) -> tuple[str, str, str]:
    """A token of contract 1.4, its ids in clear with a MAC: on copies queued before the
    upgrade to 1.5. None is left once topology.device_message_ttl_days has passed since."""
    parts = value.split(" ") if value.isascii() else []
    if len(parts) != 4 or not hmac.compare_digest(
            opaque.receipt_mac(secret, *parts[:3]).encode(), parts[3].encode()):
        raise PermanentError("bad_receipt", "not a receipt token of this relay")
    business, conversation, message_id, _ = parts
    return business, conversation, message_id


def coarse(ts_ms: int) -> int:
    """A time to the minute (docs/privacy.md: why no finer)."""
    return ts_ms - ts_ms % MINUTE_MS


class Receipts:
    """Handles relayd.receipts; `keys` is read at each message."""

    def __init__(self, settings: Settings, store: Store, keys: KeySource, sink: Sink) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys
        self.sink = sink

    def prepare(self, delivery: Delivery) -> tuple[str | None, Work]:
        headers = delivery.headers or {}
        t = self.settings.topology
        if delivery.exchange == t.ingress_exchange:
            kind = "delivered"
        elif headers.get("x-first-death-reason") == "expired":
            kind = "expired"
        else:
            raise PermanentError("bad_receipt", "neither the edge's nor an expired copy")
        if kind == "expired" and HEADER not in headers:  # a typing indicator, an echo…
            return None, _nothing
        business, conversation, message_id = read(self.keys().opaque_secret,
                                                  headers.get(HEADER))
        return None, retried(functools.partial(self.handle, kind, business, conversation,
                                               message_id), bool(delivery.redelivered))

    async def handle(self, kind: str, business: str, conversation: str, message_id: str,
                     redelivered: bool, sent: set[str] | None = None) -> str:
        """Tell the business unless another receipt of the message was first. A
        redelivery, or a retry in place, tells it again (the first run may have died
        before its publish): the same event, with the same message_id."""
        key = hashlib.sha256(f"{business}\0{message_id}".encode()).hexdigest()[:32]
        now = now_ms()
        first, mine = await self.store.claim_receipt(key, kind, now)
        if first != kind or not (mine or redelivered):
            return f"{kind}_again"  # told already, of this or of the other kind
        event_id = str(uuid.uuid5(NAMESPACE, f"{business}:{message_id}:{kind}"))
        await self.sink.to_business(business, payload.receipt_event(
            kind, message_id, conversation, coarse(now)), event_id, kind)
        return kind


async def _nothing() -> str:
    return "no_receipt"
