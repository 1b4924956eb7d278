"""The reverse path: a business reply becomes one sealed message per device of the user.

The business is known only by the broker-validated AMQP user_id. A reply that cannot be
trusted (no user_id, or one that maps to no business) raises PermanentError and is
dead-lettered; every other rejection is answered with an error event in the business's
inbox, and no device receives anything.
"""

from __future__ import annotations

import functools
import hashlib
import time
import uuid
from dataclasses import dataclass

from relayd import payload, ratelimit, receipts, shard
from relayd.amqp import Delivery
from relayd.config import Limits, Settings
from relayd.consume import Work, retried
from relayd.deliver import Sink, fan_out, now_ms
from relayd.errors import PermanentError, ReplyError, TransientError
from relayd.keys import KeySource
from relayd.store import Business, ReplyClaim, ReplyOutcome, Store

ERROR_NAMESPACE = uuid.UUID("5b0f3c4e-8d0a-4a43-9a53-6f1f2f4d7c11")
# How long the worker keeps the businesses it read by AMQP user. Store.accept_reply checks
# the business is still as read, so a changed one is read again at once; this bounds how
# long a removed business's row stays in memory.
BUSINESSES_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Incoming:
    amqp_user: str | None
    routing_key: str
    reply: payload.Reply | None
    rejection: ReplyError | None  # why the reply failed to parse, if it did
    raw: bytes


def parse(body: bytes, amqp_user: str | None, routing_key: str, limits: Limits) -> Incoming:
    """Parse a reply; a ReplyError is kept in it, to be answered once the business is
    known, so the lane (the conversation) is always known."""
    try:
        return Incoming(amqp_user, routing_key, payload.parse_reply(body, limits), None, body)
    except ReplyError as exc:
        return Incoming(amqp_user, routing_key, None, exc, body)


def lane(incoming: Incoming) -> str:
    """The reply's lane: its conversation ("" for a reply that names none)."""
    return "c:" + (incoming.reply.conversation if incoming.reply else "")


class Outbound:
    """Handles the outbound queue; `keys` is read at each message."""

    def __init__(self, settings: Settings, store: Store, keys: KeySource, sink: Sink) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys
        self.sink = sink
        self.business_rate = ratelimit.RateLimiter(settings.limits.business_rate,
                                                   settings.limits.business_burst)
        self._businesses: dict[str, Business] = {}  # by AMQP user
        self._businesses_since = time.monotonic()

    async def _business(self, amqp_user: str, fresh: bool = False) -> Business:
        """The business of `amqp_user`, from memory unless `fresh`; PermanentError when
        there is none."""
        if fresh or time.monotonic() - self._businesses_since > BUSINESSES_SECONDS:
            self._businesses.clear()
            self._businesses_since = time.monotonic()
        business = self._businesses.get(amqp_user)
        if business is None:
            business = await self.store.business_by_amqp_user(amqp_user)
            if business is None:
                raise PermanentError("unknown_business", "user_id maps to no business")
            self._businesses[amqp_user] = business
        return business

    def prepare(self, delivery: Delivery) -> tuple[str | None, Work]:
        t = self.settings.topology
        incoming = parse(delivery.body, *shard.origin(delivery, t), self.settings.limits)
        again = shard.redelivered(delivery, t)
        return lane(incoming), retried(functools.partial(self.handle, incoming), again)

    async def handle(self, incoming: Incoming, redelivered: bool,
                     sent: set[str] | None = None) -> str:
        """Deliver the reply or answer it with an error; return what happened, for the log.
        `sent`: what an earlier run of this delivery had confirmed (relayd.deliver.once)."""
        if not incoming.amqp_user:
            raise PermanentError("unauthenticated", "a reply without user_id is not trusted")
        business = await self._business(incoming.amqp_user)
        try:
            self._charge(business, redelivered)
            reply = self._accepted(business, incoming)
            outcome = await self._accept(business, reply, redelivered)
            if outcome.status == "stale":  # the business changed since it was read
                business = await self._business(incoming.amqp_user, fresh=True)
                reply = self._accepted(business, incoming)
                outcome = await self._accept(business, reply, redelivered)
                if outcome.status == "stale":
                    raise TransientError("store_busy", "the business changed meanwhile")
            await self._deliver(business, reply, outcome, sent)
        except ReplyError as exc:
            try:
                await self._answer(business, incoming, exc)
            except TransientError as failed:
                if failed.reason not in ("nacked", "unroutable"):
                    raise
                # Its inbox refuses the error event (full, or gone): keep the reply in
                # relayd.dead under its code instead of holding a worker slot to retry.
                raise PermanentError(exc.reason, "the error event was refused") from None
            return f"error:{exc.reason}"
        return reply.type

    def _charge(self, business: Business, redelivered: bool) -> None:
        """Count the reply against the business's rate; a redelivery is our own retry."""
        if not redelivered and not self.business_rate.allow(business.id):
            raise ReplyError("rate_limited", "over limits.business_rate: not delivered")

    @staticmethod
    def _accepted(business: Business, incoming: Incoming) -> payload.Reply:
        if incoming.routing_key != business.id:
            raise ReplyError("invalid", "the routing key must be your business id")
        if incoming.reply is None:
            raise incoming.rejection or ReplyError("invalid", "unparsable reply")
        return incoming.reply

    async def _accept(self, business: Business, reply: payload.Reply,
                      redelivered: bool) -> ReplyOutcome:
        """Apply relayd.rules to the reply's conversation and number its copies, in one
        store transaction (Store.accept_reply); ReplyError if the rules refuse it."""
        outcome = await self.store.accept_reply(ReplyClaim(
            business, reply.conversation, reply.type, redelivered,
            f"reply:{business.id}:{reply.id}", now_ms()))
        if outcome.refusal is not None:
            raise ReplyError(*outcome.refusal)
        return outcome

    async def _deliver(self, business: Business, reply: payload.Reply, outcome: ReplyOutcome,
                       sent: set[str] | None) -> None:
        """Seal the reply to every device of the conversation's user, and publish."""
        keyring = self.keys()
        receipt = (receipts.token(keyring.opaque_secret, business.id, reply.conversation,
                                  reply.id) if reply.type == "message" else None)
        await fan_out(self.store, keyring, self.sink, list(outcome.devices),
                      f"reply:{business.id}:{reply.id}", reply.id, business.id, reply.type,
                      reply.body, seqs=outcome.seqs, sent=sent, receipt=receipt)

    async def _answer(self, business: Business, incoming: Incoming, error: ReplyError) -> None:
        ref, conversation = payload.reply_ref(incoming.raw)
        if incoming.reply is not None:
            ref, conversation = incoming.reply.id, incoming.reply.conversation
        # Stable across redeliveries of this reply, distinct between replies.
        source = ref or hashlib.sha256(incoming.raw).hexdigest()
        event_id = str(uuid.uuid5(ERROR_NAMESPACE, f"{business.id}:{source}:{error.reason}"))
        await self.sink.to_business(
            business.id, payload.error_event(ref, conversation, error.reason, error.detail),
            event_id, "error")
