"""The relay end to end on a real RabbitMQ: both directions and the conversation rules."""

from __future__ import annotations

import pytest

from relayd import envelope
from relayd.errors import EnvelopeError
from tests.integration.harness import Relay

USER = "alice@example.org"
OTHER_USER = "bob@example.org"


class TestConversation:
    async def test_demo_conversation(self, relay: Relay) -> None:
        """Start, both directions, typing, fan-out, the user's delete, then a rejected reply."""
        await relay.add_business("acme")
        phone = await relay.add_device(USER, "phone")
        laptop = await relay.add_device(USER, "laptop")
        await relay.start()

        start_id = await relay.send(phone, "acme", "start", {"intent": "billing", "text": "Hi"})
        [start] = await relay.events("acme", 1)
        assert start["type"] == "start"
        assert start["id"] == start_id
        assert start["body"] == {"intent": "billing", "text": "Hi"}
        conversation = start["conversation"]
        [echo] = await relay.received(laptop, 1)
        assert (echo["type"], echo["id"], echo["from"]) == ("echo", start_id, "acme")
        assert echo["body"] == {"type": "start", "body": {"intent": "billing", "text": "Hi"}}

        await relay.reply("acme", conversation, "typing_start")
        reply_id = await relay.reply("acme", conversation, "message", {"text": "Hello"})
        for device in (phone, laptop):
            typing, message = await relay.received(device, 2)
            assert typing["type"] == "typing_start"
            assert (message["type"], message["id"], message["body"]) == (
                "message", reply_id, {"text": "Hello"})
            assert message["seq"] == typing["seq"] + 1

        await relay.send(laptop, "acme", "message", {"text": "Thanks"})
        await relay.send(laptop, "acme", "read")
        message, read = await relay.events("acme", 2)
        assert (message["type"], message["body"], message["conversation"]) == (
            "message", {"text": "Thanks"}, conversation)
        assert read["type"] == "read"
        [echo] = await relay.received(phone, 1)
        assert echo["body"] == {"type": "message", "body": {"text": "Thanks"}}

        close_id = await relay.send(phone, "acme", "close")
        [closed] = await relay.events("acme", 1)
        assert (closed["type"], closed["id"], closed["conversation"]) == (
            "close", close_id, conversation)
        [closed_on_laptop] = await relay.received(laptop, 1)
        assert closed_on_laptop["type"] == "close"

        late_id = await relay.reply("acme", conversation, "message", {"text": "Still there?"})
        [error] = await relay.events("acme", 1)
        assert error == {"v": 1, "type": "error", "ref": late_id, "conversation": conversation,
                         "code": "conversation_closed", "detail": error["detail"]}
        await relay.assert_empty(relay.device_queue(phone), relay.device_queue(laptop))

    async def test_each_device_gets_its_own_sealing(self, relay: Relay) -> None:
        """A reply is sealed separately to each device: no device can open another's copy."""
        await relay.add_business("acme")
        phone = await relay.add_device(USER, "phone")
        laptop = await relay.add_device(USER, "laptop")
        await relay.start()
        await relay.send(phone, "acme", "start")
        [start] = await relay.events("acme", 1)
        await relay.received(laptop, 1)
        await relay.reply("acme", start["conversation"], "message", {"text": "x"})
        [for_phone] = await relay.take(relay.device_queue(phone), 1)
        [for_laptop] = await relay.take(relay.device_queue(laptop), 1)
        assert envelope.KID_HEADER not in for_phone.headers  # the device knows its own id
        assert for_phone.content_type == envelope.CONTENT_TYPE
        assert phone.open(relay.public, for_phone.body)["device"] == "phone"
        assert laptop.open(relay.public, for_laptop.body)["device"] == "laptop"
        with pytest.raises(EnvelopeError):
            laptop.open(relay.public, for_phone.body)

    async def test_user_restarts_after_close(self, relay: Relay) -> None:
        """After the user deletes it, a new start reopens the conversation for replies."""
        await relay.add_business("acme")
        phone = await relay.add_device(USER, "phone")
        await relay.start()
        await relay.send(phone, "acme", "start")
        await relay.send(phone, "acme", "close")
        await relay.send(phone, "acme", "message", {"text": "back again"})
        start, close, message = await relay.events("acme", 3)
        assert [e["type"] for e in (start, close, message)] == ["start", "close", "message"]
        assert message["conversation"] == start["conversation"]  # the default policy: stable
        reply_id = await relay.reply("acme", message["conversation"], "message", {"text": "hi"})
        [delivered] = await relay.received(phone, 1)
        assert delivered["id"] == reply_id

    async def test_business_close(self, relay: Relay) -> None:
        """A business close reaches every device, and the business cannot write again."""
        await relay.add_business("acme")
        phone = await relay.add_device(USER, "phone")
        laptop = await relay.add_device(USER, "laptop")
        await relay.start()
        await relay.send(phone, "acme", "start")
        [start] = await relay.events("acme", 1)
        await relay.received(laptop, 1)
        await relay.reply("acme", start["conversation"], "close")
        for device in (phone, laptop):
            [closed] = await relay.received(device, 1)
            assert closed["type"] == "close"
        await relay.reply("acme", start["conversation"], "message", {"text": "one more"})
        [error] = await relay.events("acme", 1)
        assert error["code"] == "conversation_closed"
        await relay.send(laptop, "acme", "message", {"text": "I'm back"})
        [event] = await relay.events("acme", 1)
        assert event["type"] == "message"
        await relay.reply("acme", start["conversation"], "message", {"text": "welcome back"})
        echo, back = await relay.received(phone, 2)
        assert echo["type"] == "echo"
        assert back["body"] == {"text": "welcome back"}

    async def test_order_per_device(self, relay: Relay) -> None:
        """Messages from one device reach the business in the order sent."""
        await relay.add_business("acme")
        devices = [await relay.add_device(f"user-{i}", f"dev-{i}") for i in range(3)]
        await relay.start("inbound")
        for n in range(40):
            for device in devices:
                await relay.send(device, "acme", "message", {"text": f"{device.device}:{n}"})
        events = await relay.events("acme", 120)
        for device in devices:
            texts = [e["body"]["text"] for e in events
                     if e["body"]["text"].startswith(device.device + ":")]
            assert texts == [f"{device.device}:{n}" for n in range(40)]


class TestPrivacy:
    async def test_opaque_ids_per_user_and_business(self, relay: Relay) -> None:
        """Each (user, business) pair gets its own id, and no business sees a user or device id."""
        for business in ("acme", "globex"):
            await relay.add_business(business, amqp_user=f"{business}-user")
        alice = await relay.add_device(USER, "alice-phone")
        bob = await relay.add_device(OTHER_USER, "bob-phone")
        await relay.start("inbound")
        for device in (alice, bob):
            for business in ("acme", "globex"):
                await relay.send(device, business, "start", {"text": "hello"})
        seen = {}
        for business in ("acme", "globex"):
            for message in await relay.take(relay.inbox(business), 2):
                assert message.message_id is not None
                for secret in (USER, OTHER_USER, "alice-phone", "bob-phone"):
                    assert secret.encode() not in message.body
                    assert secret not in str(message.headers)
                seen[(business, message.body)] = message
        conversations = {m.body.split(b'"conversation":"')[1][:32] for m in seen.values()}
        assert len(conversations) == 4
