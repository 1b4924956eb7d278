"""A device's stream at the edge settles each delivery once: acked, or given back.

The slot below is a stand-in for the shared consumer channel with aiormq's behaviour
where it matters: an ack waits for room in the connection's bounded write queue (a
blocked broker), and a cancelled wait writes nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from relayd.edge.link import Stream


@dataclass
class Channel:
    async def basic_cancel(self, consumer_tag: str) -> None:
        pass


@dataclass
class Slot:
    """Records what reaches the broker: acks written and deliveries given back."""

    link: Any = field(default_factory=lambda: SimpleNamespace(spawn=lambda work: None))
    channel: Channel = field(default_factory=Channel)
    streams: dict[str, Stream] = field(default_factory=dict)
    writes: asyncio.Queue[int] = field(default_factory=lambda: asyncio.Queue(maxsize=1))
    ack_waits: asyncio.Event = field(default_factory=asyncio.Event)
    requeued: list[int] = field(default_factory=list)

    async def ack(self, delivery_tag: int) -> None:
        if self.writes.full():
            self.ack_waits.set()
        await self.writes.put(delivery_tag)  # as aiormq's write queue: all or nothing

    async def requeue(self, delivery_tags: list[int]) -> None:
        self.requeued += delivery_tags

    async def sync(self) -> None:
        pass

    def acked(self) -> list[int]:
        return [self.writes.get_nowait() for _ in range(self.writes.qsize())]


def delivery(tag: int) -> Any:
    return SimpleNamespace(delivery_tag=tag, body=b"sealed",
                           header=SimpleNamespace(properties=SimpleNamespace(headers={})))


async def delivered(slot: Slot, tag: int) -> tuple[Stream, int]:
    stream = Stream(slot, "relayd.device.x", "relayd.edge.claim.x",  # type: ignore[arg-type]
                    lambda why: None)
    await stream.deliver(delivery(tag))
    connection_tag, _ = await stream.next()
    return stream, connection_tag


class TestSettledOnce:
    async def test_an_ack_cut_off_by_the_end_of_the_session_is_given_back(self) -> None:
        """The session ends while the ack waits for the write queue: the delivery is not
        acked, so the release gives it back; it is never left unsettled."""
        slot = Slot()
        slot.writes.put_nowait(0)  # the write queue is full: the broker is blocked
        stream, tag = await delivered(slot, 7)
        acking = asyncio.create_task(stream.acknowledge(tag))
        await asyncio.wait_for(slot.ack_waits.wait(), 5)
        acking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await acking
        await stream.release()
        assert slot.acked() == [0]  # what was there before; no ack of 7
        assert slot.requeued == [7]

    async def test_an_acked_delivery_is_not_given_back(self) -> None:
        """An ack that was written leaves nothing out: the release gives nothing back,
        and the same tag cannot be acknowledged twice."""
        slot = Slot()
        stream, tag = await delivered(slot, 7)
        assert await stream.acknowledge(tag)
        assert not await stream.acknowledge(tag)
        await stream.release()
        assert slot.acked() == [7]
        assert slot.requeued == []
