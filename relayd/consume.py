"""Consuming a queue: each delivery handed to its handler, and settled exactly once.

The ack policy lives here and only here: verdict() decides, Consumer.settle applies.
- ack only after everything the message became is confirmed by the broker;
- a PermanentError dead-letters a copy with its reason (confirmed), then acks;
- a failure that may pass (TransientError: a full or missing queue, a nack, a lost
  publish; StoreUnavailableError) is retried IN PLACE: the delivery stays unacked in its
  lane, waits a backoff that grows up to `workers.retry_max_backoff`, and its work runs
  again. It is never put back in the queue, so nothing later in its lane passes it and the
  broker's delivery limit is not spent on it. It is held without counting, up to
  `topology.device_message_ttl_days` (what a device queue would keep it for), then
  dead-lettered as retries_exhausted;
- any other error (a bug) is retried in place the same way, counted: after
  `workers.max_attempts` the message is dead-lettered as internal_error.
Whatever is raised below (by a handler's prepare or its work, the publish of the
dead-letter copy, the ack itself), Consumer.settle is the one guard: the delivery is
acked, dead-lettered or, when even its dead-letter copy cannot be made, rejected to the
queue's dead-letter exchange; an ack that fails on a live channel requeues it. A
delivery whose channel died, or that was held when the consumer stopped, is left to the
broker, which delivers it again (in order, with the rest of what the channel held).

Messages of one lane (a device's conversation inbound, a conversation outbound, a user
for erasure) are handled one at a time, in delivery order; different lanes run
concurrently. At most `workers.prefetch` deliveries are in work at once; the broker may
hand a consumer twice that many (window()), so that held messages, which wait for
something else to clear, leave room for everyone else's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from relayd import amqp, log, metrics, wire
from relayd.amqp import Delivery
from relayd.config import Settings, Workers
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


Action = Literal["ack", "dead_letter", "retry"]
DAY_S = 24 * 3600


@dataclass(frozen=True, slots=True)
class Verdict:
    """What settles a delivery: `ack` it; `dead_letter` it (a copy with `reason`, then
    ack); `retry` it in place after a backoff (see the module docstring)."""

    action: Action
    reason: str = ""


DELIVERED = Verdict("ack")


def window(workers: Workers) -> int:
    """How many unacked deliveries the broker may hand one consumer: `prefetch` in work,
    and as many again waiting, held or behind a held message of their lane."""
    return 2 * workers.prefetch


def hold_limit(settings: Settings) -> float:
    """How long a delivery is held for a failure that may pass: as long as a device queue
    would keep a message (topology.device_message_ttl_days)."""
    return settings.topology.device_message_ttl_days * DAY_S


def verdict(error: Exception, attempts: int, max_attempts: int, held_s: float = 0.0,
            hold_limit_s: float = float("inf")) -> Verdict:
    """The policy for a delivery whose handling raised `error`: on its `attempts`-th try
    counted (bugs only), `held_s` after its first failure that may pass."""
    if isinstance(error, PermanentError):
        return Verdict("dead_letter", error.reason)
    if isinstance(error, TransientError | StoreUnavailableError):
        reason = error.reason if isinstance(error, TransientError) else "store_unavailable"
        return Verdict("retry", reason) if held_s < hold_limit_s else Verdict(
            "dead_letter", "retries_exhausted")
    if attempts < max_attempts:
        return Verdict("retry", "internal_error")
    return Verdict("dead_letter", "internal_error")


class Lanes:
    """Runs the jobs of one key one after another, and different keys concurrently.

    A busy key has one runner task that takes its jobs in turn, as they are submitted:
    no task, future or wait per job behind it (a job with no key gets a task of its own).
    """

    def __init__(self) -> None:
        self._queued: dict[str, collections.deque[Callable[[], Awaitable[None]]]] = {}
        self._runners: dict[str, asyncio.Task[None]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0  # jobs never started: their runner was cancelled first

    def submit(self, key: str | None, job: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Queue `job` on `key`'s lane; the task returned ends once it has run (and,
        for a key, whatever was queued on the lane after it)."""
        if key is not None and (runner := self._runners.get(key)) is not None:
            self._queued[key].append(job)
            return runner
        if key is None:
            task = asyncio.create_task(self._one(job))
        else:
            self._queued[key] = collections.deque((job,))
            task = asyncio.create_task(self._run(key))
            self._runners[key] = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @staticmethod
    async def _one(job: Callable[[], Awaitable[None]]) -> None:
        await job()

    async def _run(self, key: str) -> None:
        queued = self._queued[key]
        try:
            while queued:
                job = queued.popleft()
                try:
                    await job()
                except Exception as exc:  # a bug in a job: the next one still runs
                    _log.error("lane_job_failed", error=type(exc).__name__)
        finally:  # done, or cancelled (drain): what was not started is left to the broker
            self.dropped += len(queued)
            del self._queued[key], self._runners[key]


