"""Running the shards (see relayd.shard): the router of each direction, and the shard
queues this process consumes.

A router consumes its direction's entry queue while it holds the router lock (an
exclusive queue, relayd.topology.router_lock), and forwards each message, untouched, to
the shard queue of its lane. Shards is the set of shard queues this process consumes,
taken again from the store's list of live processes every `shard_member_ttl / 3` s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from relayd import amqp, envelope, log, outbound, shard, topology
from relayd.amqp import Delivery
from relayd.config import Settings
from relayd.consume import Consumer, Work
from relayd.errors import StoreUnavailableError, TransientError
from relayd.inbound import open_up
from relayd.keys import KeySource
from relayd.store import Store

_log = log.get("relayd.route")
ROUTER_RETRY_S = 2.0  # how often a standby asks to become the router


Read = Callable[[Delivery], tuple[str, dict[str, Any]]]  # a delivery's lane and headers


class Router:
    """Forwards each delivery of a direction's entry queue, untouched, to the shard of its
    lane, with the headers its shard's consumer needs to know where it came from."""

    def __init__(self, settings: Settings, role: str, publisher: amqp.Publisher, read: Read,
                 content_type: str) -> None:
        self.topology, self.role, self.publisher = settings.topology, role, publisher
        self.read, self.content_type = read, content_type

    def prepare(self, delivery: Delivery) -> tuple[str | None, Work]:
        lane, headers = self.read(delivery)
        if shard.redelivered(delivery, self.topology):
            headers[shard.REDELIVERED_HEADER] = True
        queue = shard.shard_queue(self.topology, self.role,
                                  shard.shard_of(lane, self.topology.shards))
        return lane, lambda: self._forward(queue, delivery.body, headers)

    async def _forward(self, queue: str, body: bytes, headers: dict[str, Any]) -> str:
        await self.publisher.to_shard(queue, body, headers, self.content_type)
        return "routed"


def inbound_router(settings: Settings, keys: KeySource, publisher: amqp.Publisher) -> Router:
    """Opens an envelope only to learn its device; forwards it still sealed, with its kid."""
    def read(delivery: Delivery) -> tuple[str, dict[str, Any]]:
        kid = (delivery.headers or {}).get(envelope.KID_HEADER)
        device = (delivery.headers or {}).get(envelope.DEVICE_HEADER)
        opened = open_up(delivery.body, kid, keys(), settings.limits, device)
        headers = {envelope.KID_HEADER: kid}  # a str: open_up refused others
        if opened.judged:  # the edge's: checked against the envelope, the same device
            headers[envelope.DEVICE_HEADER] = device
        return "d:" + opened.device, headers

    return Router(settings, "inbound", publisher, read, envelope.CONTENT_TYPE)


def outbound_router(settings: Settings, publisher: amqp.Publisher) -> Router:
    """Forwards a reply to the shard of its conversation, with the user_id and routing key
    the business published it with."""
    def read(delivery: Delivery) -> tuple[str, dict[str, Any]]:
        incoming = outbound.parse(delivery.body, *shard.origin(delivery, settings.topology),
                                  settings.limits)
        headers: dict[str, Any] = {shard.ROUTING_KEY_HEADER: incoming.routing_key}
        if incoming.amqp_user:
            headers[shard.USER_HEADER] = incoming.amqp_user
        return outbound.lane(incoming), headers

    return Router(settings, "outbound", publisher, read, amqp.JSON)


