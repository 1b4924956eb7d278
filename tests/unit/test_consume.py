"""The consumer's settle policy (relayd.consume), with fake deliveries and no broker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

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

WORKERS = Workers(retry_initial_backoff=0.001, retry_max_backoff=0.002, max_attempts=3)


@dataclass
class FakeSink:
    copies: list[tuple[str, str]] = field(default_factory=list)
    fail: Exception | None = None

    async def dead_letter(self, delivery: Any, queue: str, reason: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.copies.append((queue, reason))


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
        assert await consumer.drain(5) == 0
    return sink, [line for line in logs if line["event"] == "handled"]


class TestVerdict:
    @pytest.mark.parametrize(("error", "attempts", "expected"), [
        (EnvelopeError("stale"), 1, Verdict("dead_letter", "stale")),
        (ReplyError("invalid"), 9, Verdict("dead_letter", "invalid")),
        (PermanentError("rate_limited"), 1, Verdict("dead_letter", "rate_limited")),
        (TransientError("nacked"), 1, Verdict("retry", "nacked")),
        (TransientError("nacked"), 2, Verdict("retry", "nacked")),
        (TransientError("nacked"), 3, Verdict("dead_letter", "retries_exhausted")),
        (ValueError("bug"), 2, Verdict("retry", "internal_error")),
        (ValueError("bug"), 3, Verdict("dead_letter", "internal_error")),
        (StoreUnavailableError("down"), 1, Verdict("release", "store_unavailable")),
        (StoreUnavailableError("down"), 99, Verdict("release", "store_unavailable")),
    ])
    def test_policy(self, error: Exception, attempts: int, expected: Verdict) -> None:
        """Permanent errors dead-letter at once; transient ones and bugs retry up to
        max_attempts; an unavailable store is retried without end."""
        assert verdict(error, attempts, WORKERS.max_attempts) == expected


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
    async def test_a_bug_is_retried_then_dead_lettered(self, stage: str) -> None:
        """An error outside the tree, from prepare or from the work, is requeued until
        max_attempts, then dead-lettered as internal_error: never left unsettled."""
        error = ValueError("quoted input")
        handler = Handler(refuse=error) if stage == "prepare" else Handler(error=error)
        delivery, sink = FakeDelivery(), FakeSink()
        consumer = Consumer("inbound", WORKERS, handler, sink, "relayd.inbound")
        outcomes = []
        for _ in range(WORKERS.max_attempts):
            _, [line] = await run(handler, delivery, sink, consumer)
            outcomes.append((line["outcome"], line["reason"]))
        assert outcomes == [("retry", "internal_error")] * 2 + [
            ("dead_lettered", "internal_error")]
        assert delivery.calls == ["requeue", "requeue", "ack"]
        assert sink.copies == [("relayd.inbound", "internal_error")]

    async def test_an_unavailable_store_is_requeued_without_end(self) -> None:
        """StoreUnavailableError requeues however often it happens; nothing is dead."""
        delivery = FakeDelivery()
        sink = FakeSink()
        for _ in range(WORKERS.max_attempts + 2):
            await run(Handler(error=StoreUnavailableError("down")), delivery, sink)
        assert delivery.calls == ["requeue"] * (WORKERS.max_attempts + 2)
        assert sink.copies == []

    async def test_a_dead_letter_copy_the_broker_refuses_is_requeued(self) -> None:
        """When the broker refuses the dead-letter copy, the delivery goes back to its
        queue, and the log says retry, not dead_lettered."""
        delivery = FakeDelivery()
        sink = FakeSink(fail=TransientError("nacked"))
        _, [line] = await run(Handler(error=EnvelopeError("stale")), delivery, sink)
        assert delivery.calls == ["requeue"]
        assert (line["outcome"], line["reason"]) == ("retry", "dead_letter_nacked")

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
        """A requeue that fails leaves the delivery to the broker, and says so."""
        delivery = FakeDelivery(fail={"requeue": ConnectionError("gone")})
        _, [line] = await run(Handler(error=TransientError("nacked")), delivery)
        assert delivery.calls == ["requeue"]
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
        await run(handler, delivery, sink)
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
