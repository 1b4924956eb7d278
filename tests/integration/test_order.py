"""A lane keeps its place: a message whose publish is refused for a while (a full business
inbox going in, a full device queue going out) is held and tried again in place, and no
later message of its conversation passes it, sharded or not.

Each test fills the target queue (x-max-length, reject-publish) before the traffic, then
drains it slowly, so that room appears again and again while relayd retries. Before
holding in place, a refused message was put back in its queue after its backoff, and the
next one of the same lane, already prefetched, went first: 1 2 3 5 6 7 4 8.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from relayd.client import parse_event
from tests.integration.harness import WAIT, Relay, relay_in_vhost

COUNT = 24
ROOM = 2  # what the target queue takes before it refuses
PACE_S = 0.02  # the slow reader's pause between two messages: room appears one by one


async def read_slowly(relay: Relay, queue_name: str, count: int) -> list[bytes]:
    """The bodies of the next `count` messages of a queue, one at a time, each acked
    after a short pause (a reader that cannot keep up)."""
    queue = await relay.queue(queue_name)
    got: list[bytes] = []
    async with asyncio.timeout(WAIT * 4), queue.iterator() as messages:
        async for message in messages:
            await asyncio.sleep(PACE_S)
            await message.ack()
            got.append(message.body)
            if len(got) == count:
                break
    return got


def sections(shards: int, **topology: Any) -> dict[str, dict[str, Any]]:
    return {"topology": {"shards": shards, **topology},
            "workers": {"retry_initial_backoff": 0.01, "retry_max_backoff": 0.05,
                        "max_attempts": 2}}


@pytest.mark.parametrize("shards", [1, 2], ids=["one queue", "sharded"])
class TestOrderUnderAFullQueue:
    async def test_a_full_inbox_breaks_no_device_order(self, tmp_path: Path,
                                                       shards: int) -> None:
        """One device's messages to a business whose inbox is full reach it in the order
        sent, all of them, none dead-lettered (more retries than workers.max_attempts)."""
        async with relay_in_vhost(tmp_path, **sections(
                shards, business_inbox_max_length=ROOM)) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device("alice", "phone")
            await relay.start("inbound")
            sent = [await relay.send(phone, "acme", "start")]
            sent += [await relay.send(phone, "acme", "message", {"text": str(n)})
                     for n in range(COUNT - 1)]
            await relay.wait_depth(relay.inbox("acme"), ROOM)  # full: the rest is held
            bodies = await read_slowly(relay, relay.inbox("acme"), COUNT)
            assert [parse_event(b)["id"] for b in bodies] == sent
            await relay.assert_empty(relay.settings.topology.dead_queue)

    async def test_a_full_device_queue_breaks_no_reply_order(self, tmp_path: Path,
                                                             shards: int) -> None:
        """A business's replies in one conversation reach a device whose queue is full in
        the order published, with their seqs in that order, and none is dead-lettered."""
        async with relay_in_vhost(tmp_path, **sections(
                shards, device_queue_max_length=ROOM)) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device("alice", "phone")
            await relay.start()
            await relay.send(phone, "acme", "start")
            [event] = await relay.events("acme", 1)
            sent = [await relay.reply("acme", event["conversation"], "message",
                                      {"text": str(n)}) for n in range(COUNT)]
            await relay.wait_depth(relay.device_queue(phone), ROOM)
            bodies = await read_slowly(relay, relay.device_queue(phone), COUNT)
            down = [phone.open(relay.public, b) for b in bodies]
            assert [m["id"] for m in down] == sent
            seqs = [m["seq"] for m in down]
            assert seqs == sorted(seqs)
            await relay.assert_empty(relay.settings.topology.dead_queue)

