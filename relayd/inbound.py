"""The inbound path: a device's sealed message becomes a business event and echoes.

prepare() is synchronous and runs in delivery order: it opens the envelope and names the
lane (the device) so that one device's messages are handled in the order sent. handle()
verifies, applies the conversation rules and publishes; it raises PermanentError for
input that can never be accepted.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ed25519

from relayd import envelope, opaque, payload, ratelimit
from relayd.config import Settings
from relayd.crypto import Kem, PublicKey, WeakKeyError, ed25519_public
from relayd.errors import EnvelopeError, PermanentError
from relayd.keys import KeyRing
from relayd.store import Conversation, Device, Store


class Sink(Protocol):
    """Where the handlers' output goes; each call completes when the broker confirmed it."""

    def to_business(self, business: str, body: bytes, message_id: str,
                    kind: str) -> Awaitable[None]: ...

    def to_device(self, device: str, sealed: bytes) -> Awaitable[None]: ...


@dataclass(frozen=True, slots=True)
class Opened:
    device: str  # not trusted yet: it only names the key that must verify the signature
    signature: bytes
    payload: bytes
    claims: dict[str, Any]


# A conversation's last activity (updated_ms, which retention reads in days) is written at
# most once a minute: the write it saves was a fifth of an inbound message's cost.
ACTIVITY_GRANULARITY_MS = 60_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@functools.lru_cache(maxsize=16384)
def _enc_key(kem: Kem, raw: bytes) -> PublicKey:
    return kem.public_key(raw)


@functools.lru_cache(maxsize=16384)
def _sign_key(raw: bytes) -> ed25519.Ed25519PublicKey | None:
    """The device's verifying key; None for one that must never verify (a weak key that
    reached the store before relayd checked keys at `device add`). A key of the wrong
    length is corrupt registry data: its ValueError is the handler's bug to report."""
    try:
        return ed25519_public(raw)
    except WeakKeyError:
        return None


def seal_down(keys: KeyRing, device: Device, body: bytes) -> bytes:
    return envelope.seal(body, direction="down", kid=device.id, kem=device.kem,
                         recipient=_enc_key(device.kem, device.enc_key), signer=keys.signing)


async def fan_out(store: Store, keys: KeyRing, sink: Sink, devices: list[Device], source: str,
                  message_id: str, sender: str, kind: str, body: dict[str, Any]) -> None:
    """Seal one message separately to each device, with its own down seq, and publish."""
    if not devices:
        return
    ts = now_ms()
    seqs = await store.allocate_seqs(source, [d.id for d in devices], ts)
    await asyncio.gather(*(
        sink.to_device(d.id, seal_down(keys, d, payload.down_payload(
            d.id, seqs[d.id], ts, message_id, sender, kind, body)))
        for d in devices if d.id in seqs
    ))


class Inbound:
    def __init__(self, settings: Settings, store: Store, keys: KeyRing, sink: Sink) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys
        self.sink = sink
        self.device_rate = ratelimit.RateLimiter(settings.limits.device_rate,
                                                 settings.limits.device_burst)

    def prepare(self, body: bytes, kid: object) -> Opened:
        """Open the envelope; EnvelopeError when it is too large, for no key of ours, or
        does not decrypt."""
        if len(body) > self.settings.limits.max_envelope_bytes:
            raise EnvelopeError("too_large", "envelope exceeds limits.max_envelope_bytes")
        key = self.keys.hpke.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise EnvelopeError("bad_kid", "relayd-kid names no key of this relay")
        signature, plain = envelope.open_sealed(body, direction="up", kid=key.kid, kem=key.kem,
                                                private=key.private)
        claims, device = payload.peek_device(plain)
        return Opened(device, signature, plain, claims)

    async def handle(self, opened: Opened, redelivered: bool) -> str:
        """Verify and act on one opened message; return what happened, for the log."""
        household = await self.store.household(opened.device)
        device = next((d for d in household if d.id == opened.device), None)
        if device is None:
            raise EnvelopeError("unknown_device", "no such device")
        signer = _sign_key(device.sign_key)
        if signer is None:
            raise EnvelopeError("bad_signature", "the device's key is one no signature may "
                                "verify under")
        envelope.verify(opened.signature, opened.payload, direction="up", signer=signer)
        if not redelivered and not self.device_rate.allow(device.id):  # retries are ours
            raise PermanentError("rate_limited", "the device is over limits.device_rate")
        up = payload.validate_up(opened.claims, self.settings.limits)
        payload.check_fresh(up.ts, now_ms(), self.settings.limits)
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
            fan_out(self.store, self.keys, self.sink, others if echo else [],
                    f"up:{device.id}:{up.seq}", up.id, business.id, *(echo or ("", {}))),
        )
        return up.type

    async def _apply_rules(self, device: Device, up: payload.Up, current: Conversation | None,
                           retry: bool) -> Conversation:
        """Only the user opens a conversation; other types need it open. `current` is the
        conversation as it was read with the business."""
        store, policy = self.store, self.settings.conversations.opaque_id_policy
        if up.type in ("start", "message"):
            if current is not None and current.state == "closed" and retry:
                return current  # closed since our first attempt: a retry reopens nothing
            if (current is not None and current.state == "open"
                    and now_ms() - current.updated_ms < ACTIVITY_GRANULARITY_MS):
                return current  # open, and its activity time is fresh enough: no write
            secret = self.keys.opaque_secret
            return await store.open_conversation(
                device.user, up.to, now_ms(), policy == "rotate_on_delete",
                lambda epoch: opaque.conversation_id(secret, device.user, up.to, epoch))
        conversation = current
        if conversation is None:
            raise PermanentError("unknown_conversation", "the user has no such conversation")
        if conversation.state == "open":
            if up.type == "close":
                await store.close_conversation(conversation.id, "user", now_ms())
            return conversation
        if retry and up.type == "close" and conversation.closed_by == "user":
            return conversation  # our own earlier attempt closed it: deliver again
        raise PermanentError("conversation_closed", "the conversation is closed")
