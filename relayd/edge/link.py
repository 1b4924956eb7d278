"""The edge's side of the broker: one AMQP connection for every device on this process.

Channels are shared, within the broker's `channel_max`: one publishes up messages with
confirms (and carries this process's `relayd.edge` control queue), one declares, and
`edge.channels` carry the device consumers, a device always on the same one (by a hash
of its queue name). Each channel's prefetch is per consumer, so each device has at most
`edge.max_unacked` messages out at a time.

A device queue has at most one consumer, an exclusive one. Before it consumes, a process
claims the device: it declares the device's claim queue, exclusive to its connection, on
its control channel, which the broker lets one connection hold at a time. So two
processes never race for the exclusive consume, whose refusal would close a shared
channel and cut off every other device on it. A device's stream is taken over from an
older connection in order: the older one cancels its consumer, gives back every
unacknowledged delivery one by one (requeued to its place), waits for the broker to have
read that, lets go of its claim, and only then does the new one claim and consume.
Across processes, a takeover is asked for on the `relayd.edge` fanout exchange and
answered to the asker's own queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from typing import Final, Literal

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import DeliveryError, PublishError
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from relayd import amqp, config, envelope, metrics, shard, topology
from relayd.config import Settings
from relayd.errors import RelaydError
from relayd.keys import KeySource

Code = Literal["broker_full", "unavailable"]
Ending = Literal["removed", "lost"]
POLL_S: Final = 0.05  # how often a takeover looks again whether the queue is free
_AMQP_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError,
                RuntimeError)  # aio-pika raises RuntimeError on a closed channel


class RefusedError(RelaydError):
    """A publish the broker did not confirm: `code` is the nack code for the device."""

    def __init__(self, code: Code) -> None:
        self.code: Code = code
        super().__init__(code)


class UnavailableError(RelaydError):
    """The device's stream cannot be had now (broker down, takeover not answered)."""


class Stream:
    """One connection's consumer of its device's queue; what it received and not yet
    had acknowledged, in delivery order."""

    def __init__(self, slot: Slot, queue: str, claim: str,
                 on_end: Callable[[Ending], None]) -> None:
        self.slot = slot
        self.queue = queue
        self.claim = claim
        self.tag = f"edge.{uuid.uuid4().hex}"
        self.waiting: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        self.out: dict[int, int] = {}  # connection tag -> AMQP delivery tag, not yet acked
        self.receipts: dict[int, str] = {}  # connection tag -> receipt token, if it has one
        self.next_tag = 1
        self.released = False
        self.on_end = on_end  # the queue was deleted (removed) or the channel died (lost)

    async def deliver(self, message: DeliveredMessage) -> None:
        """Called by the channel for each delivery, in order (a task each, started in
        order, that runs to its end without waiting)."""
        if self.released:  # arrived after we let go: straight back
            self.slot.link.spawn(self.slot.requeue([_delivery_tag(message)]))
            return
        self.waiting.put_nowait(message)

    async def next(self) -> tuple[int, bytes]:
        """Wait for the next message; return the tag the device acknowledges it with."""
        message = await self.waiting.get()
        tag, self.next_tag = self.next_tag, self.next_tag + 1
        self.out[tag] = _delivery_tag(message)
        receipt = (message.header.properties.headers or {}).get(amqp.RECEIPT_HEADER)
        if isinstance(receipt, str):
            self.receipts[tag] = receipt
        return tag, message.body

    async def acknowledge(self, tag: int) -> bool:
        """The device stored delivery `tag`: remove it from the queue. False if no such
        delivery is out (never sent, or acknowledged already).

        The tag stays out until the ack is written: a session cancelled while the ack
        waits for room in the connection's write queue (a blocked broker) still holds
        the delivery, and its release gives it back."""
        delivery_tag = self.out.get(tag)
        if delivery_tag is None:
            return False
        if not self.released:
            await self.slot.ack(delivery_tag)
        del self.out[tag]
        receipt = self.receipts.pop(tag, None)
        if receipt is not None and not self.released:  # relayd tells the business, once
            self.slot.link.spawn(self.slot.link.receipt(receipt))
        return True

    async def release(self) -> None:
        """Stop consuming and give back, in order, everything not acknowledged. Returns
        once the broker has it all back, so that a new consumer sees it first."""
        if self.released:
            return
        self.released = True
        self.slot.streams.pop(self.tag, None)
        with contextlib.suppress(*_AMQP_ERRORS):
            await self.slot.channel.basic_cancel(self.tag)
        tags = sorted([*self.out.values(), *(_delivery_tag(m) for m in _drain(self.waiting))])
        self.out.clear()
        self.receipts.clear()
        await self.slot.requeue(tags)
        await self.slot.sync()


