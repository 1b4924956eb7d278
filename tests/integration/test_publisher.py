"""relayd.amqp's publish and consume paths against the real broker: every way a publish
can fail is told apart, a publish counts only once confirmed, and the frames relayd writes
itself (amqp.Outlet) and the deliveries it reads itself (amqp.consume) are what aiormq
would write and read. These also pin what relayd.amqp relies on inside aiormq."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from relayd import amqp, topology
from relayd.amqp import Delivery
from relayd.errors import PermanentError, TransientError
from tests.integration.harness import WAIT, Relay


@pytest.fixture
async def connection(relay: Relay) -> AsyncIterator[AbstractConnection]:
    connection = await amqp.connect(relay.settings, "test-publisher")
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def publisher(relay: Relay, connection: AbstractConnection) -> amqp.Publisher:
    return amqp.Publisher(await amqp.open_channel(connection), relay.settings, b"s" * 32)


async def bound(relay: Relay, business: str, **arguments: int | str) -> str:
    """A business exchange (fanout) bound to a fresh queue of that name; the queue's name."""
    exchange = await relay.channel.declare_exchange(
        topology.business_exchange(relay.settings.topology, business),
        aio_pika.ExchangeType.FANOUT, durable=True)
    queue = await relay.channel.declare_queue(f"test.{business}", durable=True,
                                              arguments=arguments or None)
    await queue.bind(exchange)
    return queue.name


class TestPublishFailures:
    async def test_a_publish_nothing_is_bound_to_is_unroutable(
            self, relay: Relay, publisher: amqp.Publisher) -> None:
        """A mandatory publish the broker returns raises TransientError unroutable."""
        await relay.channel.declare_exchange(
            topology.business_exchange(relay.settings.topology, "unbound"),
            aio_pika.ExchangeType.FANOUT, durable=True)
        with pytest.raises(TransientError) as raised:
            await publisher.to_business("unbound", b"{}", "m-1", "message")
        assert raised.value.reason == "unroutable"

    async def test_a_return_fails_the_publish_it_names_when_ids_repeat(
            self, relay: Relay, publisher: amqp.Publisher) -> None:
        """A basic.return names its publish only by message_id, which a device picks:
        with the same id on an unroutable and a routable publish at once, the unroutable
        one raises unroutable and the routable one is confirmed and delivered, in either
        order."""
        await relay.channel.declare_exchange(
            topology.business_exchange(relay.settings.topology, "unbound"),
            aio_pika.ExchangeType.FANOUT, durable=True)
        queue = await bound(relay, "bound")
        for first, second in (("unbound", "bound"), ("bound", "unbound")):
            results = await asyncio.gather(
                publisher.to_business(first, b"{}", "same-id", "message"),
                publisher.to_business(second, b"{}", "same-id", "message"),
                return_exceptions=True)
            outcome = dict(zip((first, second), results, strict=True))
            assert outcome["bound"] is None
            assert isinstance(outcome["unbound"], TransientError)
            assert outcome["unbound"].reason == "unroutable"
        assert await relay.depth(queue) == 2

    async def test_a_publish_refused_by_a_full_queue_is_nacked(
            self, relay: Relay, publisher: amqp.Publisher) -> None:
        """A publish the broker nacks (a full queue that rejects publishes) raises
        TransientError nacked; the one before it, which fitted, was confirmed."""
        queue = await bound(relay, "full", **{"x-max-length": 1, "x-overflow": "reject-publish"})
        await publisher.to_business("full", b"first", "m-1", "message")
        with pytest.raises(TransientError) as raised:
            await publisher.to_business("full", b"second", "m-2", "message")
        assert raised.value.reason == "nacked"
        assert await relay.depth(queue) == 1

    async def test_a_publish_to_a_deleted_exchange_fails_and_the_next_one_reopens(
            self, relay: Relay, publisher: amqp.Publisher) -> None:
        """The broker closes the channel of a publish to an exchange that is gone: that
        publish raises TransientError, and the next one, on the channel opened again, is
        confirmed and delivered."""
        queue = await bound(relay, "acme")
        with pytest.raises(TransientError) as raised:
            await asyncio.wait_for(publisher.to_business("gone", b"lost", "m-1", "message"),
                                   WAIT)
        assert raised.value.reason == "publish_failed"
        await publisher.to_business("acme", b"kept", "m-2", "message")
        [message] = await relay.take(queue, 1)
        assert (message.body, message.message_id) == (b"kept", "m-2")

    async def test_publishes_under_way_when_the_channel_closes_all_fail(
            self, relay: Relay, publisher: amqp.Publisher, connection: AbstractConnection
            ) -> None:
        """Publishes written in the same turn as one that closes the channel, or while
        it closes, each raise TransientError: none waits forever for a confirm that cannot
        come, and none is written after the channel's close-ok (a frame there would close
        the connection: the publish after them is confirmed on it)."""
        queue = await bound(relay, "acme")
        await publisher.to_business("acme", b"opened", "m-0", "message")
        calls = [asyncio.ensure_future(publisher.to_business(
            "gone" if i == 3 else "acme", b"x", f"m-{i}", "message")) for i in range(1, 9)]
        outlet = publisher._outlet
        assert outlet is not None
        async with asyncio.timeout(WAIT):  # until aiormq answered the broker's channel.close
            while outlet.channel._close_exception is None:  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0)
        calls += [asyncio.ensure_future(publisher.to_business("acme", b"x", "late", "message"))
                  for _ in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), WAIT)
        assert isinstance(results[2], TransientError)  # the one to the exchange that is gone
        assert all(r is None or isinstance(r, TransientError) for r in results)
        await publisher.to_business("acme", b"after", "m-after", "message")
        assert not connection.is_closed
        bodies = [m.body for m in await relay.take(queue, await relay.depth(queue))]
        assert bodies[-1] == b"after"

    async def test_a_property_pamqp_cannot_encode_is_unpublishable(
            self, relay: Relay, publisher: amqp.Publisher) -> None:
        """A header pamqp cannot encode raises PermanentError unpublishable, before
        anything is written: the channel stays usable."""
        queue = await bound(relay, "acme")
        with pytest.raises(PermanentError) as raised:
            await publisher.to_shard("test.acme", b"x", {"bad": object()}, "text/plain")
        assert raised.value.reason == "unpublishable"
        with pytest.raises(PermanentError):
            await publisher.to_business("acme", b"x", "m" * 256, "message")  # > a short string
        await publisher.to_business("acme", b"fine", "m-1", "message")
        [message] = await relay.take(queue, 1)
        assert message.body == b"fine"


