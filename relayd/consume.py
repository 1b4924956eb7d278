"""Consuming a queue: each delivery handed to its handler, and settled exactly once.

The ack policy lives here and only here: verdict() decides, Consumer.settle applies.
- ack only after everything the message became is confirmed by the broker;
- a PermanentError dead-letters a copy with its reason (confirmed), then acks;
- a TransientError, or any other error (a bug), waits (exponential backoff, no busy
  loop) and requeues; after `workers.max_attempts` the message is dead-lettered
  (retries_exhausted, or internal_error for a bug) instead of looping forever;
- a StoreUnavailableError requeues after the backoff without counting against it.
Whatever is raised below (by a handler's prepare or its work, the publish of the
dead-letter copy, the ack itself), Consumer.settle is the one guard: the delivery is
acked, requeued, or, when even its dead-letter copy cannot be published, rejected to the
queue's dead-letter exchange. A delivery whose channel died is settled by the broker,
which delivers it again.

Messages of one lane (a device inbound, a conversation outbound, a user for erasure) are
handled one at a time, in delivery order; different lanes run concurrently, up to the
prefetch.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from relayd import amqp, log, metrics, wire
from relayd.amqp import Delivery
from relayd.config import Workers
from relayd.errors import PermanentError, StoreUnavailableError, TransientError

_log = log.get("relayd.consume")
Work = Callable[[], Awaitable[str]]  # handles one delivery; returns its type, for the log


class Handler(Protocol):
    """What a consumer hands its deliveries to (inbound, outbound, erasure, the routers)."""

    def prepare(self, delivery: Delivery) -> tuple[str | None, Work]:
        """Run synchronously, in delivery order: the lane the delivery belongs to (None:
        any order) and the work that handles it. May raise PermanentError for input
        refused before any work; anything it raises is settled like the work's errors."""


class Sink(Protocol):
    """Where a refused delivery's copy goes (amqp.Publisher is one)."""

    def dead_letter(self, delivery: Delivery, queue: str, reason: str) -> Awaitable[None]: ...


