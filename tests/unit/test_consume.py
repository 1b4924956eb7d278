"""The consumer's settle policy (relayd.consume), with fake deliveries and no broker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from relayd import log
from relayd.config import Workers
from relayd.consume import Consumer, Lanes, Verdict, Work, verdict
from relayd.errors import (
    EnvelopeError,
    PermanentError,
    ReplyError,
    StoreUnavailableError,
    TransientError,
)
from tests.unit.fakes import FakeDelivery


@pytest.fixture(autouse=True)
def delivered_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Log the `handled` line of a delivered message too (at debug level), whatever an
    earlier test left the level at: these tests read it."""
    monkeypatch.setattr(log, "_debugging", True)


WORKERS = Workers(retry_initial_backoff=0.001, retry_max_backoff=0.002, max_attempts=3)


@dataclass
class FakeSink:
    copies: list[tuple[str, str]] = field(default_factory=list)
    fail: Exception | None = None

    async def dead_letter(self, delivery: Any, queue: str, reason: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.copies.append((queue, reason))


@dataclass
class RefusingSink(FakeSink):
    """Refuses the first `refusals` dead-letter copies as the broker would (a nack)."""

    refusals: int = 0

    async def dead_letter(self, delivery: Any, queue: str, reason: str) -> None:
        if self.refusals:
            self.refusals -= 1
            raise TransientError("nacked")
        await super().dead_letter(delivery, queue, reason)


class Handler:
    """prepare() raises `refuse`, else returns lane `lane` and work that raises `error`."""

    def __init__(self, error: Exception | None = None, refuse: Exception | None = None,
                 lane: str | None = "l") -> None:
        self.error, self.refuse, self.lane = error, refuse, lane

    def prepare(self, delivery: Any) -> tuple[str | None, Work]:
        if self.refuse is not None:
            raise self.refuse

        async def work() -> str:
            if self.error is not None:
                raise self.error
            return "message"
        return self.lane, work


async def run(handler: Any, delivery: FakeDelivery, sink: FakeSink | None = None,
              consumer: Consumer | None = None) -> tuple[FakeSink, list[dict[str, Any]]]:
    """Hand one delivery to a consumer (a new one unless given), wait until it is
    settled; return the sink and the `handled` log lines."""
    sink = sink or FakeSink()
    consumer = consumer or Consumer("inbound", WORKERS, handler, sink, "relayd.inbound")
    with capture_logs() as logs:
        await consumer.on_message(delivery)
        await asyncio.wait_for(asyncio.gather(*consumer.lanes.tasks), 5)
    return sink, [line for line in logs if line["event"] == "handled"]


class TestVerdict:
    @pytest.mark.parametrize(("error", "attempts", "held_s", "expected"), [
        (EnvelopeError("stale"), 1, 0, Verdict("dead_letter", "stale")),
        (ReplyError("invalid"), 9, 0, Verdict("dead_letter", "invalid")),
        (PermanentError("rate_limited"), 1, 0, Verdict("dead_letter", "rate_limited")),
        (TransientError("nacked"), 0, 0, Verdict("retry", "nacked")),
        (TransientError("nacked"), 99, 59, Verdict("retry", "nacked")),
        (TransientError("unroutable"), 0, 60, Verdict("dead_letter", "retries_exhausted")),
        (ValueError("bug"), 2, 0, Verdict("retry", "internal_error")),
        (ValueError("bug"), 3, 0, Verdict("dead_letter", "internal_error")),
        (StoreUnavailableError("down"), 99, 59, Verdict("retry", "store_unavailable")),
        (StoreUnavailableError("down"), 0, 60, Verdict("dead_letter", "retries_exhausted")),
    ])
    def test_policy(self, error: Exception, attempts: int, held_s: float,
                    expected: Verdict) -> None:
        """Permanent errors dead-letter at once; bugs retry up to max_attempts; failures
        that may pass retry without counting, until they were held the hold limit."""
        assert verdict(error, attempts, WORKERS.max_attempts, held_s, 60) == expected


class Flaky:
    """A handler whose work raises each error of `errors` in turn, then succeeds; it
    records the attempts, per lane, in `runs`."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors, self.runs = list(errors), []

    def prepare(self, delivery: Any) -> tuple[str | None, Work]:
        lane, name = delivery.message_id.split(":")

        async def work() -> str:
            self.runs.append(name)
            if name == "1" and self.errors:
                raise self.errors.pop(0)
            return "message"
        return lane, work


class TestSettle:
    async def test_handled_is_acked_once(self) -> None:
        """Work that succeeds is acked once, and logged delivered with its type."""
        delivery = FakeDelivery()
        _, [line] = await run(Handler(), delivery)
        assert delivery.calls == ["ack"]
        assert (line["outcome"], line["type"]) == ("delivered", "message")

    @pytest.mark.parametrize("stage", ["prepare", "handle"])
    async def test_permanent_error_is_dead_lettered_then_acked(self, stage: str) -> None:
        """A PermanentError, from prepare or from the work, dead-letters a copy with its
        reason, then acks."""
        error = EnvelopeError("decrypt_failed")
        handler = Handler(refuse=error) if stage == "prepare" else Handler(error=error)
        delivery = FakeDelivery()
        sink, [line] = await run(handler, delivery)
        assert sink.copies == [("relayd.inbound", "decrypt_failed")]
        assert delivery.calls == ["ack"]
        assert (line["outcome"], line["reason"]) == ("dead_lettered", "decrypt_failed")

    @pytest.mark.parametrize("stage", ["prepare", "handle"])
    async def test_a_bug_is_retried_in_place_then_dead_lettered(self, stage: str) -> None:
        """An error outside the tree, from prepare or from the work, is tried again in
        place until max_attempts, then dead-lettered as internal_error: never requeued,
        never left unsettled."""
        error = ValueError("quoted input")
        handler = Handler(refuse=error) if stage == "prepare" else Handler(error=error)
        delivery = FakeDelivery()
        sink, [line] = await run(handler, delivery)
        assert (line["outcome"], line["reason"]) == ("dead_lettered", "internal_error")
        assert delivery.calls == ["ack"]
        assert sink.copies == [("relayd.inbound", "internal_error")]

    async def test_earlier_deliveries_count_against_a_bug(self) -> None:
        """A message the broker delivered before (x-delivery-count) has fewer tries left."""
        delivery = FakeDelivery(headers={"x-delivery-count": WORKERS.max_attempts - 1},
                                message_id="l:1")
        handler = Flaky([ValueError("bug")] * WORKERS.max_attempts)
        _, [line] = await run(handler, delivery)
        assert (line["outcome"], line["reason"]) == ("dead_lettered", "internal_error")
        assert handler.runs == ["1"]

    @pytest.mark.parametrize("error", [
        TransientError("nacked"), TransientError("unroutable"),
        TransientError("publish_failed"), TransientError("store_busy"),
        StoreUnavailableError("down")])
    async def test_a_failure_that_may_pass_is_held_in_place_without_end(
            self, error: Exception) -> None:
        """A failure that may pass is tried again in place however often it happens
        (more than max_attempts and the broker's delivery limit): nothing is requeued,
        nothing dead-lettered, and the message is acked once it goes through."""
        times = WORKERS.max_attempts * 4
        handler = Flaky([error] * times)
        delivery = FakeDelivery(message_id="l:1")
        sink, [line] = await run(handler, delivery)
        assert handler.runs == ["1"] * (times + 1)
        assert delivery.calls == ["ack"]
        assert sink.copies == []
        assert line["outcome"] == "delivered"

    async def test_a_held_message_keeps_its_place_in_its_lane(self) -> None:
        """While the first message of a lane is held, the later ones of that lane wait
        behind it, and another lane's go on."""
        handler = Flaky([TransientError("nacked")] * 3)
        consumer = Consumer("inbound", WORKERS, handler, FakeSink(), "relayd.inbound")
        deliveries = [FakeDelivery(message_id=m) for m in ("a:1", "a:2", "b:x", "a:3")]
        for delivery in deliveries:
            await consumer.on_message(delivery)
        await asyncio.wait_for(asyncio.gather(*consumer.lanes.tasks), 5)
        assert [r for r in handler.runs if r != "x"] == ["1", "1", "1", "1", "2", "3"]
        assert handler.runs.index("x") < handler.runs.index("2")
        assert [d.calls for d in deliveries] == [["ack"]] * 4

    async def test_held_beyond_the_hold_limit_is_dead_lettered(self) -> None:
        """A failure that lasts longer than the hold limit ends in the dead letters, as
        retries_exhausted."""
        consumer = Consumer("outbound", WORKERS, Handler(error=TransientError("unroutable")),
                            FakeSink(), "relayd.outbound", hold_limit_s=0.01)
        delivery = FakeDelivery()
        sink, [line] = await run(None, delivery, consumer.sink, consumer)  # type: ignore[arg-type]
        assert (line["outcome"], line["reason"]) == ("dead_lettered", "retries_exhausted")
        assert sink.copies == [("relayd.outbound", "retries_exhausted")]
        assert delivery.calls == ["ack"]

    async def test_a_held_message_is_left_to_the_broker_when_the_consumer_stops(
            self) -> None:
        """Draining lets a held message go at once, unsettled (the broker gives it back,
        in order, with what its channel held), and nothing later in its lane starts."""
        slow = Workers(retry_initial_backoff=60, retry_max_backoff=60)
        handler = Flaky([TransientError("nacked")])
        consumer = Consumer("inbound", slow, handler, FakeSink(), "relayd.inbound")
        first, second = FakeDelivery(message_id="a:1"), FakeDelivery(message_id="a:2")
        await consumer.on_message(first)
        await consumer.on_message(second)
        async with asyncio.timeout(5):
            while not handler.runs:  # noqa: ASYNC110 - the fake offers no event
                await asyncio.sleep(0.01)
        assert await consumer.drain(5) == 0
        assert first.calls == second.calls == []
        assert handler.runs == ["1"]

    async def test_a_dead_letter_copy_the_broker_refuses_is_tried_again(self) -> None:
        """When the broker refuses the dead-letter copy, the copy is tried again in place
        until it is confirmed; only then is the delivery acked."""
        delivery = FakeDelivery()
        sink = RefusingSink(refusals=3)
        _, [line] = await run(Handler(error=EnvelopeError("stale")), delivery, sink)
        assert sink.copies == [("relayd.inbound", "stale")]
        assert delivery.calls == ["ack"]
        assert (line["outcome"], line["reason"]) == ("dead_lettered", "stale")

    @pytest.mark.parametrize("error", [TypeError("Unknown type"), UnicodeEncodeError(
        "utf-8", "\udcff", 0, 1, "surrogates"), RuntimeError("anything")])
    async def test_a_dead_letter_copy_that_cannot_be_made_is_rejected(
            self, error: Exception) -> None:
        """A copy that cannot be made at all (a header the client cannot encode) leaves
        the delivery to the broker's own dead-lettering: rejected once, logged so."""
        delivery = FakeDelivery()
        _, [line] = await run(Handler(error=ReplyError("invalid")), delivery, FakeSink(
            fail=error))
        assert delivery.calls == ["reject"]
        assert (line["outcome"], line["reason"]) == ("dead_lettered_by_broker", "invalid")

    async def test_an_ack_on_a_dead_channel_is_left_to_the_broker(self) -> None:
        """An ack that fails because the link is gone is not tried again: the broker
        redelivers what the channel held."""
        delivery = FakeDelivery(fail={"ack": ConnectionError("gone")})
        _, [line] = await run(Handler(), delivery)
        assert delivery.calls == ["ack"]
        assert delivery.settled == []
        assert line["outcome"] == "unsettled"

    async def test_an_ack_that_fails_otherwise_is_requeued(self) -> None:
        """An ack that fails for any other reason requeues the delivery, so it is not
        held unsettled while the channel lives."""
        delivery = FakeDelivery(fail={"ack": RuntimeError("bug")})
        _, [line] = await run(Handler(), delivery)
        assert delivery.calls == ["ack", "requeue"]
        assert delivery.settled == ["requeue"]
        assert (line["outcome"], line["reason"]) == ("retry", "settle_failed")

    async def test_a_failed_requeue_is_unsettled(self) -> None:
        """A requeue (after an ack that failed) that fails too leaves the delivery to the
        broker, and says so."""
        delivery = FakeDelivery(fail={"ack": RuntimeError("bug"),
                                      "requeue": ConnectionError("gone")})
        _, [line] = await run(Handler(), delivery)
        assert delivery.calls == ["ack", "requeue"]
        assert line["outcome"] == "unsettled"

    @pytest.mark.parametrize("stage", ["prepare", "handle", "dead_letter", "ack"])
    @pytest.mark.parametrize("error", [ValueError("x"), KeyError("x"), AssertionError("x"),
                                       TransientError("nacked"), PermanentError("malformed")])
    async def test_settled_at_most_once_whatever_raises(self, stage: str,
                                                        error: Exception) -> None:
        """Whatever any stage raises, at most one settle call goes through, none after,
        and the task never ends with an exception."""
        delivery = FakeDelivery(fail={"ack": error} if stage == "ack" else {})
        handler = Handler(refuse=error if stage == "prepare" else None,
                          error=(error if stage == "handle"
                                 else EnvelopeError("stale") if stage == "dead_letter"
                                 else None))
        sink = FakeSink(fail=error if stage == "dead_letter" else None)
        held_briefly = Consumer("inbound", WORKERS, handler, sink, "relayd.inbound",
                                hold_limit_s=0.05)  # a failure that never passes
        await run(handler, delivery, sink, held_briefly)
        assert len(delivery.settled) == 1


class TestLanes:
    async def test_one_lane_in_order_lanes_concurrently(self) -> None:
        """Jobs of one lane run one after another in submission order; another lane's
        job does not wait for them."""
        lanes, events = Lanes(), []
        gate = asyncio.Event()

        def job(name: str, wait: bool = False) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                if wait:
                    await gate.wait()
                events.append(name)
            return run

        lanes.submit("a", job("a1", wait=True))
        lanes.submit("a", job("a2"))
        other = lanes.submit("b", job("b1"))
        await asyncio.wait_for(other, 5)
        assert events == ["b1"]
        gate.set()
        await asyncio.wait_for(asyncio.gather(*lanes.tasks), 5)
        assert events == ["b1", "a1", "a2"]

    async def test_a_failing_job_does_not_stop_its_lane(self) -> None:
        """A job that raises (a bug) is logged; the next job of its lane still runs, on the
        same runner task."""
        lanes, events = Lanes(), []

        async def broken() -> None:
            raise ValueError("bug")

        async def after() -> None:
            events.append("after")

        with capture_logs() as logs:
            first = lanes.submit("a", broken)
            second = lanes.submit("a", after)
            await asyncio.wait_for(first, 5)
        assert second is first
        assert events == ["after"]
        assert [line["event"] for line in logs] == ["lane_job_failed"]

    async def test_drain_counts_jobs_never_started(self) -> None:
        """Jobs queued behind one that outlives the drain's deadline are abandoned, and
        counted, with the one cancelled."""
        gate = asyncio.Event()

        class Stuck:
            def prepare(self, delivery: Any) -> tuple[str | None, Work]:
                async def work() -> str:
                    await gate.wait()
                    return "message"
                return "l", work

        consumer = Consumer("inbound", WORKERS, Stuck(), FakeSink(), "relayd.inbound")
        deliveries = [FakeDelivery() for _ in range(3)]
        for delivery in deliveries:
            await consumer.on_message(delivery)
        assert await consumer.drain(0.01) == 3
        assert [d.settled for d in deliveries] == [[], [], []]
