"""Nothing is lost when a worker is killed, stopped under load, or loses its connection."""

from __future__ import annotations

import asyncio
import secrets
import signal
from pathlib import Path

import aio_pika
import pytest
from prometheus_client import REGISTRY

from relayd import amqp, worker
from relayd.amqp import Delivery
from relayd.consume import Work
from relayd.errors import ExitCode
from relayd.inbound import Inbound
from relayd.rules import ACTIVITY_GRANULARITY_MS
from relayd.store import Conversation
from tests.integration.harness import (
    WAIT,
    Relay,
    add_amqp_user,
    amqp_url,
    kill_group,
    rabbitmqctl,
    relay_in_vhost,
    stop_process,
)

USERS = 4
PER_DEVICE = 250


async def send_numbered(relay: Relay, count: int) -> set[str]:
    """Start a conversation per user, then send `count` numbered messages from each device."""
    devices = [await relay.add_device(f"user-{i}", f"dev-{i}") for i in range(USERS)]
    ids = set()
    for device in devices:
        ids.add(await relay.send(device, "acme", "start"))
    for n in range(count):
        for device in devices:
            ids.add(await relay.send(device, "acme", "message", {"text": str(n)}))
    return ids


async def collect(relay: Relay, expected: set[str], wait: float = 60) -> tuple[set[str], int]:
    """Drain the inbox until every expected id arrived; return (ids seen, duplicates)."""
    seen: set[str] = set()
    duplicates = 0
    queue = await relay.queue(relay.inbox("acme"))
    async with asyncio.timeout(wait), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            if message.message_id in seen:
                duplicates += 1
            seen.add(str(message.message_id))
            if expected <= seen:
                break
    return seen, duplicates


async def wait_consuming(relay: Relay, queue: str, wait: float = 30) -> None:
    """Until the relay has a consumer on `queue` (it declared and subscribed)."""
    async with asyncio.timeout(wait):
        while True:  # the broker offers no event for a new consumer
            declared = await relay.channel.declare_queue(queue, passive=True)
            if declared.declaration_result.consumer_count:
                return
            await asyncio.sleep(0.1)


class TestCrash:
    async def test_sigkill_mid_stream_loses_nothing(self, relay: Relay) -> None:
        """A relay killed with SIGKILL mid-stream (supervisor and workers) and started again
        delivers every message."""
        await relay.add_business("acme")
        expected = await send_numbered(relay, PER_DEVICE)
        process = relay.spawn()
        try:
            await relay.wait_depth(relay.inbox("acme"), 5)
        finally:
            kill_group(process)
        assert process.returncode == -signal.SIGKILL
        assert await relay.depth(relay.settings.topology.inbound_queue) > 0
        process = relay.spawn()
        try:
            seen, duplicates = await collect(relay, expected)
        finally:
            stop_process(process)
            kill_group(process)
        assert seen == expected
        assert duplicates <= relay.settings.workers.prefetch


class TestGracefulStop:
    async def test_sigterm_under_load_exits_0_and_loses_nothing(self, relay: Relay) -> None:
        """SIGTERM drains in-flight work, exits 0, and a restart delivers the rest."""
        await relay.add_business("acme")
        expected = await send_numbered(relay, PER_DEVICE)
        process = relay.spawn()
        try:
            await relay.wait_depth(relay.inbox("acme"), 5)
            assert stop_process(process, signal.SIGTERM) == ExitCode.OK
        finally:
            kill_group(process)
        process = relay.spawn()
        try:
            seen, duplicates = await collect(relay, expected)
            assert stop_process(process, signal.SIGINT) == ExitCode.OK
        finally:
            kill_group(process)
        assert seen == expected
        assert duplicates == 0  # a graceful stop acks all it finished