class Shards:
    """The shard queues this process consumes: its share (relayd.shard.share) among the
    processes of its role alive in the store, taken again every `every_s`. Each shard has a
    channel of its own, so that one can be handed back while the others go on."""

    def __init__(self, connection: AbstractConnection, settings: Settings, role: str,
                 store: Store, member: str, consumer_of: Callable[[str], Consumer]) -> None:
        self.connection, self.settings, self.role = connection, settings, role
        self.store, self.member, self.consumer_of = store, member, consumer_of
        self.held: dict[int, tuple[Consumer, AbstractChannel]] = {}
        self.releasing: dict[int, asyncio.Task[None]] = {}
        self.ttl_s = settings.topology.shard_member_ttl
        self.every_s = self.ttl_s / 3

    async def share(self) -> None:
        """Take the shards newly ours, and hand back those no longer ours."""
        t = self.settings.topology
        try:
            members = await self.store.members(self.role, self.member, int(self.ttl_s * 1000))
        except (StoreUnavailableError, TransientError):
            return  # keep what we hold until the store answers again
        mine, before = shard.share(members, self.member, t.shards), set(self.held)
        for k in before - mine:
            self.releasing[k] = asyncio.create_task(self._release(k, *self.held.pop(k)))
        for k in sorted(mine - set(self.held) - set(self.releasing)):
            consumer = self.consumer_of(shard.shard_queue(t, self.role, k))
            channel = await amqp.open_channel(self.connection, self.settings.workers.prefetch)
            queue = await channel.get_queue(consumer.queue, ensure=False)
            await queue.consume(consumer.on_message)
            self.held[k] = consumer, channel
        if set(self.held) != before:
            _log.info("shards_shared", stage=self.role, members=len(members),
                      held=len(self.held))

    async def _release(self, k: int, consumer: Consumer, channel: AbstractChannel) -> None:
        """Hand one shard back in order. A cancelled single active consumer would pass the
        shard on at once, while what it had received was still in work: instead finish
        only what started, and let the channel's close return the rest, in order, to the
        queue and so to the next consumer."""
        consumer.handing_back = True
        await consumer.drain(self.settings.workers.shutdown_timeout)
        with contextlib.suppress(*amqp.CONNECT_ERRORS, RuntimeError):
            await channel.close()
        self.releasing.pop(k, None)

    async def hand_back(self, lost: bool) -> None:
        """Give every shard up: on a lost connection at once (the broker resends what was
        in flight); on a stop, in order, and leave so that the others take over now."""
        held, self.held = self.held, {}
        if lost:
            await asyncio.gather(*(consumer.drain(0) for consumer, _ in held.values()))
            return
        await asyncio.gather(*(self._release(k, *h) for k, h in held.items()),
                             *self.releasing.values())
        with contextlib.suppress(StoreUnavailableError, TransientError):
            await self.store.leave(self.role, self.member)  # else forgotten after the ttl
        _log.info("drained", stage=self.role)


async def route(connection: AbstractConnection, settings: Settings, role: str,
                keys: KeySource, stop: asyncio.Event, lost: asyncio.Event) -> None:
    """Be the router of `role`'s entry queue (see relayd.shard) while no other process is.

    The lock is an exclusive queue: the broker lets one connection own it and deletes it
    when that connection dies; while another process holds it, ask again every few s.
    """
    name = shard.entry_queue(settings.topology, role)
    while not (stop.is_set() or lost.is_set()):
        channel = await amqp.open_channel(connection, settings.workers.prefetch)
        sink = amqp.Publisher(channel, settings, keys().opaque_secret)
        router = (inbound_router(settings, keys, sink) if role == "inbound"
                  else outbound_router(settings, sink))
        consumer = Consumer(role, settings.workers, router, sink, name)
        try:
            await channel.declare_queue(topology.router_lock(name), exclusive=True)
        except aiormq.exceptions.ChannelLockedResource:  # another process routes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(amqp.wait_any(stop, lost), ROUTER_RETRY_S)
            continue
        closed = asyncio.Event()
        channel.close_callbacks.add(lambda *_, closed=closed: closed.set())
        queue = await channel.get_queue(name, ensure=False)
        tag = await queue.consume(consumer.on_message)
        _log.info("routing", stage=role)
        await amqp.wait_any(stop, lost, closed)
        if lost.is_set() or closed.is_set():  # the broker resends what was in flight
            await consumer.drain(0)
            continue
        with contextlib.suppress(*amqp.CONNECT_ERRORS):
            await queue.cancel(tag)
        await consumer.drain(settings.workers.shutdown_timeout)


