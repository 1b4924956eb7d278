"""Issue 17: each side learns what it may know of its messages, and nothing more.

A device is told, in a sealed `error`, that a message it signed was refused; a business,
once per message, that a device acknowledged it at the edge (`delivered`) or that it
expired undelivered (`expired`). Through the edge, with real WebSocket clients, a real
broker and real workers.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from prometheus_client import REGISTRY

from relayd import envelope, receipts
from relayd.client import DeviceKeys
from relayd.crypto import b64d
from tests.integration.edge_harness import Edge, closed, frame, put, running, send
from tests.integration.harness import WAIT, Relay, add_amqp_user, amqp_url, relay_in_vhost

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "business_echo.py"


@pytest.fixture
async def edge(relay: Relay) -> Edge:
    async with running(relay) as rig:
        yield rig  # type: ignore[misc]


async def delivered(ws: Any, device: DeviceKeys, relay: Relay) -> dict[str, Any]:
    """The next down message through the edge, opened and verified, and acknowledged."""
    got = await frame(ws)
    assert got["type"] == "deliver", got
    message = device.open(relay.public, b64d(got["sealed"]))
    await put(ws, {"type": "received", "tag": got["tag"]})
    return message


def raw_payload(device: DeviceKeys, **fields: Any) -> bytes:
    """An up payload with `fields` over valid ones (None: the field left out)."""
    claims: dict[str, Any] = {"v": 1, "device": device.device, "seq": 1, "ts": 0,
                              "id": str(uuid.uuid4()), "to": "acme", "type": "message",
                              "body": {"text": "hi"}}
    claims.update(fields)
    return orjson.dumps({k: v for k, v in claims.items() if v is not None})


class TestDeviceErrors:
    @pytest.mark.parametrize("case", ["malformed", "malformed_id", "stale", "unknown_business",
                                      "unknown_conversation", "conversation_closed"])
    async def test_each_refusal_reaches_the_sender_alone(self, relay: Relay, edge: Edge,
                                                         case: str) -> None:
        """A verified message refused: the sending device, and no other device and no
        business, gets a sealed, signed `error` with the message's id and the code; the
        message is dead-lettered with that code as before."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        laptop = await relay.add_device("alice", "laptop")
        await relay.start()
        ws = await edge.login(phone)
        kid, ref = relay.public.kid, 0
        if case == "conversation_closed":  # opened and closed by the user first
            for kind in ("start", "close"):
                ref += 1
                assert (await send(ws, ref, phone.seal(relay.public, phone.payload(
                    "acme", kind)), kid))["type"] == "ack"
            await relay.events("acme", 2)
            assert [m["type"] for m in await relay.received(laptop, 2)] == ["echo", "close"]
        message_id = str(uuid.uuid4())
        claims: dict[str, Any] = {
            "malformed": {"extra": 1},
            "malformed_id": {"id": "not-a-uuid"},
            "stale": {"ts": 1},
            "unknown_business": {"to": "nobody"},
            "unknown_conversation": {"type": "typing_start", "body": {}},
            "conversation_closed": {"type": "typing_start", "body": {}},
        }[case]
        now = phone.payload("acme", "message")  # a fresh ts and the next seq
        fields = {"id": message_id, "seq": orjson.loads(now)["seq"],
                  "ts": orjson.loads(now)["ts"], **claims}
        sealed = phone.seal(relay.public, raw_payload(phone, **fields))
        assert await send(ws, ref + 1, sealed, kid) == {"type": "ack", "ref": ref + 1}
        [dead] = await relay.dead(1)
        code = case.removesuffix("_id")
        assert dead.headers["x-relayd-reason"] == code
        error = await delivered(ws, phone, relay)
        assert error["type"] == "error"
        assert error["body"] == {"ref": None if case == "malformed_id" else message_id,
                                 "code": code}
        assert error["from"] == ("nobody" if case == "unknown_business" else "acme")
        assert set(error) == {"v", "device", "seq", "ts", "id", "from", "type", "body"}
        await relay.assert_empty(relay.device_queue(laptop), relay.inbox("acme"),
                                 relay.device_queue(phone))

    @pytest.mark.parametrize("case", ["bad_signature", "wrong_device", "unknown_device"])
    async def test_unverifiable_input_gets_no_answer(self, relay: Relay, edge: Edge,
                                                     case: str) -> None:
        """A message whose signature does not verify, or that is sealed as another device
        (of the same user, or one never registered): dead-lettered, and no device hears of
        it."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        laptop = await relay.add_device("alice", "laptop")
        await relay.start()
        ws = await edge.login(phone)
        signer = {"bad_signature": DeviceKeys.generate("phone"), "wrong_device": laptop,
                  "unknown_device": DeviceKeys.generate("ghost")}[case]
        sealed = signer.seal(relay.public, signer.payload("nobody", "message", {"text": "x"}))
        if case == "unknown_device":  # through the edge it would be wrong_device
            await relay.publish_up(sealed)
        else:
            assert (await send(ws, 1, sealed, relay.public.kid))["type"] == "ack"
        [dead] = await relay.dead(1)
        assert dead.headers["x-relayd-reason"] == case
        await relay.assert_empty(relay.device_queue(laptop), relay.device_queue(phone),
                                 relay.inbox("acme"))

    async def test_a_replay_gets_no_error(self, relay: Relay, edge: Edge) -> None:
        """The same sealed message twice: the first is passed on, the copy dead-lettered as
        replayed, and the device gets nothing for it."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        await relay.start()
        ws = await edge.login(phone)
        sealed = phone.seal(relay.public, phone.payload("acme", "start"))
        for ref in (1, 2):
            assert (await send(ws, ref, sealed, relay.public.kid))["type"] == "ack"
        [dead] = await relay.dead(1)
        assert dead.headers["x-relayd-reason"] == "replayed"
        assert [e["type"] for e in await relay.events("acme", 1)] == ["start"]
        await relay.assert_empty(relay.device_queue(phone))

    async def test_rate_limited_straight_to_ingress(self, tmp_path: Path) -> None:
        """A message that reached relayd.ingress without the edge is judged by its ts:
        over the rate, its device is told rate_limited."""
        async with relay_in_vhost(tmp_path, limits={"device_rate": 0.001,
                                                    "device_burst": 1}) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device("alice", "phone")
            await relay.start()
            await relay.send(phone, "acme", "start")
            late = await relay.send(phone, "acme", "message", {"text": "again"})
            [dead] = await relay.dead(1)
            assert dead.headers["x-relayd-reason"] == "rate_limited"
            [error] = await relay.received(phone, 1)
            assert (error["type"], error["body"]) == ("error", {"ref": late,
                                                               "code": "rate_limited"})