class TestReconnect:
    async def test_resumes_after_the_broker_closes_its_connections(self, relay: Relay) -> None:
        """When the broker drops relayd's connections, relayd reconnects and carries on."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        await relay.start()
        await relay.send(phone, "acme", "start")
        await relay.events("acme", 1)
        rabbitmqctl("close_all_connections", "--vhost", relay.vhost, "test: connection lost")
        await relay.reconnect()
        await wait_consuming(relay, relay.settings.topology.inbound_queue)
        message_id = await relay.send(phone, "acme", "message", {"text": "after"})
        [event] = await relay.events("acme", 1, wait=30)
        assert event["id"] == message_id


def reconnects() -> float:
    return sum(REGISTRY.get_sample_value("relayd_reconnects_total", {"stage": s}) or 0.0
               for s in ("inbound", "outbound"))


class TestBrokerClosesAChannel:
    async def test_a_publish_to_an_exchange_gone_costs_only_its_message(
            self, tmp_path: Path) -> None:
        """A business whose exchange is gone while it is still registered (the moment
        `business remove` deletes it under a message in work): the broker closes the
        channel of every publish to it, from either direction (a device's message, the
        error event answering the business's own bad reply). Each such message is held
        and tried again in place until the hold limit, then dead-lettered
        `retries_exhausted`; everyone else's traffic flows on, on the same connections."""
        async with relay_in_vhost(tmp_path, topology={
                "device_message_ttl_days": 2 / 86400}) as relay:  # held 2 s at most
            ghost_user = f"ghost-{secrets.token_hex(4)}"
            password = add_amqp_user(relay.vhost, ghost_user)
            try:
                await relay.add_business("acme")
                await relay.add_business("ghost", amqp_user=ghost_user)
                await relay.channel.exchange_delete(relay.settings.topology.business_exchange
                                                    .format(business="ghost"))
                alice, bob = (await relay.add_device("alice", "alice-phone"),
                              await relay.add_device("bob", "bob-phone"))
                await relay.start()
                before = reconnects()
                await relay.send(alice, "ghost", "start")
                ghost = await aio_pika.connect(amqp_url(ghost_user, password, relay.vhost))
                async with ghost:
                    await relay.reply("ghost", "c" * 32, "message", raw=b"not json",
                                      user_id=ghost_user, channel=await ghost.channel())
                dead = await relay.dead(2)
                assert sorted(str(m.headers["x-relayd-reason"]) for m in dead) == [
                    "retries_exhausted", "retries_exhausted"]

                started = await relay.send(bob, "acme", "start")
                [event] = await relay.events("acme", 1)
                assert event["id"] == started
                answer = await relay.reply("acme", event["conversation"], "message", {"text": "hi"})
                [down] = await relay.received(bob, 1)
                assert down["id"] == answer
                assert reconnects() == before
            finally:
                rabbitmqctl("delete_user", ghost_user)

    @pytest.mark.parametrize("shards", [1, 2], ids=["one queue", "a shard"])
    async def test_a_consuming_channel_the_broker_closes_is_replaced(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
        """Whatever makes the broker close the channel a worker consumes on (here an ack of
        a delivery tag it never sent; in production a consumer_timeout after a long
        alarm), the worker starts again on a new connection instead of waiting forever on
        a channel that delivers nothing: the queue's, or a shard's."""
        class AcksOnce(Inbound):
            closed_one = False

            def prepare(self, delivery: Delivery) -> tuple[str | None, Work]:
                if not AcksOnce.closed_one:
                    AcksOnce.closed_one = True
                    # the aiormq channel the delivery came on (relayd.amqp.Received)
                    underlay = delivery._acks.channel  # type: ignore[attr-defined]
                    asyncio.get_running_loop().create_task(underlay.basic_ack(2**40))
                return super().prepare(delivery)

        monkeypatch.setattr(worker, "Inbound", AcksOnce)
        async with relay_in_vhost(tmp_path, topology={"shards": shards}) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device("alice", "phone")
            await relay.start("inbound")
            before = reconnects()
            first = await relay.send(phone, "acme", "start")
            [event] = await relay.events("acme", 1, wait=30)  # delivered again after the close
            assert event["id"] == first
            assert AcksOnce.closed_one
            # the event may come from the first handling, before the worker noticed the close
            async with asyncio.timeout(WAIT):
                while reconnects() == before:  # noqa: ASYNC110 - a counter offers no event
                    await asyncio.sleep(0.05)
            assert reconnects() == before + 1
            after = await relay.send(phone, "acme", "message", {"text": "after"})
            # the first message's ack may have been queued behind the close: then it comes
            # once more, with its id (a duplicate the contract lets a business drop), before
            # the message sent after
            [event] = await relay.events("acme", 1)
            if event["id"] == first:
                [event] = await relay.events("acme", 1)
            assert event["id"] == after


class TestRedelivery:
    """A redelivered message is a retry: it changes no state that changed since."""

    @staticmethod
    def handler(relay: Relay) -> Inbound:
        return Inbound(relay.settings, relay.store, lambda: relay.keyring,
                       amqp.Publisher(relay.channel, relay.settings,
                                      relay.keyring.opaque_secret))

    async def test_redelivered_message_does_not_reopen_a_conversation_closed_since(
            self, relay: Relay) -> None:
        """A message redelivered after the user closed the conversation does not reopen it."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        tablet = await relay.add_device("alice", "tablet")
        inbound = self.handler(relay)
        kid = relay.public.kid
        message = inbound.open(phone.seal(relay.public, phone.payload(
            "acme", "message", {"text": "hi"})), kid)
        await inbound.handle(message, redelivered=False)  # delivered, but its ack is lost
        await inbound.handle(inbound.open(tablet.seal(relay.public, tablet.payload(
            "acme", "close")), kid), redelivered=False)
        await inbound.handle(message, redelivered=True)  # the broker's redelivery
        conversation = await relay.store.conversation_of("alice", "acme")
        assert conversation is not None
        assert (conversation.state, conversation.closed_by) == ("closed", "user")
        events = await relay.events("acme", 3)
        assert [e["type"] for e in events] == ["message", "close", "message"]
        assert events[0]["id"] == events[2]["id"]  # a same-id duplicate, as at-least-once allows


class TestActivityTime:
    async def test_activity_is_written_at_most_once_a_minute(self, relay: Relay) -> None:
        """Messages into an open conversation write its activity time only when it is a
        minute old or more: retention reads it in days, and the write cost a fifth of a
        message."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        inbound = TestRedelivery.handler(relay)

        async def send(kind: str) -> Conversation:
            await inbound.handle(inbound.open(phone.seal(relay.public, phone.payload(
                "acme", kind, {"text": "hi"})), relay.public.kid), redelivered=False)
            conversation = await relay.store.conversation_of("alice", "acme")
            assert conversation is not None
            return conversation

        started = await send("start")
        assert (await send("message")).updated_ms == started.updated_ms
        # Age the activity time through the store's API: close, then reopen, back then.
        stale = started.updated_ms - ACTIVITY_GRANULARITY_MS
        await relay.store.close_conversation(started.id, "user", stale)
        aged = await relay.store.open_conversation("alice", "acme", stale, False,
                                                   lambda _: started.id)
        assert aged.updated_ms == stale
        touched = await send("message")
        assert touched.updated_ms > stale
        assert (touched.id, touched.state) == (started.id, "open")
        await relay.events("acme", 3)
