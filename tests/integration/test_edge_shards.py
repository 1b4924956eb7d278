"""With topology.shards > 1, the edge publishes each device's envelopes straight to the
device's shard queue: no router opens them. A real edge, real WebSocket clients, real
broker, real inbound workers; the test itself holds the router lock, so that whatever the
workers handle meanwhile cannot have come through a router."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aiormq
import pytest

from relayd import envelope, shard, topology
from relayd.client import DeviceKeys, parse_event
from tests.integration.edge_harness import running, send
from tests.integration.harness import (
    WAIT,
    Relay,
    add_amqp_user,
    amqp_url,
    confine_business,
    documented_permissions,
    rabbitmqctl,
    relay_in_vhost,
)

SHARDS = 4
DEVICES = 6
COUNT = 25  # numbered messages per device


@pytest.fixture
async def sharded(tmp_path: Path) -> AsyncIterator[Relay]:
    async with relay_in_vhost(tmp_path, topology={"shards": SHARDS}) as relay:
        await relay.add_business("acme")
        yield relay


@contextlib.asynccontextmanager
async def router_held(relay: Relay) -> AsyncIterator[None]:
    """Hold the inbound router lock (relayd.topology.router_lock) from the test's own
    connection, so that no relayd process routes relayd.inbound until the block ends."""
    connection = await aio_pika.connect(relay.settings.amqp.url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(
            topology.router_lock(relay.settings.topology.inbound_queue), exclusive=True
        )
        yield
    finally:
        await connection.close()


async def numbered(relay: Relay, device: DeviceKeys) -> list[bytes]:
    """A start, then COUNT numbered messages, sealed in order."""
    first = [device.seal(relay.public, device.payload("acme", "start", {"text": "0"}))]
    return first + [
        device.seal(relay.public, device.payload("acme", "message", {"text": str(n)}))
        for n in range(1, COUNT + 1)
    ]


class TestDirectPath:
    async def test_edge_traffic_skips_the_router_and_keeps_order(self, sharded: Relay) -> None:
        """With the router lock held by the test, six devices' interleaved numbered streams
        through the edge are all handled, each conversation in the order sent, and
        relayd.inbound (the router's queue) never holds one of them; an envelope published
        to relayd.ingress without the edge waits there until a router runs again."""
        relay, t = sharded, sharded.settings.topology
        devices = [await relay.add_device(f"user-{i}", f"dev-{i}") for i in range(DEVICES)]
        assert len({shard.device_shard(t, d.device) for d in devices}) > 1  # spread out
        async with router_held(relay):
            await relay.start("inbound")
            async with running(relay) as edge:

                async def stream(device: DeviceKeys) -> None:
                    ws = await edge.login(device)
                    for ref, sealed in enumerate(await numbered(relay, device)):
                        assert await send(ws, ref, sealed, relay.public.kid) == {
                            "type": "ack",
                            "ref": ref,
                        }
                    await ws.close()

                await asyncio.gather(*(stream(d) for d in devices))
                events = [
                    parse_event(m.body)
                    for m in await relay.take(relay.inbox("acme"), DEVICES * (COUNT + 1))
                ]
                assert await relay.depth(t.inbound_queue) == 0
                by_conversation: dict[str, list[str]] = {}
                for event in events:
                    by_conversation.setdefault(event["conversation"], []).append(
                        event["body"]["text"]
                    )
                assert (
                    sorted(by_conversation.values())
                    == [[str(n) for n in range(COUNT + 1)]] * DEVICES
                )
                await relay.assert_empty(t.dead_queue)

                # Without the edge: the router's path, held until the lock is let go.
                loner = await relay.add_device("user-x", "dev-x")
                await relay.send(loner, "acme", "start", {"text": "routed"})
                await relay.wait_depth(t.inbound_queue, 1)
        # The lock is free: this process's worker becomes the router (within 2 s).
        [event] = await relay.events("acme", 1, wait=WAIT)
        assert event["body"] == {"text": "routed"}
        await relay.assert_empty(t.inbound_queue, t.dead_queue)

    async def test_a_device_lands_in_the_shard_the_router_would_pick(self, sharded: Relay) -> None:
        """With no worker running, each device's envelope waits in exactly
        shard.device_shard(device), with the headers a worker checks."""
        relay, t = sharded, sharded.settings.topology
        devices = [await relay.add_device(f"user-{i}", f"dev-{i}") for i in range(DEVICES)]
        async with running(relay) as edge:
            for device in devices:
                ws = await edge.login(device)
                sealed = device.seal(relay.public, device.payload("acme", "start"))
                assert (await send(ws, 1, sealed, relay.public.kid))["type"] == "ack"
                await ws.close()
        expected = {shard.shard_queue(t, "inbound", k): 0 for k in range(SHARDS)}
        for device in devices:
            expected[shard.device_shard(t, device.device)] += 1
        assert {q: await relay.depth(q) for q in expected} == expected
        assert await relay.depth(t.inbound_queue) == 0
        device = devices[0]
        [message] = await relay.take(shard.device_shard(t, device.device), 1)
        assert message.headers == {
            envelope.KID_HEADER: relay.public.kid,
            envelope.DEVICE_HEADER: device.device,
        }

    async def test_a_device_split_between_the_paths_loses_nothing(self, sharded: Relay) -> None:
        """An upgrade: a message an old edge put in relayd.ingress waits for the router
        while later ones of the same device go straight to its shard. Each path keeps its
        order; the overtaken message is handled late, not lost (the replay window)."""
        relay, t = sharded, sharded.settings.topology
        phone = await relay.add_device("alice", "phone")
        async with router_held(relay):
            await relay.start("inbound")
            async with running(relay) as edge:
                ws = await edge.login(phone)
                start = phone.seal(relay.public, phone.payload("acme", "start", {"text": "0"}))
                assert (await send(ws, 0, start, relay.public.kid))["type"] == "ack"
                [event] = await relay.events("acme", 1)
                old = phone.seal(relay.public, phone.payload("acme", "message", {"text": "1"}))
                ingress = await relay.channel.get_exchange(t.ingress_exchange)
                await ingress.publish(aio_pika.Message(old, headers={  # as an old edge does
                    envelope.KID_HEADER: relay.public.kid, envelope.DEVICE_HEADER: "phone"}),
                    routing_key=t.inbound_routing_key)
                for n in (2, 3):
                    sealed = phone.seal(relay.public, phone.payload(
                        "acme", "message", {"text": str(n)}))
                    assert (await send(ws, n, sealed, relay.public.kid))["type"] == "ack"
                direct = await relay.events("acme", 2)
                assert [e["body"]["text"] for e in direct] == ["2", "3"]
                await relay.wait_depth(t.inbound_queue, 1)
        [late] = await relay.events("acme", 1)  # the router runs again
        assert late["body"] == {"text": "1"}
        assert {e["conversation"] for e in [event, *direct, late]} == {event["conversation"]}
        await relay.assert_empty(t.inbound_queue, t.dead_queue)


class TestHostileHeaders:
    async def test_an_envelope_of_another_device_is_refused_on_the_direct_path(
        self, sharded: Relay
    ) -> None:
        """Sealed by bob, sent on alice's connection: it goes to alice's shard (the edge
        cannot open it) and the shard's worker dead-letters it wrong_device."""
        relay, t = sharded, sharded.settings.topology
        phone = await relay.add_device("alice", "phone")
        bob = await relay.add_device("bob", "bob-phone")
        async with router_held(relay):
            await relay.start("inbound")
            async with running(relay) as edge:
                ws = await edge.login(phone)
                forged = bob.seal(relay.public, bob.payload("acme", "start", {"text": "as bob"}))
                assert (await send(ws, 1, forged, relay.public.kid))["type"] == "ack"
                [dead] = await relay.dead(1)
                assert dead.headers["x-relayd-reason"] == "wrong_device"
                assert dead.headers["x-relayd-queue"] == shard.device_shard(t, "phone")
                assert dead.body == b""  # sent by whom it must not be: no body kept
                await relay.assert_empty(relay.inbox("acme"), t.inbound_queue)

    async def test_a_forged_header_on_ingress_is_refused_by_the_router(
        self, sharded: Relay
    ) -> None:
        """Published to relayd.ingress (not by the edge) with x-relayd-device naming
        another device than sealed it: the router dead-letters it wrong_device."""
        relay, t = sharded, sharded.settings.topology
        phone = await relay.add_device("alice", "phone")
        await relay.add_device("bob", "bob-phone")
        await relay.start("inbound")
        sealed = phone.seal(relay.public, phone.payload("acme", "start"))
        exchange = await relay.channel.get_exchange(t.ingress_exchange)
        await exchange.publish(
            aio_pika.Message(
                sealed,
                headers={
                    envelope.KID_HEADER: relay.public.kid,
                    envelope.DEVICE_HEADER: "bob-phone",
                },
            ),
            routing_key=t.inbound_routing_key,
        )
        [dead] = await relay.dead(1)
        assert dead.headers["x-relayd-reason"] == "wrong_device"
        assert dead.headers["x-relayd-queue"] == t.inbound_queue  # the router's refusal
        await relay.assert_empty(relay.inbox("acme"))

    @pytest.mark.parametrize("party", ["business", "gateway"])
    @pytest.mark.parametrize("via", ["shard_exchange", "default_exchange"])
    async def test_only_relayd_may_write_to_a_shard(
        self, sharded: Relay, party: str, via: str
    ) -> None:
        """A business (with `business add`'s rights) and a gateway of the operator's own
        (the gateway row of deploy/rabbitmq/README.md) are refused by the broker when they
        publish to relayd.shards or straight into a shard queue; nothing arrives."""
        relay, t = sharded, sharded.settings.topology
        if party == "business":
            user, password = confine_business(relay, "acme")
        else:
            user = f"edge-{relay.vhost}"
            password = add_amqp_user(relay.vhost, user)
            grant = documented_permissions()["gateway"]
            rabbitmqctl(
                "set_permissions",
                "-p",
                relay.vhost,
                user,
                grant["configure"],
                grant["write"],
                grant["read"],
            )
        target = shard.shard_queue(t, "inbound", 0)
        exchange_name = t.shard_exchange if via == "shard_exchange" else ""
        connection = await aio_pika.connect(amqp_url(user, password, relay.vhost))
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = (
                await channel.get_exchange(exchange_name, ensure=False)
                if exchange_name
                else channel.default_exchange
            )
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await asyncio.wait_for(
                    exchange.publish(
                        aio_pika.Message(b"x", headers={envelope.DEVICE_HEADER: "phone"}),
                        routing_key=target,
                    ),
                    WAIT,
                )
        finally:
            await connection.close()
            rabbitmqctl("delete_user", user)
        assert await relay.depth(target) == 0