async def up_as(channel: aio_pika.abc.AbstractChannel, relay: Relay, sealed: bytes,
                user_id: str | None) -> None:
    """Publish `sealed` to relayd.ingress as the edge would, x-relayd-device and all."""
    ingress = await channel.get_exchange(relay.settings.topology.ingress_exchange)
    await ingress.publish(aio_pika.Message(sealed, user_id=user_id, headers={
        envelope.KID_HEADER: relay.public.kid, envelope.DEVICE_HEADER: "phone"}),
        routing_key=relay.settings.topology.inbound_routing_key)


class TestEdgeHeader:
    async def test_only_relayds_own_user_skips_the_rate_limit(self, tmp_path: Path) -> None:
        """x-relayd-device tells relayd the edge judged a message already, but anyone
        who may write relayd.ingress can set it: from another broker user (with its
        user_id, or none) a message over the rate is still refused rate_limited; with
        relayd's own user_id, as the edge publishes, it is not judged again."""
        async with relay_in_vhost(tmp_path, limits={"device_rate": 0.001,
                                                    "device_burst": 1}) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device("alice", "phone")
            await relay.start()
            await relay.send(phone, "acme", "start")  # the burst
            await relay.events("acme", 1)
            other = f"{relay.vhost}-gateway"
            password = add_amqp_user(relay.vhost, other)
            async with await aio_pika.connect(amqp_url(other, password, relay.vhost)) as conn:
                channel = await conn.channel(publisher_confirms=True)
                for user_id in (other, None):
                    await up_as(channel, relay, phone.seal(relay.public, phone.payload(
                        "acme", "message", {"text": "forged"})), user_id)
                    [dead] = await relay.dead(1)
                    assert dead.headers["x-relayd-reason"] == "rate_limited"
            await up_as(relay.channel, relay, phone.seal(relay.public, phone.payload(
                "acme", "message", {"text": "judged"})), "guest")  # relayd's user, the edge's
            [event] = await relay.events("acme", 1)
            assert event["body"] == {"text": "judged"}


def receipts_handled() -> float:
    """Receipts relayd has settled so far, in this process, whatever became of them."""
    return sum(REGISTRY.get_sample_value("relayd_messages_total",
                                         {"stage": "receipts", "outcome": outcome}) or 0.0
               for outcome in ("delivered", "dead_lettered"))


