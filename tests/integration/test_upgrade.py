"""Upgrading the broker's topology from an earlier relayd, on the real broker."""

from __future__ import annotations

import aio_pika
import orjson

from relayd import topology
from tests.integration.harness import Relay

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