def _delivery_tag(message: DeliveredMessage) -> int:
    tag = message.delivery_tag
    assert tag is not None  # a Basic.Deliver always has one
    return tag


def _drain(queue: asyncio.Queue[DeliveredMessage]) -> list[DeliveredMessage]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


class Slot:
    """One shared consumer channel and the streams on it."""

    def __init__(self, link: Link, index: int) -> None:
        self.link = link
        self.index = index
        self.channel: aiormq.abc.AbstractChannel
        self.outer: AbstractChannel | None = None
        self.streams: dict[str, Stream] = {}
        self.lock = asyncio.Lock()

    async def open(self) -> None:
        self.outer = await self.link.connection.channel()
        self.channel = await self.outer.get_underlay_channel()
        await self.channel.basic_qos(prefetch_count=self.link.settings.edge.max_unacked)
        self.channel.on_consumer_cancel_callbacks.add(self._cancelled)
        self.outer.close_callbacks.add(self._closed)

    def _cancelled(self, frame: Basic.Cancel) -> None:
        """The broker cancelled a consumer: its queue was deleted (the device removed)."""
        stream = self.streams.pop(frame.consumer_tag or "", None)
        if stream is not None:
            stream.released = True  # nothing to give back: the queue is gone
            stream.on_end("removed")

    def _closed(self, *_: object) -> None:
        """The channel died: the broker requeued its deliveries in order, atomically."""
        streams, self.streams = list(self.streams.values()), {}
        self.outer = None
        for stream in streams:
            stream.released = True
            stream.on_end("lost")

    async def ack(self, delivery_tag: int) -> None:
        """Written to the connection's write queue when this returns; not at all if it is
        cancelled before (aiormq puts the frame in the queue, or does not)."""
        if self.outer is not None:
            with contextlib.suppress(*_AMQP_ERRORS):
                await self.channel.basic_ack(delivery_tag, wait=False)

    async def requeue(self, delivery_tags: list[int]) -> None:
        """Give deliveries back, one by one (the channel carries other devices' too), in
        the order given; each goes back to its place in the queue."""
        for delivery_tag in delivery_tags:
            if self.outer is None:
                return  # the channel died: the broker requeued them already
            with contextlib.suppress(*_AMQP_ERRORS):
                await self.channel.basic_nack(delivery_tag, requeue=True, wait=False)

    async def sync(self) -> None:
        """A round trip on this channel: the broker has read every ack and nack sent
        before it (the channel is ordered), so the queue has them back."""
        if self.outer is not None:
            with contextlib.suppress(*_AMQP_ERRORS):
                await self.channel.basic_qos(prefetch_count=self.link.settings.edge.max_unacked)

    async def consume(self, stream: Stream) -> None:
        async with self.lock:
            if self.outer is None:
                await self.open()
        self.streams[stream.tag] = stream
        try:
            await self.channel.basic_consume(stream.queue, stream.deliver, exclusive=True,
                                             consumer_tag=stream.tag)
        except BaseException:
            self.streams.pop(stream.tag, None)
            raise