async def settle_receipts(count: float) -> None:
    """Until relayd has settled `count` receipts (a counter has no event to wait on)."""
    async with asyncio.timeout(WAIT):
        while receipts_handled() < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def opened(relay: Relay, edge: Edge) -> tuple[DeviceKeys, DeviceKeys, str]:
    """acme, alice's phone and laptop, and the conversation the phone opened (the echo
    to the laptop taken)."""
    await relay.add_business("acme")
    phone = await relay.add_device("alice", "phone")
    laptop = await relay.add_device("alice", "laptop")
    await relay.start()
    await relay.send(phone, "acme", "start")
    [start] = await relay.events("acme", 1)
    await relay.received(laptop, 1)
    return phone, laptop, start["conversation"]


class TestReceipts:
    async def test_one_delivered_however_many_devices_acknowledge(self, relay: Relay,
                                                                  edge: Edge) -> None:
        """Both devices acknowledge a message at the edge: the business gets one
        `delivered`, with the message's id and conversation, a time to the minute, and
        nothing of the devices; a typing indicator gets no receipt."""
        phone, laptop, conversation = await opened(relay, edge)
        before = receipts_handled()
        reply_id = await relay.reply("acme", conversation, "message", {"text": "Shipped"})
        await relay.reply("acme", conversation, "typing_start")
        sessions = [await edge.login(phone), await edge.login(laptop)]
        for ws, device in zip(sessions, (phone, laptop), strict=True):
            got = [await delivered(ws, device, relay) for _ in range(2)]
            assert sorted(m["type"] for m in got) == ["message", "typing_start"]
        await settle_receipts(before + 2)
        [event] = await relay.events("acme", 1)
        assert event.keys() == {"v", "type", "ref", "conversation", "ts"}
        assert (event["type"], event["ref"], event["conversation"]) == (
            "delivered", reply_id, conversation)
        assert event["ts"] % 60_000 == 0
        await relay.assert_empty(relay.inbox("acme"))

    async def test_nothing_until_a_device_acknowledges(self, relay: Relay, edge: Edge) -> None:
        """A copy sent to the device and not acknowledged, then given back when the
        connection ends, is not delivered: no receipt, until a later session's ack."""
        phone, laptop, conversation = await opened(relay, edge)
        before = receipts_handled()
        reply_id = await relay.reply("acme", conversation, "message", {"text": "Hello"})
        ws = await edge.login(phone)
        assert (await frame(ws))["type"] == "deliver"  # read, never acknowledged
        await ws.close()
        await relay.wait_depth(relay.device_queue(phone), 1)
        assert receipts_handled() == before
        await relay.assert_empty(relay.inbox("acme"))
        again = await edge.login(phone)
        assert (await delivered(again, phone, relay))["id"] == reply_id
        [event] = await relay.events("acme", 1)
        assert (event["type"], event["ref"]) == ("delivered", reply_id)
        assert laptop is not None

    async def test_expired_when_every_copy_outlives_the_ttl(self, tmp_path: Path) -> None:
        """With a device TTL of about a second and no device online, the business gets one
        `expired` for its message (two devices: still one), and a later ack is not
        reported; a message acknowledged first gets no `expired` when the other copy
        expires."""
        ttl_days = 1.5 / 86_400
        async with relay_in_vhost(tmp_path, topology={"device_message_ttl_days": ttl_days}
                                  ) as relay, running(relay) as edge:
            phone, laptop, conversation = await opened(relay, edge)
            before = receipts_handled()
            lost = await relay.reply("acme", conversation, "message", {"text": "Anyone?"})
            [event] = await relay.events("acme", 1)
            assert event.keys() == {"v", "type", "ref", "conversation", "ts"}
            assert (event["type"], event["ref"], event["conversation"]) == (
                "expired", lost, conversation)
            await settle_receipts(before + 2)  # the laptop's copy: told once only
            seen = await relay.reply("acme", conversation, "message", {"text": "Still?"})
            ws = await edge.login(phone)
            assert (await delivered(ws, phone, relay))["id"] == seen
            [event] = await relay.events("acme", 1)
            assert (event["type"], event["ref"]) == ("delivered", seen)
            await settle_receipts(before + 4)  # and the laptop's copy of it expired
            await relay.assert_empty(relay.inbox("acme"))
            assert laptop is not None


    async def test_an_expired_copy_in_relayd_dead_links_nothing(self, tmp_path: Path) -> None:
        """A copy that expired into relayd.dead carries no device id, business,
        conversation or message id in clear (docs/privacy.md), yet its receipt token
        still tells the business `expired`."""
        async with relay_in_vhost(tmp_path, topology={"device_message_ttl_days": 1 / 86_400}
                                  ) as relay, running(relay) as edge:
            phone, laptop, conversation = await opened(relay, edge)
            lost = await relay.reply("acme", conversation, "message", {"text": "Anyone?"})
            [event] = await relay.events("acme", 1)
            assert (event["type"], event["ref"]) == ("expired", lost)
            copies = await relay.dead(2)
            assert {m.headers["x-first-death-reason"] for m in copies} == {"expired"}
            in_clear = str([(m.headers, m.message_id, m.type, m.app_id) for m in copies])
            needles = [phone.device, laptop.device, "acme", conversation, lost]
            assert [n for n in needles if n in in_clear] == []


