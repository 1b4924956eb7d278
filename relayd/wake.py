"""Push wake: a content-free event for a device that has messages waiting and no edge
connection, for the operator's push service (APNs, FCM) to wake its app with
(docs/protocol.md, "Push wake"; `wake.enabled`).

Every worker process that queues messages for devices (inbound for echoes, outbound for
replies, in any number of processes) tells one decider about each: after the confirmed
publish to the device's queue, it publishes a notice (the device id and its queue's
name) to `topology.wake_pending(…)`, in the background, so that nothing a wake does
delays or fails a delivery: a wake is a hint, and the messages are in the queue
whatever happens to it. That queue has a single active consumer, one of these
processes' Wakers: the decider. For each notice it checks, in order: the device was
woken less than `wake.interval` s ago (Throttle, pure: at most one wake per device per
interval, across every process); the device's queue has a consumer (a passive declare:
each device queue has at most one consumer, the edge's, exclusive), so the device is
online; its queue is empty. Otherwise it publishes
`{"v": 1, "type": "wake", "device": ID, "count": N}` to `topology.wake_exchange` with
publisher confirms, and nothing else (no sender, business, user or content).

When the decider's process stops, another process's consumer becomes the decider, with
an empty Throttle: a device may then be woken once more within the interval, and the
notices the old decider held are dropped (a hint lost: the device's next message brings
another). A process with more than MAX_NOTICES notices under way sends no more until
they are out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from time import monotonic

import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from pamqp.commands import Basic

from relayd import log, metrics, topology
from relayd.config import Settings
from relayd.errors import PermanentError, TransientError

MAX_CHECKS = 64  # notices the decider holds at once (its prefetch)
MAX_NOTICES = 1024  # notices a process has under way at once; beyond, it sends none
MAX_REMEMBERED = 100_000  # devices woken within the interval that the decider remembers
_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError, RuntimeError,
           TransientError, PermanentError)  # the last two: a notice's publish (Publisher)
_log = log.get("relayd.wake")


class Throttle:
    """At most one wake per device per `interval_s`; pure (the caller gives the time)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._woken: dict[str, float] = {}
        self._pruned = 0.0

    def due(self, device: str, now: float) -> bool:
        """Whether `device` may be woken at `now`."""
        last = self._woken.get(device)
        return last is None or now - last >= self.interval_s

    def woken(self, device: str, now: float) -> None:
        """Count `device` as woken at `now` (taken back by forget)."""
        self._woken[device] = now
        # Forget whoever may be woken again anyway: when there are too many, and once an
        # interval, so that no device id stays in memory much longer than its interval.
        if len(self._woken) > MAX_REMEMBERED or now - self._pruned >= self.interval_s:
            self._woken = {d: t for d, t in self._woken.items() if now - t < self.interval_s}
            self._pruned = now

    def forget(self, device: str) -> None:
        self._woken.pop(device, None)


def event(device: str, count: int) -> bytes:
    """A wake event's body: the device and how many messages wait for it, nothing else."""
    return orjson.dumps({"v": 1, "type": "wake", "device": device, "count": count})


class Waker:
    """A worker process's part in push wakes: it sends notices, and may be the decider."""

    def __init__(self, settings: Settings, connection: AbstractConnection,
                 clock: Callable[[], float] | None = None) -> None:
        self.t = settings.topology
        self.pending = topology.wake_pending(self.t)
        self.connection = connection
        self.throttle = Throttle(settings.wake.interval)
        self.clock = clock or monotonic
        self.tasks: set[asyncio.Task[None]] = set()
        self._channel: AbstractChannel | None = None  # the notices' consumer
        self._probes: AbstractChannel | None = None  # passive declares, wakes
        self._probing = asyncio.Lock()  # one at a time: a failed one closes the channel

    async def open(self) -> None:
        """Consume the notices (as the decider, when the broker makes this consumer the
        active one)."""
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=MAX_CHECKS)
        queue = await channel.get_queue(self.pending, ensure=False)
        await queue.consume(self._decide)
        self._channel = channel

    def _spawn(self, work: Awaitable[object]) -> None:
        async def run() -> None:
            with contextlib.suppress(*_ERRORS):
                await work
        task = asyncio.create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def queued(self, notify: Callable[[str, bytes], Awaitable[None]], device: str,
               queue: str) -> None:
        """A message was queued for `device` in `queue`: tell the decider, in the
        background, by `notify(queue, body)` (the caller's amqp.Publisher.notice)."""
        if len(self.tasks) >= MAX_NOTICES:
            metrics.woke("skipped")
            return
        self._spawn(notify(self.pending, orjson.dumps({"device": device, "queue": queue})))

    async def _decide(self, message: AbstractIncomingMessage) -> None:
        """Decide one notice, then ack it, whatever happened: a wake is a hint, and a
        notice left unsettled would stall the decider. One that comes again was under way
        when a decider failed: dropped, so that it cannot fail the next one too."""
        outcome = "dropped"
        try:
            if not message.redelivered:
                outcome = "failed"
                notice = orjson.loads(message.body)
                outcome = await self._wake(str(notice["device"]), str(notice["queue"]))
        except Exception as exc:  # any failure drops the notice; logged by its type only
            _log.warning("wake_failed", error=type(exc).__name__)
        finally:
            metrics.woke(outcome)
            with contextlib.suppress(*_ERRORS):
                await message.ack()

    async def _wake(self, device: str, queue: str) -> str:
        """Wake `device` unless it is throttled, online or has nothing waiting. The wake
        is counted from the start, so that another notice of the device decided at the
        same time is throttled; taken back if none is sent."""
        now = self.clock()
        if not self.throttle.due(device, now):
            return "throttled"
        self.throttle.woken(device, now)
        outcome = "failed"
        try:
            outcome = await self._probe(device, queue)
        finally:
            if outcome != "sent":
                self.throttle.forget(device)
        return outcome

    async def _probe(self, device: str, queue: str) -> str:
        """One at a time, on a channel of their own: the passive declare of a removed
        device's queue closes it, and the next probe opens another, so that no other
        device's probe or notice fails with it."""
        async with self._probing:
            if self._probes is None or self._probes.is_closed:
                self._probes = await self.connection.channel(publisher_confirms=True)
            try:
                declared = await self._probes.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:  # the device was removed
                return "gone"
            result = declared.declaration_result
            if result.consumer_count:
                return "online"
            if not result.message_count:  # read meanwhile, or expired
                return "empty"
            underlay = await self._probes.get_underlay_channel()
            await underlay.basic_publish(
                event(device, result.message_count), exchange=self.t.wake_exchange,
                properties=Basic.Properties(content_type="application/json",
                                            message_type="wake"))
            return "sent"

    async def close(self) -> None:
        """Let the notices under way go out (briefly), then close the channels."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=1)
        for channel in (self._channel, self._probes):
            if channel is not None:
                with contextlib.suppress(*_ERRORS):
                    await channel.close()
