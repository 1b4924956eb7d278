"""Running the shards (see relayd.shard): the router of each direction, and the shard
queues this process consumes.

A router consumes its direction's entry queue while it holds the router lock (an
exclusive queue, relayd.topology.router_lock), and forwards each message, untouched, to
the shard queue of its lane. Shards is the set of shard queues this process consumes,
taken again from the store's list of live processes every `shard_member_ttl / 3` s. Taking
that list is also how a process renews its lease on its shards: one that has not renewed
it for two thirds of the ttl gives its shards up (fences itself) before the others take
it for dead, and takes its share again once the store answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from relayd import amqp, envelope, log, outbound, shard, topology
from relayd.amqp import Delivery
from relayd.config import Settings, relay_user
from relayd.consume import Consumer, Work, hold_limit, window
from relayd.errors import StoreError, StoreUnavailableError, TransientError
from relayd.inbound import from_relayd, open_up
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
    user = relay_user(settings)

    def read(delivery: Delivery) -> tuple[str, dict[str, Any]]:
        kid = (delivery.headers or {}).get(envelope.KID_HEADER)
        device = (delivery.headers or {}).get(envelope.DEVICE_HEADER)
        opened = open_up(delivery.body, kid, keys(), settings.limits, device,
                         from_relayd(delivery, settings.topology, user))
        headers = {envelope.KID_HEADER: kid}  # a str: open_up refused others
        if opened.judged:  # the edge's: checked against the envelope, the same device
            headers[envelope.DEVICE_HEADER] = device
        return shard.device_lane(opened.device), headers

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
    channel of its own, so that one can be handed back while the others go on.

    Each share() renews this process's lease: the store stamps it alive, and the others
    take its shards once the stamp is `ttl_s` old. A process whose renewals fail (the
    store unreachable, read-only, or too slow to answer within `every_s`) for
    `ttl_s - every_s` hands every shard back, finishing what it started while the lease
    still holds. Single active consumer would otherwise keep the others from taking them
    while it could handle none of their messages.

    A shard's channel that the broker closes (a consumer_timeout, a channel error) sets
    `lost`, as the unsharded consumer's does: the process starts again on a new
    connection rather than hold a shard that delivers nothing."""

    def __init__(self, connection: AbstractConnection, settings: Settings, role: str,
                 store: Store, member: str, consumer_of: Callable[[str], Consumer],
                 lost: asyncio.Event) -> None:
        self.connection, self.settings, self.role = connection, settings, role
        self.lost = lost
        self.store, self.member, self.consumer_of = store, member, consumer_of
        self.held: dict[int, tuple[Consumer, AbstractChannel, amqp.Consuming]] = {}
        self.releasing: dict[int, asyncio.Task[None]] = {}
        self.ttl_s = settings.topology.shard_member_ttl
        self.every_s = self.ttl_s / 3
        self.renewed = time.monotonic()  # when the last renewal that succeeded was sent
        self.renewal: asyncio.Task[list[str]] | None = None
        self.fenced = False

    async def share(self) -> None:
        """Take the shards newly ours, and hand back those no longer ours; all of them
        once the lease is about to run out."""
        t = self.settings.topology
        members = await self._renew()
        if members is None:  # keep what we hold while the lease lasts
            if self.held and time.monotonic() - self.renewed >= self.ttl_s - self.every_s:
                self._fence()
            return
        if self.fenced:
            self.fenced = False
            _log.info("unfenced", stage=self.role)
        mine, before = shard.share(members, self.member, t.shards), set(self.held)
        for k in before - mine:
            self.releasing[k] = asyncio.create_task(self._release(k, *self.held.pop(k)))
        for k in sorted(mine - set(self.held) - set(self.releasing)):
            consumer = self.consumer_of(shard.shard_queue(t, self.role, k))
            channel = await amqp.open_channel(self.connection, window(self.settings.workers))
            channel.close_callbacks.add(lambda *_, k=k, channel=channel: self._closed(k, channel))
            subscription = await amqp.consume(channel, consumer.queue, consumer.accept)
            self.held[k] = consumer, channel, subscription
        if set(self.held) != before:
            _log.info("shards_shared", stage=self.role, members=len(members),
                      held=len(self.held))

    def _closed(self, k: int, channel: AbstractChannel) -> None:
        """A shard's channel closed: by the broker if the shard is still held (one handed
        back leaves `held` before its channel closes)."""
        if (held := self.held.get(k)) is not None and held[1] is channel:
            _log.warning("shard_channel_closed", stage=self.role)
            self.lost.set()

    async def _renew(self) -> list[str] | None:
        """Mark this process alive and read the members alive; None if the store did not
        answer within `every_s`. One renewal at a time: a store that hangs (a half-open
        connection) holds one, not one per period."""
        if self.renewal is not None and not self.renewal.done():
            return None  # the last one, cancelled, has not even given up yet
        sent = time.monotonic()
        self.renewal = renewal = asyncio.create_task(
            self.store.members(self.role, self.member, int(self.ttl_s * 1000)))
        done, _ = await asyncio.wait({renewal}, timeout=self.every_s)
        if not done:
            renewal.cancel()
            return None
        try:
            members = renewal.result()
        except (StoreError, StoreUnavailableError, TransientError):
            return None
        self.renewed = sent
        return members

    def _fence(self) -> None:
        """Hand every shard back: in order, finishing what started until the lease ends,
        so that the others find them free when they take this process for dead."""
        lease_left = max(0.0, self.renewed + self.ttl_s - time.monotonic())
        _log.warning("fenced", stage=self.role, held=len(self.held))
        self.fenced = True
        held, self.held = self.held, {}
        for k, held_k in held.items():
            self.releasing[k] = asyncio.create_task(self._release(k, *held_k, lease_left))

    async def _release(self, k: int, consumer: Consumer, channel: AbstractChannel,
                       subscription: amqp.Consuming, deadline_s: float | None = None) -> None:
        """Hand one shard back in order. A cancelled single active consumer would pass the
        shard on at once, while what it had received was still in work: instead finish
        only what started (up to `deadline_s`, by default workers.shutdown_timeout), write
        the acks of what finished, and let the channel's close return the rest, in order,
        to the queue and so to the next consumer."""
        consumer.handing_back = True
        until = time.monotonic() + (self.settings.workers.shutdown_timeout
                                    if deadline_s is None else deadline_s)
        await consumer.drain(max(0.0, until - time.monotonic()))
        await subscription.flushed(max(0.0, until - time.monotonic()))
        with contextlib.suppress(*amqp.CONNECT_ERRORS, RuntimeError):
            await channel.close()
        self.releasing.pop(k, None)

    async def hand_back(self, lost: bool) -> None:
        """Give every shard up: on a lost connection at once (the broker resends what was
        in flight); on a stop, in order, and leave so that the others take over now."""
        held, self.held = self.held, {}
        if lost:
            await asyncio.gather(*(consumer.drain(0) for consumer, _, _ in held.values()))
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
        channel = await amqp.open_channel(connection, window(settings.workers))
        try:
            await channel.declare_queue(topology.router_lock(name), exclusive=True)
        except aiormq.exceptions.ChannelLockedResource:  # another process routes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(amqp.wait_any(stop, lost), ROUTER_RETRY_S)
            continue
        # It publishes on a channel of its own (see amqp.Publisher), and consumes through
        # relayd's reader (amqp.consume), as the shards' consumers do.
        publishing = await amqp.open_channel(connection)
        sink = amqp.Publisher(publishing, settings, keys().opaque_secret)
        router = (inbound_router(settings, keys, sink) if role == "inbound"
                  else outbound_router(settings, sink))
        consumer = Consumer(role, settings.workers, router, sink, name, hold_limit(settings))
        closed = asyncio.Event()
        channel.close_callbacks.add(lambda *_, closed=closed: closed.set())
        subscription = await amqp.consume(channel, name, consumer.accept)
        _log.info("routing", stage=role)
        await amqp.wait_any(stop, lost, closed)
        if lost.is_set() or closed.is_set():  # the broker resends what was in flight
            await consumer.drain(0)
        else:
            with contextlib.suppress(*amqp.CONNECT_ERRORS):
                await subscription.cancel()
            await consumer.drain(settings.workers.shutdown_timeout)
            await subscription.flushed(settings.workers.shutdown_timeout)
        with contextlib.suppress(*amqp.CONNECT_ERRORS, RuntimeError):
            await publishing.close()
