"""Receipts: a business learns, once per message, that one of the user's devices
acknowledged its `message` at the edge (`delivered`), or that it expired undelivered in
their queues (`expired`): whichever happened first, and nothing of the devices.

relayd puts a token (header x-relayd-receipt) on each device's copy of a business
`message`: the business, the conversation, the message id and a MAC under the opaque
secret. It comes back to relayd.receipts two ways:
- the edge publishes it, alone, to the ingress exchange (routing key `receipt`) once it
  acked the copy for the device that acknowledged it;
- a copy that outlives the device queue's TTL is dead-lettered by the broker to
  relayd.dead, headers and all, and relayd.expired passes on those whose
  x-first-death-reason is `expired`.
A token whose MAC does not verify is dead-lettered as `bad_receipt`: a business cannot
write one (it may get a header of its own into relayd.dead through the broker), nor can a
device (it never sees the headers; the edge sends only what it acknowledged).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import uuid
from typing import Final

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


def token(secret: bytes, business: str, conversation: str, message_id: str) -> str:
    """The receipt token of one business message."""
    mac = opaque.receipt_mac(secret, business, conversation, message_id)
    return f"{business} {conversation} {message_id} {mac}"


def read(secret: bytes, value: object) -> tuple[str, str, str]:
    """(business, conversation, message id) of a token relayd wrote; bad_receipt else."""
    parts = value.split(" ") if isinstance(value, str) and value.isascii() else []
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