class TestReceiptsHostile:
    async def test_a_forged_or_replayed_receipt_tells_no_business(self, relay: Relay,
                                                                   edge: Edge) -> None:
        """Receipts that relayd did not write (a token changed, one in the form of
        contract 1.4 with a wrong MAC, no token) are dead-lettered as bad_receipt; a real
        token published again is no second event."""
        phone, _, conversation = await opened(relay, edge)
        await relay.add_business("globex")
        reply_id = await relay.reply("acme", conversation, "message", {"text": "Hi"})
        [copy] = await relay.take(relay.device_queue(phone), 1)
        token = copy.headers[receipts.HEADER]
        assert isinstance(token, str)
        exchange = await relay.channel.get_exchange(relay.settings.topology.ingress_exchange)
        key = relay.settings.topology.receipts_routing_key
        before = receipts_handled()
        changed = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
        forged = [changed, f"globex {conversation} {reply_id} {'a' * 26}", None]
        for value in [*forged, token, token]:
            headers = {} if value is None else {receipts.HEADER: value}
            await exchange.publish(aio_pika.Message(b"", headers=headers), routing_key=key)
        dead = await relay.dead(3)
        assert {m.headers["x-relayd-reason"] for m in dead} == {"bad_receipt"}
        [event] = await relay.events("acme", 1)
        assert (event["type"], event["ref"]) == ("delivered", reply_id)
        await settle_receipts(before + 5)
        assert receipts_handled() == before + 5  # relayd's own dead letters stay out
        await relay.assert_empty(relay.inbox("acme"), relay.inbox("globex"))

    async def test_only_expired_copies_reach_the_receipts(self, relay: Relay) -> None:
        """Of what reaches relayd.dead (relayd's own copies, the broker's dead letters for
        other reasons), only what the broker dead-lettered as expired is passed on to
        relayd.receipts: a refused receipt cannot loop."""
        t = relay.settings.topology
        dead = await relay.channel.get_exchange(t.dead_exchange)
        for headers in ({"x-relayd-reason": "bad_receipt"},
                        {"x-first-death-reason": "delivery_limit", receipts.HEADER: "x"},
                        {"x-first-death-reason": "expired"}):
            await dead.publish(aio_pika.Message(b"", headers=headers), routing_key="")
        await relay.wait_depth(t.dead_queue, 3)
        assert await relay.depth(t.receipts_queue) == 1
        [expired] = await relay.take(t.receipts_queue, 1)
        assert expired.headers == {"x-first-death-reason": "expired"}

    async def test_a_device_sees_no_token_and_cannot_ack_anothers_copy(self, relay: Relay,
                                                                      edge: Edge) -> None:
        """What the edge hands a device is the sealed copy alone; a `received` for a tag
        it was never given closes its connection (4400), and tells no business anything."""
        phone, laptop, conversation = await opened(relay, edge)
        await relay.reply("acme", conversation, "message", {"text": "Hi"})
        ws = await edge.login(phone)
        got = await frame(ws)
        assert got.keys() == {"type", "tag", "sealed"}
        await put(ws, {"type": "received", "tag": got["tag"] + 1})
        assert await closed(ws) == 4400
        await relay.assert_empty(relay.inbox("acme"))
        assert await relay.depth(relay.device_queue(laptop)) == 1


class TestExampleBusiness:
    async def test_the_example_logs_its_receipts(self, relay: Relay, edge: Edge) -> None:
        """examples/business_echo.py answers through the edge, and logs the `delivered`
        receipt of its echo once the phone acknowledged it."""
        phone, _, _ = await opened(relay, edge)
        example = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--business", "acme", "--inbox", relay.inbox("acme"),
            "--url", amqp_url("guest", "guest", relay.vhost),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert example.stdout is not None
            assert example.stderr is not None
            await asyncio.wait_for(example.stdout.readline(), WAIT)  # consuming
            await relay.send(phone, "acme", "message", {"text": "ping"})
            ws = await edge.login(phone)
            echo = await delivered(ws, phone, relay)
            assert echo["body"] == {"text": "echo: ping"}
            line = await asyncio.wait_for(example.stderr.readline(), WAIT)
            assert line.decode().startswith(f"receipt: message {echo['id']} delivered at ")
        finally:
            if example.returncode is None:
                example.terminate()
            assert await asyncio.wait_for(example.wait(), WAIT) == 0
