"""Every delivery is settled exactly once, whatever any stage below the consumer raises.

A real inbound handler consumes the real inbound queue of a relay in its own vhost; one
stage at a time (prepare, handle, the business publish, the dead-letter copy, the ack)
raises an error outside relayd's error tree on the first attempt of every message. The
broker must then hold nothing unacknowledged while the consumer is still connected:
every message delivered (duplicates allowed: at least once) or dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aio_pika
import orjson
import pytest

from relayd import amqp
from relayd.amqp import Delivery
from relayd.consume import Consumer, Work
from relayd.inbound import Inbound
from tests.integration.harness import WAIT, Relay, rabbitmqctl

STAGES = ["prepare", "handle", "publish", "dead_letter", "ack"]
MESSAGES = 6


class Faults:
    """Raises at `stage` the first time each message (by body) passes there."""

    def __init__(self, stage: str, messages: int) -> None:
        self.stage = stage
        self.seen: set[tuple[str, bytes]] = set()
        self.raised = 0
        self.finished: set[bytes] = set()  # bodies acked, or rejected to the dead letters
        self.all_finished = asyncio.Event()
        self.messages = messages

    def finish(self, body: bytes) -> None:
        self.finished.add(hashlib.sha256(body).digest())
        if len(self.finished) == self.messages:
            self.all_finished.set()

    def at(self, stage: str, body: bytes) -> None:
        key = (stage, hashlib.sha256(body).digest())
        if stage == self.stage and key not in self.seen:
            self.seen.add(key)
            self.raised += 1
            raise RuntimeError(f"fault at {stage}")


class FaultyHandler:
    def __init__(self, inner: Inbound, faults: Faults) -> None:
        self.inner, self.faults = inner, faults

    def prepare(self, delivery: Delivery) -> tuple[str | None, Work]:
        self.faults.at("prepare", delivery.body)
        lane, work = self.inner.prepare(delivery)

        async def faulty() -> str:
            self.faults.at("handle", delivery.body)
            return await work()
        return lane, faulty


class FaultySink(amqp.Publisher):
    """The real publisher; the business publish and the dead-letter copy may raise."""

    faults: Faults

    def to_business(self, business: str, body: bytes, message_id: str,
                    kind: str) -> Awaitable[None]:
        self.faults.at("publish", message_id.encode())
        return super().to_business(business, body, message_id, kind)

    def dead_letter(self, incoming: Delivery, queue: str, reason: str) -> Awaitable[None]:
        self.faults.at("dead_letter", incoming.body)
        return super().dead_letter(incoming, queue, reason)


class FaultyAck:
    """A real delivery whose ack raises as `faults` says (before it reaches the broker);
    it tells `faults` when it is finished (acked, or rejected to the dead letters)."""

    def __init__(self, message: aio_pika.abc.AbstractIncomingMessage, faults: Faults) -> None:
        self._message, self._faults = message, faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._message, name)

    async def ack(self) -> None:
        self._faults.at("ack", self._message.body)
        await self._message.ack()
        self._faults.finish(self._message.body)

    async def reject(self, *, requeue: bool) -> None:
        await self._message.reject(requeue=requeue)
        if not requeue:
            self._faults.finish(self._message.body)


def counts(relay: Relay, queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of `queue`, as the broker counts them."""
    rows = orjson.loads(rabbitmqctl("list_queues", "-p", relay.vhost, "name", "messages_ready",
                                    "messages_unacknowledged", "--formatter", "json", "-q"))
    row = next(r for r in rows if r["name"] == queue)
    return int(row["messages_ready"]), int(row["messages_unacknowledged"])


async def nothing_unacked(relay: Relay, queue: str) -> None:
    """Until the broker counts nothing ready and nothing unacknowledged in `queue` (its
    counts may lag a moment behind)."""
    async with asyncio.timeout(WAIT * 2):
        while counts(relay, queue) != (0, 0):  # noqa: ASYNC110 - the broker has no event
            await asyncio.sleep(0.2)


async def ids_in_inbox(relay: Relay, expected: set[str]) -> set[str]:
    """The ids of the business's events, read until every expected one came (the same
    id may come twice: a message whose ack failed is handled again)."""
    seen: set[str] = set()
    queue = await relay.queue(relay.inbox("acme"))
    async with asyncio.timeout(WAIT), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            seen.add(str(message.message_id))
            if expected <= seen:
                break
    return seen


@contextlib.asynccontextmanager
async def consumer(relay: Relay, faults: Faults) -> AsyncIterator[Consumer]:
    connection = await amqp.connect(relay.settings, "test-settle")
    try:
        channel = await amqp.open_channel(connection, relay.settings.workers.prefetch)
        sink = FaultySink(channel, relay.settings, relay.keyring.opaque_secret)
        sink.faults = faults
        handler = FaultyHandler(Inbound(relay.settings, relay.store, lambda: relay.keyring,
                                        sink), faults)
        queue_name = relay.settings.topology.inbound_queue
        consuming = Consumer("inbound", relay.settings.workers, handler, sink, queue_name)
        queue = await channel.get_queue(queue_name, ensure=False)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await consuming.on_message(FaultyAck(message, faults))

        await queue.consume(on_message)
        yield consuming
    finally:
        await connection.close()


class TestEveryStageRaises:
    @pytest.mark.parametrize("stage", STAGES)
    async def test_nothing_is_left_unacked(self, relay: Relay, stage: str) -> None:
        """With `stage` raising once per message, every valid message reaches the
        business, the invalid one reaches relayd.dead, and the broker holds nothing
        unacknowledged while the consumer is still connected."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        faults = Faults(stage, MESSAGES + 1)
        sent = {await relay.send(phone, "acme", "start")}
        for n in range(MESSAGES - 1):
            sent.add(await relay.send(phone, "acme", "message", {"text": str(n)}))
        await relay.publish_up(b"\x00" * 64)  # opens with no key: dead-lettered
        inbound = relay.settings.topology.inbound_queue
        async with consumer(relay, faults) as consuming:
            await asyncio.wait_for(faults.all_finished.wait(), WAIT * 2)
            received = await ids_in_inbox(relay, sent)
            [dead] = await relay.dead(1)
            await nothing_unacked(relay, inbound)
            assert not consuming.lanes.tasks
            await relay.assert_empty(inbound)
        assert faults.raised >= (1 if stage == "dead_letter" else MESSAGES)
        assert received == sent
        if stage == "dead_letter":  # no copy: the broker dead-lettered the original
            assert dead.body == b"\x00" * 64
        else:  # relayd's copy, of input from no known sender: no body
            assert (dead.headers["x-relayd-reason"], dead.body) == ("decrypt_failed", b"")
