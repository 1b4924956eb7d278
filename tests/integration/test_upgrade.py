"""Upgrading the broker's topology from an earlier relayd, on the real broker."""

from __future__ import annotations

import asyncio

import aio_pika
import orjson

from relayd import topology
from tests.integration.harness import WAIT, Relay

USER = "alice@example.org"


class TestDeviceQueueNames:
    async def test_move_device_queues_empties_the_old_names_into_the_new(
            self, relay: Relay) -> None:
        """`topology move-device-queues` moves what waits in a queue named by device id
        (relayd 0.1.0) into the device's keyed queue, in order and unchanged, deletes the
        old queue and its binding, and does nothing when run again; the device then
        receives through its new queue."""
        await relay.add_business("acme")
        phone = await relay.add_device(USER, "phone")
        laptop = await relay.add_device(USER, "laptop")  # no queue of the old name
        t = relay.settings.topology
        legacy = t.device_queue.format(device="phone")
        spec = topology.device(t, "phone", relay.keyring.opaque_secret)[0]
        assert isinstance(spec, topology.Queue)
        old = await relay.channel.declare_queue(legacy, durable=True, arguments=spec.arguments)
        await old.bind(t.devices_exchange, "phone")
        bodies = [b"sealed-1", b"sealed-2", b"sealed-3"]
        devices = await relay.channel.get_exchange(t.devices_exchange)
        for body in bodies:
            await devices.publish(aio_pika.Message(
                body, headers={"relayd-kid": "phone"}, content_type="application/vnd.relayd.sealed",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key="phone")
        await relay.wait_depth(legacy, 3)

        code, out = await relay.cli("topology", "move-device-queues", "--json")
        assert code == 0
        assert orjson.loads(out) == {"queues": 1, "messages": 3}
        assert not await relay.exists(legacy)
        moved = await relay.take(relay.device_queue(phone), 3)
        assert [m.body for m in moved] == bodies
        assert all(m.headers == {"relayd-kid": "phone"} for m in moved)
        assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in moved)
        code, out = await relay.cli("topology", "move-device-queues", "--json")
        assert (code, orjson.loads(out)) == (0, {"queues": 0, "messages": 0})

        await relay.start()
        await relay.send(laptop, "acme", "start")
        await relay.events("acme", 1)
        [echo] = await relay.received(phone, 1)
        assert echo["type"] == "echo"
        await relay.assert_empty(relay.device_queue(phone), t.dead_queue)


class TestBusinessInboxNames:
    async def test_move_business_inboxes_empties_the_old_names_into_the_new(
            self, relay: Relay) -> None:
        """`topology move-business-inboxes` moves the events waiting in an inbox named by
        business id into the business's keyed inbox, in order and with the properties the
        business reads (message_id, type, content_type), deletes the old inbox and its
        binding, and does nothing when run again; new events then reach the new inbox
        only, once."""
        await relay.add_business("acme")
        await relay.add_business("globex", amqp_user="globex-user")  # no inbox of the old name
        phone = await relay.add_device(USER, "phone")
        legacy = await relay.legacy_inbox("acme")
        exchange = await relay.channel.get_exchange(
            topology.business_exchange(relay.settings.topology, "acme"))
        events = [(f"00000000-0000-4000-8000-00000000000{n}", orjson.dumps({"n": n}))
                  for n in range(3)]
        for message_id, body in events:
            await exchange.publish(aio_pika.Message(
                body, content_type="application/json", message_id=message_id, type="message",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key="")
        await relay.wait_depth(legacy, 3)

        code, out = await relay.cli("topology", "move-business-inboxes", "--json")
        assert code == 0
        assert orjson.loads(out) == {"queues": 1, "messages": 3}
        assert not await relay.exists(legacy)
        moved = await relay.take(relay.inbox("acme"), 3)
        assert [(m.message_id, m.body) for m in moved] == events
        assert all((m.type, m.content_type, m.delivery_mode) == (
            "message", "application/json", aio_pika.DeliveryMode.PERSISTENT) for m in moved)
        code, out = await relay.cli("topology", "move-business-inboxes", "--json")
        assert (code, orjson.loads(out)) == (0, {"queues": 0, "messages": 0})

        await relay.start()
        await relay.send(phone, "acme", "start")
        [start] = await relay.events("acme", 1)
        assert start["type"] == "start"
        assert not await relay.exists(legacy)
        await relay.assert_empty(relay.inbox("acme"), relay.settings.topology.dead_queue)

    async def test_an_old_inbox_still_consumed_is_left_whole(self, relay: Relay) -> None:
        """An old inbox whose business still consumes it (no amqp.management to cut it
        off) is unbound and emptied of what is ready, but not deleted, and the command
        exits 1 and says so; once the consumer has gone, a second run moves what it held
        back and deletes the old inbox: nothing is lost."""
        await relay.add_business("acme")
        legacy = await relay.legacy_inbox("acme")
        exchange = await relay.channel.get_exchange(
            topology.business_exchange(relay.settings.topology, "acme"))
        for n in range(2):
            await exchange.publish(aio_pika.Message(orjson.dumps({"n": n}), message_id=str(n),
                                                    delivery_mode=2), routing_key="")
        consumer = await relay.connection.channel()
        await consumer.set_qos(prefetch_count=1)
        held = asyncio.Event()

        async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            held.set()  # and never acked

        tag = await (await consumer.get_queue(legacy)).consume(hold)
        await asyncio.wait_for(held.wait(), WAIT)

        code, out = await relay.cli("topology", "move-business-inboxes", "--json")
        assert (code, orjson.loads(out)) == (1, {"queues": 0, "messages": 1, "in_use": 1})
        assert await relay.exists(legacy)
        await (await consumer.get_queue(legacy)).cancel(tag)
        await consumer.close()  # the message it held goes back to the old inbox
        code, out = await relay.cli("topology", "move-business-inboxes", "--json")
        assert (code, orjson.loads(out)) == (0, {"queues": 1, "messages": 1})
        assert not await relay.exists(legacy)
        moved = await relay.take(relay.inbox("acme"), 2)
        assert sorted(m.message_id for m in moved) == ["0", "1"]
        await relay.assert_empty(relay.inbox("acme"))