class Link:
    """The edge process's connection to the broker, and what it does there."""

    def __init__(self, settings: Settings, connection: AbstractConnection,
                 keys: KeySource) -> None:
        self.settings = settings
        self.connection = connection
        self.keys = keys  # read at each attach: the device queues are named by a keyed token
        self.t = settings.topology
        # set on each up message, as the broker checks: the workers believe x-relayd-device
        # (the edge judged the rate limit) only from relayd's own user (inbound.from_relayd)
        self.user = config.relay_user(settings)
        self.slots = [Slot(self, i) for i in range(settings.edge.channels)]
        self.held: dict[str, Callable[[], Awaitable[None]]] = {}  # queue -> let it go
        self.answers: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self._control_lock = asyncio.Lock()
        # this process's queue on relayd.edge: named by relayd, not the broker, so that
        # relayd's own permissions (deploy/rabbitmq/README.md) cover it
        self.inbox = f"{self.t.edge_exchange}.{uuid.uuid4().hex}"

    async def open(self) -> None:
        publishing = await self.connection.channel(publisher_confirms=True,
                                                   on_return_raises=True)
        self.publishing = await publishing.get_underlay_channel()
        self.control = await self.connection.channel()
        await topology.declare(self.control, topology.edge(self.t))
        await self.publishing.queue_declare(self.inbox, exclusive=True, auto_delete=True)
        await self.publishing.queue_bind(self.inbox, self.t.edge_exchange)
        await self.publishing.basic_consume(self.inbox, self._on_control, no_ack=True)
        for slot in self.slots:
            await slot.open()

    def spawn(self, work: Awaitable[object]) -> None:
        """Run `work` in the background; a failure of a lost channel is the channel's."""
        async def run() -> object:
            with contextlib.suppress(*_AMQP_ERRORS):
                return await work
            return None
        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- up --------------------------------------------------------------------------------

    async def publish(self, device: str, kid: str, sealed: bytes) -> None:
        """Publish one up message and return once the broker confirmed it; Refused if not.

        With topology.shards > 1 it goes straight to the device's shard queue, where the
        router would have put it (relayd.shard.device_shard): no router opens it on the way.
        The shard's worker still refuses it unless it is sealed by `device`."""
        exchange, routing_key = self.t.ingress_exchange, self.t.inbound_routing_key
        if self.t.shards > 1:
            exchange, routing_key = self.t.shard_exchange, shard.device_shard(self.t, device)
        try:
            await self.publishing.basic_publish(
                sealed, exchange=exchange, routing_key=routing_key, mandatory=True,
                properties=Basic.Properties(
                    content_type=envelope.CONTENT_TYPE, delivery_mode=2, user_id=self.user,
                    headers={envelope.KID_HEADER: kid, envelope.DEVICE_HEADER: device}))
        except DeliveryError:
            raise RefusedError("broker_full") from None  # nacked: the queue is at its limit
        except (PublishError, *_AMQP_ERRORS):
            raise RefusedError("unavailable") from None  # unroutable, or the link is down

    async def receipt(self, token: str) -> None:
        """Hand a delivered copy's receipt token back to relayd (relayd.receipts). Lost,
        and counted, if the broker does not confirm it: the copy is acked already."""
        try:
            await self.publishing.basic_publish(
                b"", exchange=self.t.ingress_exchange, routing_key=self.t.receipts_routing_key,
                mandatory=True, properties=Basic.Properties(
                    delivery_mode=2, headers={amqp.RECEIPT_HEADER: token}))
        except (DeliveryError, PublishError, *_AMQP_ERRORS):
            metrics.edge_receipt("lost")
            return
        metrics.edge_receipt("confirmed")

    # --- down ------------------------------------------------------------------------------

    def slot_of(self, queue: str) -> Slot:
        return self.slots[zlib.crc32(queue.encode()) % len(self.slots)]

    async def attach(self, device: str, on_end: Callable[[Ending], None],
                     release: Callable[[], Awaitable[None]]) -> Stream:
        """Claim `device` and consume its queue for one connection, once no one else
        does; `release` is what a takeover asks of this connection later. Unavailable if
        the device stays taken for `edge.takeover_timeout` s or the broker fails."""
        secret = self.keys().opaque_secret
        queue = topology.device_queue(self.t, device, secret)
        claim = f"{self.t.edge_exchange}.claim.{topology.device_routing_key(device, secret)}"
        deadline = time.monotonic() + self.settings.edge.takeover_timeout
        claimed = False
        try:
            await self._until(lambda: self._claim(claim), queue, deadline)
            claimed = True
            # claimed, the queue may still have a consumer a moment: a connection that
            # died, or an edge process from before claims
            await self._until(lambda: self._free(device, queue, secret), queue, deadline)
            stream = Stream(self.slot_of(queue), queue, claim, on_end)
            await stream.slot.consume(stream)
        except BaseException as exc:
            if claimed:
                self.spawn(self._unclaim(claim))
            if isinstance(exc, _AMQP_ERRORS):
                raise UnavailableError(type(exc).__name__) from None
            raise
        finally:
            self.answers.pop(queue, None)
        self.held[queue] = release
        return stream

    async def _until(self, done: Callable[[], Awaitable[bool]], queue: str,
                     deadline: float) -> None:
        """Ask whoever holds the device to let go until `done()`; Unavailable at the
        deadline. Asked again each time: the holder may not have held it yet."""
        while not await done():
            if time.monotonic() >= deadline:
                raise UnavailableError("the device's queue stayed taken")
            await self._ask_release(queue)
            answer = self.answers.setdefault(queue, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answer.wait(), POLL_S)
            answer.clear()

    async def detach(self, stream: Stream) -> None:
        """Let go of the device: after its stream's release, so that whoever claims it
        next finds its queue free."""
        self.held.pop(stream.queue, None)
        with contextlib.suppress(*_AMQP_ERRORS):
            await self._unclaim(stream.claim)

    async def delete_queue(self, stream: Stream) -> None:
        """Delete the queue of `stream`, released, whose device is no longer registered:
        _free declares a missing queue, which may have been the queue of a device removed
        meanwhile (relayd.edge.server.Door._recheck). Before detach, so that no one claims
        the device in between; gone already is fine. Nothing of the broker's is raised: a
        broker lost now leaves the queue (the session ends all the same)."""
        async with self._control_lock:
            with contextlib.suppress(*_AMQP_ERRORS):
                await topology.delete_queue(await self._control_channel(), stream.queue)

    async def declare_queue(self, device: str) -> None:
        """Declare the device's queue and its binding, as a registration does (a no-op if
        it is there). Nothing of the broker's is raised: a broker lost now leaves the
        queue missing until the device's next attach declares it (_free)."""
        async with self._control_lock:
            with contextlib.suppress(*_AMQP_ERRORS):
                await topology.declare(await self._control_channel(), topology.device(
                    self.t, device, self.keys().opaque_secret))

    async def _control_channel(self) -> AbstractChannel:
        """The control channel, opened again if a refusal closed it (a passive declare of
        a missing queue, a claim held by another process). Hold _control_lock."""
        if self.control.is_closed:
            self.control = await self.connection.channel()
        return self.control

    async def _claim(self, claim: str) -> bool:
        """Whether this connection holds the device's claim now. The broker lets one
        connection declare an exclusive queue, and deletes it with that connection."""
        async with self._control_lock:
            try:
                await (await self._control_channel()).declare_queue(claim, exclusive=True)
            except aiormq.exceptions.ChannelLockedResource:
                return False
            return True

    async def _unclaim(self, claim: str) -> None:
        async with self._control_lock:
            await (await self._control_channel()).queue_delete(claim)

    async def _free(self, device: str, queue: str, secret: bytes) -> bool:
        """Whether the device's queue has no consumer; declared first if it is missing."""
        async with self._control_lock:
            try:
                declared = await (await self._control_channel()).declare_queue(queue,
                                                                                passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                await topology.declare(await self._control_channel(),
                                       topology.device(self.t, device, secret))
                return True
            return not declared.declaration_result.consumer_count

    async def _ask_release(self, queue: str) -> None:
        await self.publishing.basic_publish(
            queue.encode(), exchange=self.t.edge_exchange, properties=Basic.Properties(
                message_type="release", reply_to=self.inbox, correlation_id=queue))

    async def _on_control(self, message: DeliveredMessage) -> None:
        """A takeover asked of us (`release`), or answered to us (`released`)."""
        properties = message.header.properties
        queue = properties.correlation_id or ""
        if properties.message_type == "released":
            if (answer := self.answers.get(queue)) is not None:
                answer.set()
            return
        release = self.held.get(queue)
        if (properties.message_type != "release" or release is None
                or properties.reply_to in ("", None, self.inbox)):  # ours: asked before we held
            return
        await release()
        await self.publishing.basic_publish(b"", routing_key=properties.reply_to,
                                            properties=Basic.Properties(
                                                message_type="released",
                                                correlation_id=queue))

    async def close(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 1)
        with contextlib.suppress(*_AMQP_ERRORS):
            await self.connection.close()
