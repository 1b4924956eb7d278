"""The inbound path: a device's sealed message becomes a business event and echoes.

prepare() (relayd.consume.Handler) is synchronous and runs in delivery order: it opens
the envelope (open_up) and names the lane (the device) so that one device's messages are
handled in the order sent. handle() verifies, applies the conversation rules and
publishes; it raises PermanentError for input that can never be accepted.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from relayd import envelope, opaque, payload, ratelimit, rules, shard
from relayd.amqp import Delivery
from relayd.config import Limits, Settings
from relayd.consume import Work
from relayd.crypto import WeakKeyError, ed25519_public
from relayd.deliver import Sink, fan_out, now_ms
from relayd.errors import EnvelopeError, PermanentError, StoreError
from relayd.keys import KeyRing, KeySource
from relayd.store import Conversation, Device, Store


@dataclass(frozen=True, slots=True)
class Opened:
    device: str  # not trusted yet: it only names the key that must verify the signature
    signature: bytes
    payload: bytes
    claims: dict[str, Any]
    judged: bool  # it came through the edge, which applied the rate limit on arrival


@functools.lru_cache(maxsize=16384)
def _sign_key(raw: bytes) -> ed25519.Ed25519PublicKey | None:
    """The device's verifying key; None for one that must never verify (a weak key that
    reached the store before relayd checked keys at `device add`). A key of the wrong
    length is corrupt registry data: ValueError, which handle() reports as StoreError."""
    try:
        return ed25519_public(raw)
    except WeakKeyError:
        return None


def open_up(body: bytes, kid: object, keyring: KeyRing, limits: Limits,
            edge_device: object = None) -> Opened:
    """Open an up envelope far enough to name its device; EnvelopeError when it is too
    large, for no key of ours, does not decrypt, names no device, or came through the
    edge (`edge_device`: its x-relayd-device header, None when absent) from another
    device than it names."""
    if len(body) > limits.max_envelope_bytes:
        raise EnvelopeError("too_large", "envelope exceeds limits.max_envelope_bytes")
    key = keyring.hpke.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise EnvelopeError("bad_kid", "relayd-kid names no key of this relay")
    signature, plain = envelope.open_sealed(body, direction="up", kid=key.kid, kem=key.kem,
                                            private=key.private)
    claims, device = payload.peek_device(plain)
    if edge_device is not None and edge_device != device:
        raise EnvelopeError("wrong_device", "sealed by another device than logged in")
    return Opened(device, signature, plain, claims, edge_device is not None)


class Inbound:
    """Handles the inbound queue; `keys` is read at each message, so a reload takes effect
    at the next one."""

    def __init__(self, settings: Settings, store: Store, keys: KeySource, sink: Sink) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys
        self.sink = sink
        limits = settings.limits
        self.device_rate = ratelimit.RateLimiter(limits.device_rate, limits.device_burst,
                                                 clock=time.time,
                                                 horizon_s=limits.max_age_seconds,
                                                 skew_s=limits.clock_skew_seconds)

    def prepare(self, delivery: Delivery) -> tuple[str | None, Work]:
        headers = delivery.headers or {}
        opened = self.open(delivery.body, headers.get(envelope.KID_HEADER),
                           headers.get(envelope.DEVICE_HEADER))
        again = shard.redelivered(delivery, self.settings.topology)
        return "d:" + opened.device, lambda: self.handle(opened, again)

    def open(self, body: bytes, kid: object, edge_device: object = None) -> Opened:
        return open_up(body, kid, self.keys(), self.settings.limits, edge_device)

    async def handle(self, opened: Opened, redelivered: bool) -> str:
        """Verify and act on one opened message; return what happened, for the log."""
        household = await self.store.household(opened.device)
        device = next((d for d in household if d.id == opened.device), None)
        if device is None:
            raise EnvelopeError("unknown_device", "no such device")
        try:
            signer = _sign_key(device.sign_key)
        except ValueError:  # corrupt registry data, as a bug would leave: internal_error
            raise StoreError("a device's signing key in the store is no Ed25519 key") from None
        if signer is None:
            raise EnvelopeError("bad_signature", "the device's key is one no signature may "
                                "verify under")
        envelope.verify(opened.signature, opened.payload, direction="up", signer=signer)
        up = payload.validate_up(opened.claims, self.settings.limits)
        payload.check_fresh(up.ts, now_ms(), self.settings.limits)
        # Judged when the device sent it (ts, fresh by now), not when it is drained: a
        # backlog after an outage stays within the rate. Retries are ours: not counted.
        # The edge judged its messages on arrival, in real time, before it acked them:
        # judged again here, on another clock, a message the device was told the relay
        # has could still be dead-lettered (as one resent after a nack, with its old ts).
        if not (redelivered or opened.judged) and not self.device_rate.allow(
                device.id, up.ts / 1000):
            raise PermanentError("rate_limited", "the device is over limits.device_rate")
        business, current = await self.store.business_and_conversation(up.to, device.user)
        if business is None:
            raise PermanentError("unknown_business", "no such business")
        window = self.settings.limits.replay_window
        first_time = await self.store.claim_seq(device.id, up.seq, window)
        if not first_time and not redelivered:
            raise EnvelopeError("replayed", "this (device, seq) was accepted before")
        conversation = await self._apply_rules(device, up, current, retry=not first_time)
        event = payload.business_event(up.type, conversation.id, up.id, now_ms(), up.body,
                                       device.user if business.first_party else None)
        others = [d for d in household if d.id != device.id]
        echo: tuple[str, dict[str, Any]] | None = None
        if up.type in payload.ECHOED:
            echo = ("echo", {"type": up.type, "body": up.body})
        elif up.type == "close":
            echo = ("close", {})
        await asyncio.gather(
            self.sink.to_business(business.id, event, up.id, up.type),
            fan_out(self.store, self.keys(), self.sink, others if echo else [],
                    f"up:{device.id}:{up.seq}", up.id, business.id, *(echo or ("", {}))),
        )
        return up.type

    async def _apply_rules(self, device: Device, up: payload.Up, current: Conversation | None,
                           retry: bool) -> Conversation:
        """Apply relayd.rules to `current`, the conversation as read with the business."""
        decision = rules.up(current, up.type, retry, now_ms())
        if decision.refusal is not None:
            raise PermanentError(decision.refusal, decision.detail)
        if decision.write == "open":
            secret = self.keys().opaque_secret
            return await self.store.open_conversation(
                device.user, up.to, now_ms(),
                self.settings.conversations.opaque_id_policy == "rotate_on_delete",
                lambda epoch: opaque.conversation_id(secret, device.user, up.to, epoch))
        assert current is not None  # rules.up opens or refuses when there is none
        if decision.write == "close":
            await self.store.close_conversation(current.id, "user", now_ms())
        return current
