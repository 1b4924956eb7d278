"""The reverse path: a business reply becomes one sealed message per device of the user.

The business is known only by the broker-validated AMQP user_id. A reply that cannot be
trusted (no user_id, or one that maps to no business) raises PermanentError and is
dead-lettered; every other rejection is answered with an error event in the business's
inbox, and no device receives anything.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from dataclasses import dataclass

from relayd import payload, ratelimit, receipts, rules, shard
from relayd.amqp import Delivery
from relayd.config import Limits, Settings
from relayd.consume import Work, retried
from relayd.deliver import Sink, fan_out, now_ms
from relayd.errors import PermanentError, ReplyError, TransientError
from relayd.keys import KeySource
from relayd.store import Business, Store

ERROR_NAMESPACE = uuid.UUID("5b0f3c4e-8d0a-4a43-9a53-6f1f2f4d7c11")


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
        business = await self.store.business_by_amqp_user(incoming.amqp_user)
        if business is None:
            raise PermanentError("unknown_business", "user_id maps to no business")
        try:
            self._charge(business, redelivered)
            reply = self._accepted(business, incoming)
            await self._deliver(business, reply, redelivered, sent)
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

    async def _deliver(self, business: Business, reply: payload.Reply, redelivered: bool,
                       sent: set[str] | None) -> None:
        """Apply relayd.rules to the reply's conversation, then seal it to every device."""
        conversation = await self.store.conversation(reply.conversation)
        decision = rules.reply(conversation, business.id, reply.type, redelivered)
        if decision.refusal is not None:
            raise ReplyError(decision.refusal, decision.detail)
        assert conversation is not None  # rules.reply refuses when there is none
        if decision.write == "close":
            await self.store.close_conversation(conversation.id, "business", now_ms())
        devices = await self.store.devices_of(conversation.user)
        receipt = (receipts.token(self.keys().opaque_secret, business.id, conversation.id,
                                  reply.id) if reply.type == "message" else None)
        await fan_out(self.store, self.keys(), self.sink, devices,
                      f"reply:{business.id}:{reply.id}", reply.id, business.id, reply.type,
                      reply.body, sent=sent, receipt=receipt)

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
