"""Ordered scale-out: each direction split into `topology.shards` queues, one consumer each.

With one shard (the default) the relay consumes the contract's queues directly. With N,
those queues become entry queues: one router per direction (an exclusive consumer, held by
one relayd process, taken over by another when it dies) reads them in order and forwards
each message, untouched, to shard queue `<queue>.<k>` with k = hash(lane) % N, acking
only once the broker confirmed the copy. The lane is the device going in (the router opens
the envelope to learn it) and the conversation going out. Each shard queue has a single
active consumer (x-single-active-consumer), so one lane is handled by one process at a
time, in order, even while two processes briefly both believe a shard is theirs.

The shards are shared out by relayd, not by the broker: every process of a role marks
itself alive in the store every `topology.shard_member_ttl / 3` seconds and consumes its
share (see share()) of the shards among the members alive. A process that stops leaves
at once; one that dies is forgotten after `shard_member_ttl`, and its shards move to the
others. docs/scaling.md weighs this against the alternatives.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from relayd import amqp, envelope
from relayd.config import Settings, Topology
from relayd.inbound import Inbound, Opened
from relayd.keys import KeyRing
from relayd.outbound import Incoming, Outbound
from relayd.store import Store

USER_HEADER = "x-relayd-amqp-user"  # the broker-validated user_id of a forwarded reply
ROUTING_KEY_HEADER = "x-relayd-routing-key"  # the routing key it was published with
REDELIVERED_HEADER = "x-relayd-redelivered"  # the router got it redelivered: maybe a retry


def shard_of(lane: str, shards: int) -> int:
    """The shard of a lane, the same in every process and on every host."""
    return int.from_bytes(hashlib.blake2b(lane.encode(), digest_size=8).digest(), "big") % shards


def entry_queue(t: Topology, role: str) -> str:
    return {"inbound": t.inbound_queue, "outbound": t.outbound_queue,
            "gdpr": t.gdpr_queue}[role]


def sharded(t: Topology, role: str) -> bool:
    """Whether `role`'s queue is split (erase requests never are: they are rare)."""
    return t.shards > 1 and role in ("inbound", "outbound")


def shard_queue(t: Topology, role: str, k: int) -> str:
    return f"{entry_queue(t, role)}.{k}"


def share(members: list[str], member: str, shards: int) -> set[int]:
    """The shards `member` consumes: dealt round the members in sorted order, so that
    every process seeing the same members agrees, and no two hold more than one apart."""
    ranked = sorted(set(members) | {member})
    return set(range(ranked.index(member), shards, len(ranked)))


def _forwarded(message: AbstractIncomingMessage, t: Topology) -> bool:
    """True if the router put this message in its shard: only then are its headers ours."""
    return t.shards > 1 and message.exchange == t.shard_exchange


def origin(message: AbstractIncomingMessage, t: Topology) -> tuple[str | None, str]:
    """The (user_id, routing key) a business published a reply with."""
    if _forwarded(message, t):
        headers = message.headers or {}
        user, key = headers.get(USER_HEADER), headers.get(ROUTING_KEY_HEADER)
        return (user if isinstance(user, str) else None), (key if isinstance(key, str) else "")
    return message.user_id, message.routing_key or ""


def redelivered(message: AbstractIncomingMessage, t: Topology) -> bool:
    """True if this delivery may repeat one handled before (here or before the router)."""
    return bool(message.redelivered) or (
        _forwarded(message, t) and bool((message.headers or {}).get(REDELIVERED_HEADER)))


@dataclass(frozen=True, slots=True)
class Routed(Opened):
    sealed: bytes
    kid: str


class InboundRouter(Inbound):
    """Opens an envelope only to learn its device, then forwards it, still sealed."""

    def __init__(self, settings: Settings, store: Store, keys: KeyRing,
                 sink: amqp.Publisher) -> None:
        super().__init__(settings, store, keys, sink)
        self.publisher = sink

    def prepare(self, body: bytes, kid: object) -> Opened:
        opened = super().prepare(body, kid)
        assert isinstance(kid, str)  # prepare refused any other
        return Routed(opened.device, opened.signature, opened.payload, opened.claims, body, kid)

    async def handle(self, opened: Opened, redelivered: bool) -> str:
        assert isinstance(opened, Routed)
        t = self.settings.topology
        headers: dict[str, Any] = {envelope.KID_HEADER: opened.kid}
        if redelivered:
            headers[REDELIVERED_HEADER] = True
        await self.publisher.to_shard(
            shard_queue(t, "inbound", shard_of("d:" + opened.device, t.shards)),
            opened.sealed, headers, envelope.CONTENT_TYPE)
        return "routed"


class OutboundRouter(Outbound):
    """Forwards a business reply to the shard of its conversation, with its origin."""

    def __init__(self, settings: Settings, store: Store, keys: KeyRing,
                 sink: amqp.Publisher) -> None:
        super().__init__(settings, store, keys, sink)
        self.publisher = sink

    async def handle(self, incoming: Incoming, redelivered: bool) -> str:
        t = self.settings.topology
        headers: dict[str, Any] = {ROUTING_KEY_HEADER: incoming.routing_key}
        if incoming.amqp_user:
            headers[USER_HEADER] = incoming.amqp_user
        if redelivered:
            headers[REDELIVERED_HEADER] = True
        await self.publisher.to_shard(
            shard_queue(t, "outbound", shard_of("c:" + self.lane(incoming), t.shards)),
            incoming.raw, headers, amqp.JSON)
        return "routed"
