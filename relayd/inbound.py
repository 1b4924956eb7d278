"""The inbound path: a device's sealed message becomes a business event and echoes.

prepare() (relayd.consume.Handler) is synchronous and runs in delivery order: it opens
the envelope (open_up) and names the lane (the device and the business it writes to) so
that one device's messages in one conversation are handled in the order sent. handle()
verifies, then claims the (device, seq), applies the conversation rules and allocates the
echo's seqs in one store transaction (Store.accept_up), and publishes; it raises
PermanentError for input that can never be accepted.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from relayd import envelope, log, metrics, opaque, payload, ratelimit, shard
from relayd.amqp import Delivery
from relayd.config import Limits, Settings, Topology, relay_user
from relayd.consume import Work, retried
from relayd.crypto import WeakKeyError, ed25519_public
from relayd.deliver import Sink, fan_out, now_ms, once
from relayd.errors import (
    EnvelopeError,
    PermanentError,
    StoreError,
    StoreUnavailableError,
    TransientError,
)
from relayd.keys import KeyRing, KeySource
from relayd.store import Device, Store, UpClaim

# Households (a device's user's devices) kept in the process; Store.accept_up checks a
# cached one against the store in the transaction that uses it. They hold account and
# device ids: all are dropped at the first message after HOUSEHOLDS_SECONDS, so that an
# erased user's leave this process's memory (docs/privacy.md).
HOUSEHOLDS_CACHED = 16384
HOUSEHOLDS_SECONDS = 60.0
_log = log.get("relayd.inbound")
DEVICE_ERROR_NAMESPACE = uuid.UUID("0d6b7f9e-3c1a-4f52-8e7d-2a9c5b1e4f60")


@dataclass(frozen=True, slots=True)
class Opened:
    device: str  # not trusted yet: it only names the key that must verify the signature
    signature: bytes
    payload: bytes
    claims: dict[str, Any]
    judged: bool  # the edge, which applied the rate limit on arrival, published it


@opaque.forgetful(maxsize=16384)
def _sign_key(raw: bytes) -> ed25519.Ed25519PublicKey | None:
    """The device's verifying key; None for one that must never verify (a weak key that
    reached the store before relayd checked keys at `device add`). A key of the wrong
    length is corrupt registry data: ValueError, which handle() reports as StoreError."""
    try:
        return ed25519_public(raw)
    except WeakKeyError:
        return None


def from_relayd(delivery: Delivery, t: Topology, user: str | None) -> bool:
    """Whether relayd published `delivery` (the edge, or the router forwarding the edge's):
    through relayd.shards, which only relayd may write, or with the broker-validated
    user_id of relayd's own broker user (`user`: config.relay_user). Anyone who may write
    relayd.ingress can set x-relayd-device; only relayd's is believed to say that the
    edge judged the message against the device's rate limit."""
    return ((t.shards > 1 and delivery.exchange == t.shard_exchange)
            or (user is not None and delivery.user_id == user))


def open_up(body: bytes, kid: object, keyring: KeyRing, limits: Limits,
            edge_device: object = None, stamped: bool = False) -> Opened:
    """Open an up envelope far enough to name its device; EnvelopeError when it is too
    large, for no key of ours, does not decrypt, names no device, or says it came
    through the edge (`edge_device`: its x-relayd-device header, None when absent) from
    another device than it names. It was judged against the rate limit already when
    relayd set that header (`stamped`: from_relayd)."""
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
    return Opened(device, signature, plain, claims, stamped and edge_device is not None)


def lane(opened: Opened) -> str:
    """A message's lane: its device's conversation with the business it names, so that a
    business that cannot take messages holds back no other business's."""
    to = opened.claims.get("to")
    return f"d:{opened.device}\0{to if isinstance(to, str) else ''}"


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
        self._households: OrderedDict[str, tuple[Device, ...]] = OrderedDict()
        self._relay_user = relay_user(settings)
        self._households_since = time.monotonic()

    def prepare(self, delivery: Delivery) -> tuple[str | None, Work]:
        headers = delivery.headers or {}
        opened = self.open(delivery.body, headers.get(envelope.KID_HEADER),
                           headers.get(envelope.DEVICE_HEADER),
                           from_relayd(delivery, self.settings.topology, self._relay_user))
        again = shard.redelivered(delivery, self.settings.topology)
        return lane(opened), retried(functools.partial(self.handle, opened), again)

    def open(self, body: bytes, kid: object, edge_device: object = None,
             stamped: bool = False) -> Opened:
        return open_up(body, kid, self.keys(), self.settings.limits, edge_device, stamped)

    async def handle(self, opened: Opened, redelivered: bool,
                     sent: set[str] | None = None) -> str:
        """Verify and act on one opened message; return what happened, for the log.
        `sent`: what an earlier run of this delivery had confirmed (relayd.deliver.once)."""
        household = await self._household(opened.device, cached=True)
        device = self._verify(opened, household)
        try:
            return await self._act(opened, household, device, redelivered, sent)
        except PermanentError as exc:
            if exc.reason in payload.DEVICE_ERROR_CODES:
                await self._tell(opened, exc.reason)
            raise

    async def _tell(self, opened: Opened, code: str) -> None:
        """Seal an `error` to the device whose verified message is refused with `code`, and
        to no other. It is verified again against the store as it is now (the household
        may be a cached one): a device removed or given new keys since is told nothing.
        Best effort: the message is dead-lettered with its reason whether or not this goes
        out (retried, a refused message could pass: a redelivery is not judged against
        the rate limit again)."""
        try:
            device = self._verify(opened, await self._household(opened.device, cached=False))
        except (EnvelopeError, StoreError, StoreUnavailableError, TransientError):
            return
        sender, body = payload.device_error(opened.claims, code)
        digest = hashlib.sha256(opened.payload).hexdigest()[:32]  # this message, exactly
        error_id = str(uuid.uuid5(DEVICE_ERROR_NAMESPACE, f"{device.id}:{digest}:{code}"))
        try:
            await fan_out(self.store, self.keys(), self.sink, [device],
                          f"error:{device.id}:{digest}", error_id, sender, "error", body)
        except (TransientError, StoreUnavailableError) as exc:
            _log.warning("device_error_lost", reason=getattr(exc, "reason", "store_unavailable"))
            metrics.skipped("device_error_lost")

    async def _act(self, opened: Opened, household: tuple[Device, ...], device: Device,
                   redelivered: bool, sent: set[str] | None) -> str:
        """Act on a message whose signature verified: refused with PermanentError, or
        passed on."""
        up = self._valid(opened)
        # Judged when the device sent it (ts, fresh by now), not when it is drained: a
        # backlog after an outage stays within the rate. Retries are ours: not counted.
        # The edge judged its messages on arrival, in real time, before it acked them:
        # judged again here, on another clock, a message the device was told the relay
        # has could still be dead-lettered (as one resent after a nack, with its old ts).
        if not (redelivered or opened.judged) and not self.device_rate.allow(
                device.id, up.ts / 1000):
            raise PermanentError("rate_limited", "the device is over limits.device_rate")
        outcome = await self.store.accept_up(self._claim(household, device, up, redelivered))
        if outcome.status == "stale":  # a key or a device changed since it was cached
            household = await self._household(opened.device, cached=False)
            device, up = self._verify(opened, household), self._valid(opened)
            outcome = await self.store.accept_up(
                self._claim(household, device, up, redelivered))
            if outcome.status == "stale":
                raise TransientError("store_busy", "the household changed twice")
        if outcome.status == "unknown_business":
            raise PermanentError("unknown_business", "no such business")
        if outcome.status == "replayed":
            raise EnvelopeError("replayed", "this (device, seq) was accepted before")
        if outcome.refusal is not None:
            raise PermanentError(*outcome.refusal)
        business, conversation = outcome.business, outcome.conversation
        assert business is not None  # accepted
        assert conversation is not None
        event = payload.business_event(up.type, conversation.id, up.id, now_ms(), up.body,
                                       device.user if business.first_party else None)
        to_business = once(sent, "b:" + business.id,
                           lambda: self.sink.to_business(business.id, event, up.id, up.type))
        echo = _echo(up)
        others = [d for d in household if d.id != device.id] if echo else []
        if not (echo and others):  # the common case: no task for an empty fan-out
            await to_business
            return up.type
        await asyncio.gather(to_business, fan_out(
            self.store, self.keys(), self.sink, others, _source(device, up), up.id,
            business.id, *(echo or ("", {})), seqs=outcome.seqs, sent=sent))
        return up.type

    async def _household(self, device_id: str, cached: bool) -> tuple[Device, ...]:
        """The devices of `device_id`'s user, from the cache when `cached` and there;
        Store.accept_up tells when a cached one is stale."""
        if time.monotonic() - self._households_since > HOUSEHOLDS_SECONDS:
            self._households.clear()
            self._households_since = time.monotonic()
        if cached and (found := self._households.get(device_id)) is not None:
            self._households.move_to_end(device_id)
            return found
        household = tuple(await self.store.household(device_id))
        self._households.pop(device_id, None)
        if household:  # an unknown device is not remembered: it may be added any time
            self._households[device_id] = household
            while len(self._households) > HOUSEHOLDS_CACHED:
                self._households.popitem(last=False)
        return household

    def _verify(self, opened: Opened, household: tuple[Device, ...]) -> Device:
        """The sender among `household`, whose key the message's signature verifies under."""
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
        return device

    def _valid(self, opened: Opened) -> payload.Up:
        """The verified message, every field checked, and fresh."""
        up = payload.validate_up(opened.claims, self.settings.limits)
        payload.check_fresh(up.ts, now_ms(), self.settings.limits)
        return up

    def _claim(self, household: tuple[Device, ...], device: Device, up: payload.Up,
               redelivered: bool) -> UpClaim:
        secret = self.keys().opaque_secret
        echo_to = tuple(d.id for d in household if d.id != device.id) if _echo(up) else ()
        return UpClaim(
            household, device.id, up.seq, self.settings.limits.replay_window, up.to,
            up.type, redelivered, now_ms(),
            self.settings.conversations.opaque_id_policy == "rotate_on_delete",
            lambda epoch: opaque.conversation_id(secret, device.user, up.to, epoch),
            echo_to, _source(device, up))


def _echo(up: payload.Up) -> tuple[str, dict[str, Any]] | None:
    """What the sender's other devices are sent of `up`, if anything."""
    if up.type in payload.ECHOED:
        return "echo", {"type": up.type, "body": up.body}
    if up.type == "close":
        return "close", {}
    return None


def _source(device: Device, up: payload.Up) -> str:
    return f"up:{device.id}:{up.seq}"