Action = Literal["ack", "dead_letter", "retry", "release"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What settles a delivery: `ack` it; `dead_letter` it (a copy with `reason`, then
    ack); `retry` it (requeue after a backoff, counted); `release` it (requeue after a
    backoff, not counted: the store was unavailable)."""

    action: Action
    reason: str = ""


DELIVERED = Verdict("ack")


def verdict(error: Exception, attempts: int, max_attempts: int) -> Verdict:
    """The policy for a delivery whose handling raised `error`, on its `attempts`-th try."""
    if isinstance(error, PermanentError):
        return Verdict("dead_letter", error.reason)
    if isinstance(error, StoreUnavailableError):
        return Verdict("release", "store_unavailable")
    reason = error.reason if isinstance(error, TransientError) else "internal_error"
    if attempts < max_attempts:
        return Verdict("retry", reason)
    return Verdict("dead_letter", reason if reason == "internal_error" else "retries_exhausted")


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
    """Settles every delivery of one queue through its handler (see the module docstring).

    `stage` names it in logs and metrics (inbound, outbound, gdpr)."""

    def __init__(self, stage: str, workers: Workers, handler: Handler, sink: Sink,
                 queue: str) -> None:
        self.stage = stage
        self.workers = workers
        self.handler = handler
        self.sink = sink
        self.queue = queue
        self.lanes = Lanes()
        self.handing_back = False  # stopping a shard: start nothing more, see relayd.route
        self._attempts: OrderedDict[bytes, int] = OrderedDict()

    async def on_message(self, delivery: Delivery) -> None:
        """Called in delivery order; everything before the lane runs synchronously."""
        started = time.monotonic()
        metrics.received(self.stage)
        lane: str | None
        try:
            wire.check(delivery.headers)  # bad_properties: see relayd.wire
            lane, work = self.handler.prepare(delivery)
        except Exception as exc:  # settled below like any failure of the work
            lane, work = None, _raiser(exc)
        task = self.lanes.submit(lane, lambda: self.settle(delivery, work, started))
        task.add_done_callback(lambda _: metrics.settled(self.stage))

    async def settle(self, delivery: Delivery, work: Work, started: float) -> None:
        """Run `work` and settle `delivery` once, whatever either raises."""
        if self.handing_back:
            return  # left unacked: it goes back to the queue when our channel closes
        kind, outcome, reason = "", "unsettled", ""
        try:
            try:
                kind = await work()
                judged = DELIVERED
            except Exception as exc:
                if not isinstance(exc, PermanentError | TransientError | StoreUnavailableError):
                    # the type only: a bug's message may quote the payload
                    _log.error("handler_failed", stage=self.stage, error=type(exc).__name__)
                attempts = 0 if isinstance(exc, PermanentError) else self._attempt(delivery)
                judged = verdict(exc, attempts, self.workers.max_attempts)
            outcome, reason = await self._apply(delivery, judged)
        finally:
            latency = time.monotonic() - started
            if outcome != "delivered" or log.debugging():  # delivered: at debug level
                (_log.debug if outcome == "delivered" else _log.info)(
                    "handled", stage=self.stage, type=kind, outcome=outcome, reason=reason,
                    latency_ms=round(latency * 1000, 2))
            metrics.handled(self.stage, outcome, reason, kind, latency, delivery.timestamp)

    async def _apply(self, delivery: Delivery, judged: Verdict) -> tuple[str, str]:
        """Settle `delivery` as `judged`; return the (outcome, reason) that happened."""
        reason = judged.reason
        if judged.action in ("retry", "release"):
            return await self._requeue(delivery, reason)
        if judged.action == "dead_letter":
            try:
                await self.sink.dead_letter(delivery, self.queue, reason)
            except (TransientError, *amqp.CONNECT_ERRORS) as exc:  # the broker's trouble
                self._attempt(delivery)  # so that the backoff grows
                why = exc.reason if isinstance(exc, TransientError) else "publish_failed"
                return await self._requeue(delivery, f"dead_letter_{why}")
            except Exception as exc:  # no copy can be made: the broker dead-letters it
                _log.warning("dead_letter_failed", stage=self.stage, reason=reason,
                             error=type(exc).__name__)
                return await self._settle(delivery, delivery.reject(requeue=False),
                                          "dead_lettered_by_broker", reason)
        outcome = "delivered" if judged.action == "ack" else "dead_lettered"
        settled = await self._settle(delivery, delivery.ack(), outcome, reason)
        if settled[0] == outcome:
            self._attempts.pop(self._key(delivery), None)
        return settled

    async def _requeue(self, delivery: Delivery, reason: str) -> tuple[str, str]:
        """Put `delivery` back in its queue after a backoff that grows with its attempts
        (counted in settle, except for an unavailable store)."""
        await asyncio.sleep(self._backoff(self._attempts.get(self._key(delivery), 1)))
        return await self._settle(delivery, delivery.nack(requeue=True), "retry", reason)

    async def _settle(self, delivery: Delivery, call: Awaitable[None], outcome: str,
                      reason: str) -> tuple[str, str]:
        """Await one ack, nack or reject; return (outcome, reason) if it went through.
        A delivery whose channel is gone is the broker's to deliver again (unsettled);
        after any other failure it is requeued, so that it is not held for as long as the
        channel lives."""
        try:
            await call
        except amqp.CONNECT_ERRORS:
            return "unsettled", reason
        except Exception as exc:
            _log.error("settle_failed", stage=self.stage, error=type(exc).__name__)
            try:
                await delivery.nack(requeue=True)
            except Exception:
                return "unsettled", reason
            return "retry", "settle_failed"
        return outcome, reason

    @staticmethod
    def _key(delivery: Delivery) -> bytes:
        return hashlib.blake2b(delivery.body, digest_size=16).digest()

    def _attempt(self, delivery: Delivery) -> int:
        """How many times this delivery has failed here, this one included."""
        broker_count = (delivery.headers or {}).get("x-delivery-count")
        key = self._key(delivery)
        count = self._attempts.get(key, 0) + 1
        if isinstance(broker_count, int):
            count = max(count, broker_count + 1)
        self._attempts[key] = count
        self._attempts.move_to_end(key)
        while len(self._attempts) > 10_000:
            self._attempts.popitem(last=False)
        return count

    def _backoff(self, attempts: int) -> float:
        w = self.workers
        return float(min(w.retry_max_backoff, w.retry_initial_backoff * 2 ** (attempts - 1)))

    async def drain(self, deadline_s: float) -> int:
        """Wait for in-flight messages up to `deadline_s`; return how many were abandoned."""
        if not self.lanes.tasks:
            return 0
        _, pending = await asyncio.wait(set(self.lanes.tasks), timeout=deadline_s)
        for task in pending:
            task.cancel()
        return len(pending)


def _raiser(exc: Exception) -> Work:
    async def fail() -> str:
        raise exc
    return fail

