"""Coalesced acks (relayd.amqp.AckWindow, Acks): a broker never sees an ack for a delivery
whose work was not done, nor a frame that would close the channel."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from relayd.amqp import Acks, AckWindow


class Broker:
    """What RabbitMQ holds unsettled on one channel, and how it takes settle frames: an
    unknown delivery tag closes the channel (PRECONDITION_FAILED), which fails here."""

    def __init__(self) -> None:
        self.outstanding: set[int] = set()
        self.acked: set[int] = set()
        self.rejected: set[int] = set()

    def ack(self, tag: int, multiple: bool) -> set[int]:
        if multiple:
            covered = {t for t in self.outstanding if t <= tag}
            assert covered, f"ack multiple up to {tag} covers nothing: unknown delivery tag"
        else:
            assert tag in self.outstanding, f"ack of {tag}, not outstanding: unknown tag"
            covered = {tag}
        self.outstanding -= covered
        self.acked |= covered
        return covered

    def reject(self, tag: int) -> None:
        assert tag in self.outstanding, f"reject of {tag}, not outstanding: unknown tag"
        self.outstanding.discard(tag)
        self.rejected.add(tag)


class Interleavings(RuleBasedStateMachine):
    """Deliveries arrive in tag order; their work finishes in any order; some are
    rejected (the reject's frame is sent some time after it was decided); acks are
    flushed at any moment."""

    def __init__(self) -> None:
        super().__init__()
        self.window = AckWindow()
        self.broker = Broker()
        self.next_tag = 1
        self.confirmed: set[int] = set()  # work done: the consumer asked for its ack
        self.rejecting: set[int] = set()  # reject decided, its frame not sent yet
        self.decided: set[int] = set()  # acked or rejected by the consumer

    def open_tags(self) -> list[int]:
        return sorted(set(range(1, self.next_tag)) - self.decided)

    @rule()
    def deliver(self) -> None:
        self.window.received(self.next_tag)
        self.broker.outstanding.add(self.next_tag)
        self.next_tag += 1

    @precondition(lambda self: self.open_tags())
    @rule(pick=st.integers(0, 10**6))
    def work_done(self, pick: int) -> None:
        tags = self.open_tags()
        tag = tags[pick % len(tags)]
        self.decided.add(tag)
        self.confirmed.add(tag)
        self.window.acked(tag)

    @precondition(lambda self: self.open_tags())
    @rule(pick=st.integers(0, 10**6))
    def decide_reject(self, pick: int) -> None:
        tags = self.open_tags()
        tag = tags[pick % len(tags)]
        self.decided.add(tag)
        self.rejecting.add(tag)
        self.window.settling(tag)

    @precondition(lambda self: self.rejecting)
    @rule(pick=st.integers(0, 10**6))
    def send_reject(self, pick: int) -> None:
        tags = sorted(self.rejecting)
        tag = tags[pick % len(tags)]
        self.rejecting.discard(tag)
        self.broker.reject(tag)
        self.window.settled(tag)

    @rule()
    def flush(self) -> None:
        for tag, multiple in self.window.take():
            self.broker.ack(tag, multiple)

    @invariant()
    def only_done_work_is_acked(self) -> None:
        assert self.broker.acked <= self.confirmed
        assert not self.broker.acked & self.broker.rejected

    def teardown(self) -> None:
        """Once every delivery is decided and every frame sent, nothing is held."""
        for tag in self.open_tags():
            self.work_done(tag)  # pick by index: any order
        while self.rejecting:
            self.send_reject(0)
        self.flush()
        assert not self.broker.outstanding
        assert self.broker.acked == self.confirmed


TestInterleavings = Interleavings.TestCase
TestInterleavings.settings = settings(max_examples=300, stateful_step_count=60,
                                      deadline=None)


class TestAckWindow:
    def test_a_run_from_the_oldest_is_one_multiple_ack(self) -> None:
        """Acked deliveries from the oldest open one go out as one ack, multiple=True; an
        acked one after a gap goes out alone."""
        window = AckWindow()
        for tag in range(1, 6):
            window.received(tag)
        for tag in (1, 2, 3, 5):
            window.acked(tag)
        assert window.take() == [(3, True), (5, False)]
        assert window.take() == []
        window.acked(4)
        assert window.take() == [(4, False)]

    def test_a_delivery_being_rejected_stops_the_run(self) -> None:
        """No multiple ack covers a delivery whose reject is not sent yet."""
        window = AckWindow()
        for tag in (1, 2, 3):
            window.received(tag)
        window.settling(2)
        window.acked(1)
        window.acked(3)
        assert window.take() == [(1, False), (3, False)]


class FakeChannel:
    """An aiormq channel that records the settle frames written to it."""

    def __init__(self) -> None:
        self.frames: list[tuple[Any, ...]] = []
        self.waited: list[int] = []  # the tags of the acks sent with wait=True
        self.is_closed = False

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.frames.append(("ack", tag, multiple))
        if wait:
            await asyncio.sleep(0)  # the writer takes the frame
            self.waited.append(tag)

    async def basic_reject(self, tag: int, *, requeue: bool = True, wait: bool = True) -> None:
        self.frames.append(("reject", tag, requeue))

    async def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True,
                         wait: bool = True) -> None:
        self.frames.append(("nack", tag, requeue))


class TestAcks:
    async def test_acks_of_one_turn_go_out_as_one_frame(self) -> None:
        """Acks asked for in one turn of the loop are sent as one multiple ack."""
        channel = FakeChannel()
        acks = Acks(channel)  # type: ignore[arg-type]
        for tag in range(1, 5):
            acks.window.received(tag)
        await asyncio.gather(*(acks.ack(tag) for tag in (2, 1, 3)))
        await asyncio.wait_for(_flushed(acks), 5)
        assert channel.frames == [("ack", 3, True)]

    async def test_an_ack_on_a_closed_channel_raises_a_connect_error(self) -> None:
        """A delivery whose channel is gone is the broker's again: ConnectionError, which
        relayd.consume counts as unsettled."""
        channel = FakeChannel()
        acks = Acks(channel)  # type: ignore[arg-type]
        acks.window.received(1)
        channel.is_closed = True
        with pytest.raises(ConnectionError):
            await acks.ack(1)
        assert channel.frames == []

    async def test_a_reject_is_sent_at_once(self) -> None:
        """A reject does not wait for the next flush, and no ack covers it."""
        channel = FakeChannel()
        acks = Acks(channel)  # type: ignore[arg-type]
        for tag in (1, 2):
            acks.window.received(tag)
        await acks.reject(1, False)
        await acks.ack(2)
        await asyncio.wait_for(_flushed(acks), 5)
        assert channel.frames == [("reject", 1, False), ("ack", 2, False)]

    async def test_a_reject_that_was_never_sent_leaves_its_delivery_open(self) -> None:
        """A reject cancelled while it waits for room in the write queue (a drain's
        cancel at shutdown) wrote nothing: the delivery is open again, and the acks of
        the later ones go out singly, never as a multiple ack covering it."""
        channel = FakeChannel()
        full = asyncio.Event()  # never set: the write queue stays full

        async def blocked(tag: int, *, requeue: bool = True, wait: bool = True) -> None:
            await full.wait()

        channel.basic_reject = blocked  # type: ignore[method-assign]
        acks = Acks(channel)  # type: ignore[arg-type]
        for tag in (1, 2, 3):
            acks.window.received(tag)
        rejecting = asyncio.create_task(acks.reject(1, False))
        await asyncio.sleep(0)
        rejecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await rejecting
        await asyncio.gather(acks.ack(2), acks.ack(3))
        await asyncio.wait_for(_flushed(acks), 5)
        assert channel.frames == [("ack", 2, False), ("ack", 3, False)]

    async def test_flushed_waits_for_the_writer(self) -> None:
        """flushed() returns once the last ack asked for was taken by the writer (waited
        on): what is settled before a clean stop is not delivered again after it."""
        channel = FakeChannel()
        acks = Acks(channel)  # type: ignore[arg-type]
        for tag in (1, 2, 3):
            acks.window.received(tag)
        await acks.ack(1)
        await acks.ack(3)
        await acks.flushed(5)
        assert channel.frames == [("ack", 1, False), ("ack", 3, False)]
        assert channel.waited == [3]


async def _flushed(acks: Acks) -> None:
    while acks._flusher is not None:  # noqa: ASYNC110 - the flusher is a task we await
        await asyncio.sleep(0)