class TestPublishedFrames:
    async def test_publishes_arrive_whole_and_in_order(
            self, relay: Relay, publisher: amqp.Publisher) -> None:
        """Publishes started one after another are confirmed, and arrive in that order,
        with their bodies (empty, small, and larger than a frame) and properties intact."""
        queue = await bound(relay, "acme")
        await publisher.to_business("acme", b"first", "m-first", "message")
        sizes = [0, 1, 550, 131_072, 300_000] * 20
        bodies = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
        await asyncio.gather(*(publisher.to_business("acme", body, f"m-{i}", "message")
                               for i, body in enumerate(bodies)))
        got = await relay.take(queue, 1 + len(bodies))
        assert [m.message_id for m in got] == ["m-first"] + [f"m-{i}" for i in range(len(sizes))]
        assert [m.body for m in got[1:]] == bodies
        assert {(m.content_type, m.type, m.delivery_mode) for m in got} == {
            ("application/json", "message", aio_pika.DeliveryMode.PERSISTENT)}

    async def test_a_device_copy_carries_its_headers_and_a_message_id(
            self, relay: Relay, publisher: amqp.Publisher, connection: AbstractConnection
            ) -> None:
        """A copy for a device carries its receipt header and no device id (contract
        1.5), persistent, and a message id of its own (as aiormq gave one)."""
        await topology.declare(await amqp.open_channel(connection),
                               topology.device(relay.settings.topology, "dev-1", b"s" * 32))
        await publisher.to_device("dev-1", b"sealed", receipt="r-1")
        await publisher.to_device("dev-1", b"sealed", receipt="r-2")
        got = await relay.take(topology.device_queue(relay.settings.topology, "dev-1",
                                                     b"s" * 32), 2)
        assert [m.headers for m in got] == [
            {amqp.RECEIPT_HEADER: r} for r in ("r-1", "r-2")]
        ids = [m.message_id for m in got]
        assert all(i is not None and len(i) == 32 for i in ids)
        assert ids[0] != ids[1]


class TestConsume:
    async def test_deliveries_reach_the_consumer_in_the_channels_reader(
            self, relay: Relay, connection: AbstractConnection) -> None:
        """amqp.consume hands each delivery over in aiormq's channel reader, in order,
        with no task of its own (aiormq's Channel._on_deliver_frame, replaced), and its
        acks settle them."""
        queue = await bound(relay, "acme")
        for i in range(20):
            await relay.channel.default_exchange.publish(
                aio_pika.Message(f"{i}".encode(), message_id=f"m-{i}"), routing_key=queue)
        channel: AbstractChannel = await amqp.open_channel(connection, prefetch=64)
        got: list[tuple[str | None, str]] = []
        acks: list[asyncio.Future[None]] = []
        done = asyncio.Event()

        def on_message(delivery: Delivery) -> None:
            task = asyncio.current_task()
            assert task is not None
            got.append((delivery.message_id, task.get_coro().__qualname__))  # type: ignore[union-attr]
            acks.append(asyncio.ensure_future(delivery.ack()))
            if len(got) == 20:
                done.set()

        consuming = await amqp.consume(channel, queue, on_message)
        await asyncio.wait_for(done.wait(), WAIT)
        await asyncio.gather(*acks)
        await consuming.cancel()
        await consuming.flushed(WAIT)
        assert got == [(f"m-{i}", "Channel._reader") for i in range(20)]
        await channel.close()
        assert await relay.depth(queue) == 0

    async def test_a_consumer_that_raises_hands_its_delivery_back(
            self, relay: Relay, connection: AbstractConnection) -> None:
        """A delivery whose on_message raised (a bug) is not left unsettled, holding a
        prefetch slot and breaking every later multiple ack: it is nacked back to the
        queue, and comes again, redelivered."""
        queue = await bound(relay, "acme")
        await relay.channel.default_exchange.publish(
            aio_pika.Message(b"x", message_id="m-1"), routing_key=queue)
        channel: AbstractChannel = await amqp.open_channel(connection, prefetch=8)
        seen: list[bool | None] = []
        acks: list[asyncio.Future[None]] = []
        again = asyncio.Event()

        def on_message(delivery: Delivery) -> None:
            seen.append(delivery.redelivered)
            if len(seen) == 1:
                raise RuntimeError("a bug below")
            acks.append(asyncio.ensure_future(delivery.ack()))
            again.set()

        consuming = await amqp.consume(channel, queue, on_message)
        await asyncio.wait_for(again.wait(), WAIT)
        await asyncio.gather(*acks)
        await consuming.cancel()
        await consuming.flushed(WAIT)
        assert seen == [False, True]
        await channel.close()
        assert await relay.depth(queue) == 0