class Consumer:
    """Settles every delivery of one queue through its handler (see the module docstring).

    `stage` names it in logs and metrics (inbound, outbound, gdpr)."""

    def __init__(self, stage: str, workers: Workers, handler: Handler, sink: Sink,
                 queue: str, hold_limit_s: float = 30 * DAY_S) -> None:
        self.stage = stage
        self.workers = workers
        self.handler = handler
        self.sink = sink
        self.queue = queue
        self.hold_limit_s = hold_limit_s
        self.lanes = Lanes()
        self.handing_back = False  # stopping a shard: start nothing more, see relayd.route
        self._stopping = asyncio.Event()  # drain(): held deliveries are let go
        self._in_work = asyncio.Semaphore(workers.prefetch)

    async def on_message(self, delivery: Delivery) -> None:
        """accept(), as an aio-pika consumer callback."""
        self.accept(delivery)

    def accept(self, delivery: Delivery) -> None:
        """Called in delivery order: prepare the delivery and queue its work on its lane."""
        started = time.monotonic()
        metrics.received(self.stage)
        lane: str | None
        try:
            wire.check(delivery.headers)  # bad_properties: see relayd.wire
            lane, work = self.handler.prepare(delivery)
        except Exception as exc:  # settled below like any failure of the work
            lane, work = None, self._prepared_later(delivery, exc)
        self.lanes.submit(lane, lambda: self._settled(delivery, work, started))

    async def _settled(self, delivery: Delivery, work: Work, started: float) -> None:
        try:
            await self.settle(delivery, work, started)
        finally:
            metrics.settled(self.stage)

    def _prepared_later(self, delivery: Delivery, failed: Exception) -> Work:
        """The work of a delivery whose prepare raised `failed`: it raises that, then, if
        it is tried again, prepares the delivery again (once it works) and runs that."""
        prepared: Work | None = None
        error: Exception | None = failed

        async def work() -> str:
            nonlocal prepared, error
            if error is not None:
                raised, error = error, None
                raise raised
            if prepared is None:
                _, prepared = self.handler.prepare(delivery)
            return await prepared()
        return work

    async def settle(self, delivery: Delivery, work: Work, started: float) -> None:
        """Run `work` and settle `delivery` once, whatever either raises: retried in
        place, in its lane, while it fails in a way that may pass."""
        if self.handing_back:
            return  # left unacked: it goes back to the queue when our channel closes
        kind, outcome, reason = "", "unsettled", ""
        attempts = _delivered_before(delivery)
        held_since: float | None = None
        waits = 0
        try:
            while True:
                try:
                    async with self._in_work:
                        kind = await work()
                    judged = DELIVERED
                except Exception as exc:
                    transient = isinstance(exc, TransientError | StoreUnavailableError)
                    if not (transient or isinstance(exc, PermanentError)):
                        # the type only: a bug's message may quote the payload
                        _log.error("handler_failed", stage=self.stage,
                                   error=type(exc).__name__)
                        attempts += 1
                    if transient and held_since is None:
                        held_since = time.monotonic()
                    held_s = time.monotonic() - held_since if held_since is not None else 0.0
                    judged = verdict(exc, attempts, self.workers.max_attempts, held_s,
                                     self.hold_limit_s)
                if judged.action == "retry":
                    waits += 1
                    if not await self._hold(judged.reason, waits, kind):
                        reason = "stopped_while_held"
                        return
                    continue
                held_since = held_since or time.monotonic()
                last = time.monotonic() - held_since >= self.hold_limit_s
                settled = await self._apply(delivery, judged, last)
                if settled is not None:
                    outcome, reason = settled
                    return
                waits += 1  # the dead-letter copy was refused: try it again
                if not await self._hold(f"dead_letter_{judged.reason}", waits, kind):
                    reason = "stopped_while_held"
                    return
        finally:
            latency = time.monotonic() - started
            if outcome != "delivered" or log.debugging():  # delivered: at debug level
                (_log.debug if outcome == "delivered" else _log.info)(
                    "handled", stage=self.stage, type=kind, outcome=outcome, reason=reason,
                    latency_ms=round(latency * 1000, 2))
            metrics.handled(self.stage, outcome, reason, kind, latency, delivery.timestamp)

    async def _hold(self, reason: str, waits: int, kind: str) -> bool:
        """Wait the `waits`-th backoff before trying a held delivery again; False if the
        consumer stops meanwhile (the delivery is then left to the broker, and so is
        everything not started yet: nothing of its lane may pass it)."""
        backoff = self._backoff(waits)
        if waits == 1 or waits % 10 == 0:
            _log.warning("held", stage=self.stage, reason=reason, waits=waits,
                         retry_in_s=backoff)
        metrics.handled(self.stage, "retry", reason, kind, 0.0, None)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), backoff)
        if self._stopping.is_set():
            self.handing_back = True
            return False
        return True

    async def _apply(self, delivery: Delivery, judged: Verdict,
                     last: bool) -> tuple[str, str] | None:
        """Settle `delivery` as judged (ack or dead_letter); return the (outcome, reason)
        that happened, or None when the broker refused the dead-letter copy for now (if
        it was the `last` try, the broker dead-letters the delivery itself)."""
        reason = judged.reason
        if judged.action == "dead_letter":
            try:
                await self.sink.dead_letter(delivery, self.queue, reason)
            except (TransientError, *amqp.CONNECT_ERRORS) as exc:  # the broker's trouble
                if not last:
                    return None
                _log.warning("dead_letter_failed", stage=self.stage, reason=reason,
                             error=type(exc).__name__)
                return await self._settle(delivery, delivery.reject(requeue=False),
                                          "dead_lettered_by_broker", reason)
            except Exception as exc:  # no copy can be made: the broker dead-letters it
                _log.warning("dead_letter_failed", stage=self.stage, reason=reason,
                             error=type(exc).__name__)
                return await self._settle(delivery, delivery.reject(requeue=False),
                                          "dead_lettered_by_broker", reason)
        outcome = "delivered" if judged.action == "ack" else "dead_lettered"
        return await self._settle(delivery, delivery.ack(), outcome, reason)

    async def _settle(self, delivery: Delivery, call: Awaitable[None], outcome: str,
                      reason: str) -> tuple[str, str]:
        """Await one ack or reject; return (outcome, reason) if it went through.
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

    def _backoff(self, waits: int) -> float:
        w = self.workers
        return float(min(w.retry_max_backoff, w.retry_initial_backoff * 2 ** min(waits - 1, 30)))

    async def drain(self, deadline_s: float) -> int:
        """Wait for the messages in work up to `deadline_s` (held ones are let go at once);
        return how many were abandoned."""
        self._stopping.set()
        if not self.lanes.tasks:
            return 0
        _, pending = await asyncio.wait(set(self.lanes.tasks), timeout=deadline_s)
        for task in pending:
            task.cancel()
        if pending:  # let them unwind, so that what each dropped is counted
            await asyncio.wait(pending, timeout=1.0)
        dropped, self.lanes.dropped = self.lanes.dropped, 0
        for _ in range(dropped):
            metrics.settled(self.stage)  # never started: their `received` is let go here
        return len(pending) + dropped


def _delivered_before(delivery: Delivery) -> int:
    """How often the broker says it delivered this message before (quorum queues)."""
    count = (delivery.headers or {}).get("x-delivery-count")
    return count if isinstance(count, int) and count >= 0 else 0


def retried(handle: Callable[[bool, set[str]], Awaitable[str]], redelivered: bool) -> Work:
    """The work of a delivery that runs `handle(again, sent)`: `again` is whether this run
    may repeat what an earlier one did, `redelivered` at the first run, and True at each
    run after it (a retry in place, which the broker does not mark); `sent` collects the
    targets whose copy the broker confirmed, over every run (relayd.deliver.once)."""
    ran, sent = redelivered, set[str]()

    async def work() -> str:
        nonlocal ran
        again, ran = ran, True
        return await handle(again, sent)
    return work



