"""A worker: consume one queue, hand each message to its handler, settle it.

The ack policy lives here and only here:
- ack only after everything the message became is confirmed by the broker;
- a PermanentError dead-letters a copy with its reason (confirmed), then acks;
- a TransientError, or any unexpected error, waits (exponential backoff, no busy loop)
  and requeues; after `workers.max_attempts` the message is dead-lettered
  (retries_exhausted, or internal_error for a bug) instead of looping forever;
- messages of one lane (a device inbound, a conversation outbound, a user for erasure)
  are handled one at a time, in delivery order; different lanes run concurrently, up to
  the prefetch.
The worker reconnects from scratch when the connection is lost, and drains on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Literal

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from relayd import amqp, envelope, log, metrics, shard, topology
from relayd.config import Settings
from relayd.errors import PermanentError, StoreUnavailableError, TransientError
from relayd.gdpr import Erasure
from relayd.inbound import Inbound
from relayd.keys import KeyRing
from relayd.outbound import Outbound
from relayd.store import Store

Role = Literal["inbound", "outbound", "gdpr"]
_log = log.get("relayd.worker")
ROUTER_RETRY_S = 2.0  # how often a standby asks to become the router
_CONNECT_ERRORS = (ConnectionError, OSError, asyncio.TimeoutError, aiormq.exceptions.AMQPError)


class Lanes:
    """Runs the jobs of one key one after another, and different keys concurrently."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Task[None]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def submit(self, key: str | None, job: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        previous = self._tails.get(key) if key is not None else None
        task = asyncio.create_task(self._after(previous, job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if key is not None:
            self._tails[key] = task
            task.add_done_callback(lambda t: self._tails.pop(key, None)
                                   if self._tails.get(key) is t else None)
        return task

    @staticmethod
    async def _after(previous: asyncio.Task[None] | None,
                     job: Callable[[], Awaitable[None]]) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await job()


class Consumer:
    """Settles every message of one queue through its handler."""

    def __init__(self, role: Role, settings: Settings, handler: Inbound | Outbound | Erasure,
                 sink: amqp.Publisher, keys: Callable[[], KeyRing] | None = None,
                 queue: str | None = None) -> None:
        self.role = role
        self.keys = keys  # read per message: a reload takes effect at the next message
        self.settings = settings
        self.handler = handler
        self.sink = sink
        self.queue = queue or shard.entry_queue(settings.topology, role)
        self.lanes = Lanes()
        self.handing_back = False  # stopping a shard: start nothing more, see _consume
        self._attempts: OrderedDict[bytes, int] = OrderedDict()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Called in delivery order; everything before the lane runs synchronously."""
        started = time.monotonic()
        metrics.received(self.role)
        work: Callable[[], Awaitable[str]]
        lane: str | None
        handler, topology = self.handler, self.settings.topology
        if self.keys is not None:
            handler.keys = self.keys()
        again = shard.redelivered(message, topology)
        try:
            if isinstance(handler, Inbound):
                opened = handler.prepare(message.body, (message.headers or {}).get(
                    envelope.KID_HEADER))
                lane = "d:" + opened.device
                work = lambda: handler.handle(opened, again)  # noqa: E731
            elif isinstance(handler, Erasure):
                request = handler.prepare(message.body, message.user_id)
                lane = "u:" + request.user
                work = lambda: handler.handle(request, again)  # noqa: E731
            else:
                incoming = handler.prepare(message.body, *shard.origin(message, topology))
                lane = "c:" + handler.lane(incoming)
                work = lambda: handler.handle(incoming, again)  # noqa: E731
        except PermanentError as exc:
            lane, work = None, _raiser(exc)
        task = self.lanes.submit(lane, lambda: self.settle(message, work, started))
        task.add_done_callback(lambda _: metrics.settled(self.role))

    async def settle(self, message: AbstractIncomingMessage,
                     work: Callable[[], Awaitable[str]], started: float) -> None:
        if self.handing_back:
            return  # left unacked: it goes back to the queue when our channel closes
        outcome, reason, kind = "delivered", "", ""
        try:
            try:
                kind = await work()
            except PermanentError as exc:
                outcome, reason = "dead_lettered", exc.reason
                await self.sink.dead_letter(message, self.queue, exc.reason)
            except StoreUnavailableError:
                raise  # not the message's fault: below, it goes back without counting
            except Exception as exc:  # transient, or a bug: retry, then dead-letter
                if isinstance(exc, TransientError):
                    reason = exc.reason
                else:  # the type only: a bug's message may quote the payload
                    reason = "internal_error"
                    _log.error("handler_failed", stage=self.role, error=type(exc).__name__)
                attempts = self._attempt(message)
                if attempts < self.settings.workers.max_attempts:
                    outcome = "retry"
                    await asyncio.sleep(self._backoff(attempts))
                    await message.nack(requeue=True)
                    return
                outcome = "dead_lettered"
                if reason != "internal_error":
                    reason = "retries_exhausted"
                await self.sink.dead_letter(message, self.queue, reason)
            await message.ack()
            self._attempts.pop(self._key(message), None)
        except (TransientError, StoreUnavailableError, *_CONNECT_ERRORS) as exc:
            # Not settled: the broker redelivers it once our channel is gone or requeues it.
            outcome, reason = "unsettled", type(exc).__name__
            with contextlib.suppress(*_CONNECT_ERRORS):
                await asyncio.sleep(self._backoff(self._attempt(message)))
                await message.nack(requeue=True)
        finally:
            latency = time.monotonic() - started
            _log.info("handled", stage=self.role, type=kind, outcome=outcome, reason=reason,
                      latency_ms=round(latency * 1000, 2))
            metrics.handled(self.role, outcome, reason, kind, latency, message.timestamp)

    @staticmethod
    def _key(message: AbstractIncomingMessage) -> bytes:
        return hashlib.blake2b(message.body, digest_size=16).digest()

    def _attempt(self, message: AbstractIncomingMessage) -> int:
        """How many times this message has failed here, this one included."""
        broker_count = (message.headers or {}).get("x-delivery-count")
        key = self._key(message)
        count = self._attempts.get(key, 0) + 1
        if isinstance(broker_count, int):
            count = max(count, broker_count + 1)
        self._attempts[key] = count
        self._attempts.move_to_end(key)
        while len(self._attempts) > 10_000:
            self._attempts.popitem(last=False)
        return count

    def _backoff(self, attempts: int) -> float:
        w = self.settings.workers
        return float(min(w.retry_max_backoff, w.retry_initial_backoff * 2 ** (attempts - 1)))

    async def drain(self, deadline_s: float) -> int:
        """Wait for in-flight messages up to `deadline_s`; return how many were abandoned."""
        if not self.lanes.tasks:
            return 0
        _, pending = await asyncio.wait(set(self.lanes.tasks), timeout=deadline_s)
        for task in pending:
            task.cancel()
        return len(pending)


def _raiser(exc: Exception) -> Callable[[], Awaitable[str]]:
    async def fail() -> str:
        raise exc
    return fail


async def _wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def watch_lag(stage: str, every_s: float = 0.1, report_s: float = 1.0,
                    floor_ms: float = 10.0) -> None:
    """Log the loop's worst lag (how late a timer fired) each `report_s` it reached
    `floor_ms`: work that blocks the loop, such as crypto or storage, shows here before it
    starves heartbeats."""
    loop = asyncio.get_running_loop()
    worst, reported = 0.0, loop.time()
    while True:
        before = loop.time()
        await asyncio.sleep(every_s)
        now = loop.time()
        worst = max(worst, now - before - every_s)
        if now - reported >= report_s:
            if worst * 1000 >= floor_ms:
                _log.info("loop_lag", stage=stage, latency_ms=round(worst * 1000, 1))
            worst, reported = 0.0, now


async def open_channel(connection: AbstractConnection, settings: Settings) -> AbstractChannel:
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    await channel.set_qos(prefetch_count=settings.workers.prefetch)
    return channel


async def serve(settings: Settings, role: Role, store: Store,
                keys: KeyRing | Callable[[], KeyRing], stop: asyncio.Event,
                consuming: asyncio.Event | None = None, member: str | None = None) -> None:
    """Consume `role`'s queue until `stop` is set, reconnecting whenever the link is lost.

    `keys` may be a function returning the current keys, read at each message (reload).
    `member` names this process among those sharing the shards (relayd.shard.share); it
    must differ from every other process's, and should outlive a restart.
    """
    member = member or f"{socket.gethostname()}:{os.getpid()}:{role}:{secrets.token_hex(4)}"
    current = keys if callable(keys) else lambda: keys
    backoff = 0.5
    connected = False
    while not stop.is_set():
        try:
            connection = await amqp.connect(settings, f"relayd-{role}")
        except _CONNECT_ERRORS as exc:
            _log.warning("connect_failed", stage=role, reason=type(exc).__name__,
                         retry_in_s=backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, settings.amqp.reconnect_max_backoff)
            continue
        if connected:
            metrics.RECONNECTS.labels(role).inc()
        backoff, connected = 0.5, True
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_, lost=lost: lost.set())
        try:
            await _consume(connection, settings, role, store, current, stop, lost, consuming,
                           member)
        except _CONNECT_ERRORS as exc:
            _log.warning("connection_lost", stage=role, reason=type(exc).__name__)
        finally:
            if consuming is not None:
                consuming.clear()
            with contextlib.suppress(*_CONNECT_ERRORS, RuntimeError):
                await connection.close()


async def _consume(connection: AbstractConnection, settings: Settings, role: Role, store: Store,
                   keys: Callable[[], KeyRing], stop: asyncio.Event, lost: asyncio.Event,
                   consuming: asyncio.Event | None, member: str) -> None:
    channel = await open_channel(connection, settings)
    await topology.declare(channel, topology.core(settings.topology,
                                                  settings.gdpr.identity_user is not None))
    sink = amqp.Publisher(channel, settings, keys().opaque_secret)
    handler: Inbound | Outbound | Erasure = (
        Erasure(settings, store, keys(), sink) if role == "gdpr"
        else (Inbound if role == "inbound" else Outbound)(settings, store, keys(), sink))

    def consumer_of(queue: str) -> Consumer:
        return Consumer(role, settings, handler, sink, keys, queue)

    if shard.sharded(settings.topology, role):
        shards = Shards(connection, settings, role, store, member, consumer_of)
        router = asyncio.create_task(_route(connection, settings, role, store, keys, stop, lost))
        await shards.share()
        _log.info("consuming", stage=role, shards=len(shards.held))
        if consuming is not None:
            consuming.set()
        lag = asyncio.create_task(watch_lag(role))
        try:
            while not (stop.is_set() or lost.is_set()):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_wait_any(stop, lost), shards.every_s)
                if not (stop.is_set() or lost.is_set()):
                    await shards.share()
        finally:
            lag.cancel()
        await router
        await shards.hand_back(lost.is_set())
        return
    consumer = consumer_of(shard.entry_queue(settings.topology, role))
    queue = await channel.get_queue(consumer.queue, ensure=False)
    tag = await queue.consume(consumer.on_message)
    _log.info("consuming", stage=role)
    if consuming is not None:
        consuming.set()
    lag = asyncio.create_task(watch_lag(role))
    try:
        await _wait_any(stop, lost)
    finally:
        lag.cancel()
    if lost.is_set():  # its deliveries died with the channel: the broker resends them
        await consumer.drain(0)
        return
    with contextlib.suppress(*_CONNECT_ERRORS):
        await queue.cancel(tag)
    abandoned = await consumer.drain(settings.workers.shutdown_timeout)
    _log.info("drained", stage=role, abandoned=abandoned)


class Shards:
    """The shard queues this process consumes: its share (relayd.shard.share) among the
    processes of its role alive in the store, taken again every `every_s`. Each shard has a
    channel of its own, so that one can be handed back while the others go on."""

    def __init__(self, connection: AbstractConnection, settings: Settings, role: Role,
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
            channel = await open_channel(self.connection, self.settings)
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
        with contextlib.suppress(*_CONNECT_ERRORS, RuntimeError):
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


async def _route(connection: AbstractConnection, settings: Settings, role: Role, store: Store,
                 keys: Callable[[], KeyRing], stop: asyncio.Event, lost: asyncio.Event) -> None:
    """Be the router of `role`'s entry queue (see relayd.shard) while no other process is.

    The lock is an exclusive queue: the broker lets one connection own it and deletes it
    when that connection dies; while another process holds it, ask again every few s.
    """
    name = shard.entry_queue(settings.topology, role)
    while not (stop.is_set() or lost.is_set()):
        channel = await open_channel(connection, settings)
        sink = amqp.Publisher(channel, settings, keys().opaque_secret)
        router = (shard.InboundRouter if role == "inbound" else shard.OutboundRouter)(
            settings, store, keys(), sink)
        consumer = Consumer(role, settings, router, sink, keys, name)
        try:
            await channel.declare_queue(f"{name}.router-lock", exclusive=True)
        except aiormq.exceptions.ChannelLockedResource:  # another process routes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_wait_any(stop, lost), ROUTER_RETRY_S)
            continue
        closed = asyncio.Event()
        channel.close_callbacks.add(lambda *_, closed=closed: closed.set())
        queue = await channel.get_queue(name, ensure=False)
        tag = await queue.consume(consumer.on_message)
        _log.info("routing", stage=role)
        await _wait_any(stop, lost, closed)
        if lost.is_set() or closed.is_set():  # the broker resends what was in flight
            await consumer.drain(0)
            continue
        with contextlib.suppress(*_CONNECT_ERRORS):
            await queue.cancel(tag)
        await consumer.drain(settings.workers.shutdown_timeout)


