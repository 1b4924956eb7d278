"""Contract 1.1 end to end on a real RabbitMQ: interactive messages from the business,
the user's answers and reactions both ways, each reaching every device of the user, and
none of it telling the business who the user is."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from relayd.client import (
    DeviceKeys,
    Item,
    ListPicker,
    Option,
    QuickReply,
    Reaction,
    Response,
    RichLink,
    Section,
    Slot,
    TimePicker,
    parse_body,
    parse_event,
)
from tests.integration.harness import WAIT, Relay, amqp_url

USER = "alice.rich@example.org"
PHONE, LAPTOP = "alice-phone-7f3a", "alice-laptop-c21e"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "business_echo.py"
EVENT_FIELDS = {"v", "type", "conversation", "id", "ts", "body"}
THUMBNAIL = {"data": "/9j/4AAQSkZJRg==", "mime": "image/jpeg"}
PHOTO = {"url": "https://cdn.acme.example/i/tea", "key": "k2V5", "sha256": "ab" * 32,
         "size": 2048, "mime": "image/jpeg"}

INTERACTIVE = {
    "quick_reply": QuickReply("Was this helpful?", (Option("yes", "Yes"), Option("no", "No"))),
    "list_picker": ListPicker("What would you like?", "Menu", (
        Section((Item("tea", "Tea", "Earl Grey", PHOTO), Item("cake", "Cake")), "Today"),
        Section((Item("soup", "Soup"),))), multiple=True),
    "time_picker": TimePicker("When shall we call?", "A call back", "Europe/Paris", (
        Slot("mon-9", 1_795_000_000_000, 1800), Slot("mon-930", 1_795_001_800_000, 1800))),
    "rich_link": RichLink("Your order", "https://acme.example/o/1234", "Order 1234", THUMBNAIL),
}
CHOICE = {"quick_reply": ("yes",), "list_picker": ("tea", "soup"), "time_picker": ("mon-930",)}


async def open_conversation(relay: Relay) -> tuple[DeviceKeys, DeviceKeys, str]:
    """The user's two devices, a conversation the phone opened with acme, and its id; a
    second business, `other`, the user never wrote to."""
    await relay.add_business("acme")
    await relay.add_business("other", amqp_user="other-user")
    phone = await relay.add_device(USER, PHONE)
    laptop = await relay.add_device(USER, LAPTOP)
    await relay.start()
    await relay.send(phone, "acme", "start", {"text": "Hello"})
    [start] = await relay.events("acme", 1)
    await relay.received(laptop, 1)  # the start's echo
    return phone, laptop, start["conversation"]


async def business_gets(relay: Relay, count: int) -> list[dict[str, Any]]:
    """The next events in acme's inbox, after checking that nothing in them, their AMQP
    properties or headers names the user or a device."""
    messages = await relay.take(relay.inbox("acme"), count)
    for message in messages:
        exposed = message.body + orjson.dumps(message.headers) + repr(message.info()).encode()
        for secret in (USER, PHONE, LAPTOP):
            assert secret.encode() not in exposed
        event = parse_event(message.body)
        assert set(event) == EVENT_FIELDS  # no `user`: acme is not first-party
    return [parse_event(m.body) for m in messages]


class TestInteractive:
    @pytest.mark.parametrize("kind", sorted(INTERACTIVE))
    async def test_each_type_reaches_both_devices_and_is_answered(
            self, relay: Relay, kind: str) -> None:
        """The business sends an interactive message; both devices open it and read the
        same object; the phone answers; the business gets the answer naming the message
        and the ids chosen; the laptop gets the answer as an echo."""
        phone, laptop, conversation = await open_conversation(relay)
        sent = INTERACTIVE[kind]
        message_id = await relay.reply("acme", conversation, "message", sent.body())
        for device in (phone, laptop):
            [got] = await relay.received(device, 1)
            assert (got["type"], got["id"], got["from"]) == ("message", message_id, "acme")
            assert parse_body("message", got["body"], sender="business") == sent

        if kind == "rich_link":  # nothing to choose: the user answers in words
            answer_kind = "message"
            answer = {"text": "Thanks, got it", "reply_to": message_id}
        else:
            answer_kind = "response"
            answer = Response(message_id, CHOICE[kind]).body()
        answer_id = await relay.send(phone, "acme", answer_kind, answer)

        [event] = await business_gets(relay, 1)
        assert (event["type"], event["id"], event["conversation"]) == (
            answer_kind, answer_id, conversation)
        assert event["body"] == answer
        if answer_kind == "response":
            parsed = parse_body("response", event["body"], sender="user")
            assert parsed == Response(message_id, CHOICE[kind])
        [echo] = await relay.received(laptop, 1)
        assert (echo["type"], echo["id"], echo["from"]) == ("echo", answer_id, "acme")
        assert echo["body"] == {"type": answer_kind, "body": answer}
        await relay.assert_empty(relay.device_queue(phone), relay.device_queue(laptop),
                                 relay.inbox("acme"))

    async def test_a_bad_interactive_reply_reaches_no_device(self, relay: Relay) -> None:
        """An interactive message over a limit is answered with `invalid` and delivered to
        nobody; a device's own list picker is dead-lettered as malformed, and only that
        device is told (contract 1.4)."""
        phone, laptop, conversation = await open_conversation(relay)
        too_many = {"text": "Pick", "quick_reply": {"options": [
            {"id": f"o{i}", "title": "x"} for i in range(relay.settings.limits
                                                       .max_quick_replies + 1)]}}
        bad_id = await relay.reply("acme", conversation, "message", too_many)
        [error] = await relay.events("acme", 1)
        assert (error["type"], error["ref"], error["code"]) == ("error", bad_id, "invalid")
        up_id = await relay.send(phone, "acme", "message", INTERACTIVE["list_picker"].body())
        [dead] = await relay.dead(1)
        assert dead.headers["x-relayd-reason"] == "malformed"
        [told] = await relay.received(phone, 1)
        assert (told["type"], told["body"]) == ("error", {"ref": up_id, "code": "malformed"})
        await relay.assert_empty(relay.device_queue(phone), relay.device_queue(laptop),
                                 relay.inbox("acme"))


class TestReactions:
    async def test_both_ways_and_their_removal(self, relay: Relay) -> None:
        """The user's reaction and its removal reach the business and, as echoes, the other
        device; the business's reaction and its removal reach every device."""
        phone, laptop, conversation = await open_conversation(relay)
        reply_id = await relay.reply("acme", conversation, "message", {"text": "Shipped!"})
        for device in (phone, laptop):
            await relay.received(device, 1)

        for reaction in (Reaction(reply_id, "🎉"), Reaction(reply_id, "🎉", remove=True)):
            up_id = await relay.send(laptop, "acme", "reaction", reaction.body())
            [event] = await business_gets(relay, 1)
            assert (event["type"], event["id"]) == ("reaction", up_id)
            assert parse_body("reaction", event["body"], sender="user") == reaction
            [echo] = await relay.received(phone, 1)
            assert (echo["type"], echo["id"]) == ("echo", up_id)
            assert echo["body"] == {"type": "reaction", "body": reaction.body()}

        thanks_id = await relay.send(phone, "acme", "message", {"text": "Thank you"})
        await business_gets(relay, 1)
        await relay.received(laptop, 1)
        for reaction in (Reaction(thanks_id, "❤️"), Reaction(thanks_id, "❤️", remove=True)):
            down_id = await relay.reply("acme", conversation, "reaction", reaction.body())
            for device in (phone, laptop):
                [got] = await relay.received(device, 1)
                assert (got["type"], got["id"], got["from"]) == ("reaction", down_id, "acme")
                assert parse_body("reaction", got["body"], sender="business") == reaction
        await relay.assert_empty(relay.device_queue(phone), relay.device_queue(laptop),
                                 relay.inbox("acme"))


class TestAnswersRelaydCannotCheck:
    async def test_an_answer_to_a_message_never_sent_is_forwarded(self, relay: Relay) -> None:
        """relayd keeps no record of what a business sent: a response naming an unknown
        message id reaches the business, which is the one to ignore it."""
        phone, laptop, conversation = await open_conversation(relay)
        never_sent = str(uuid.uuid4())
        await relay.send(phone, "acme", "response", Response(never_sent, ("x",)).body())
        [event] = await business_gets(relay, 1)
        assert event["body"] == {"message_id": never_sent, "selected": ["x"]}
        assert event["conversation"] == conversation
        await relay.received(laptop, 1)

    async def test_answers_need_an_open_conversation(self, relay: Relay) -> None:
        """A response or a reaction does not open nor reopen a conversation: after the user
        deleted it, or at a business never written to, they are dead-lettered."""
        phone, laptop, _ = await open_conversation(relay)
        message_id = str(uuid.uuid4())
        await relay.send(phone, "other", "reaction", Reaction(message_id, "👍").body())
        await relay.send(phone, "acme", "close")
        await business_gets(relay, 1)
        await relay.received(laptop, 1)
        await relay.send(laptop, "acme", "response", Response(message_id, ("a",)).body())
        await relay.send(laptop, "acme", "reaction", Reaction(message_id, "👍").body())
        dead = await relay.dead(3)
        assert sorted(str(m.headers["x-relayd-reason"]) for m in dead) == [
            "conversation_closed", "conversation_closed", "unknown_conversation"]
        told = [await relay.received(phone, 1), await relay.received(laptop, 2)]
        assert [sorted(m["body"]["code"] for m in t) for t in told] == [
            ["unknown_conversation"], ["conversation_closed", "conversation_closed"]]
        await relay.assert_empty(relay.device_queue(phone), relay.device_queue(laptop),
                                 relay.inbox("acme"), relay.inbox("other"))


class TestExampleBusiness:
    async def test_menu_is_a_list_picker_and_the_choice_is_echoed(self, relay: Relay) -> None:
        """examples/business_echo.py answers "menu" with a list picker, the response with
        the titles chosen, a response to a menu it never sent with "expired", and other
        text with an echo, as before."""
        phone, laptop, _ = await open_conversation(relay)
        example = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--business", "acme", "--inbox", relay.inbox("acme"),
            "--url", amqp_url("guest", "guest", relay.vhost), stdout=asyncio.subprocess.PIPE)
        try:
            assert example.stdout is not None
            await asyncio.wait_for(example.stdout.readline(), WAIT)  # consuming
            await relay.send(phone, "acme", "message", {"text": "Menu"})
            [menu] = await relay.received(phone, 1)
            picker = parse_body("message", menu["body"], sender="business")
            assert isinstance(picker, ListPicker)
            first, second = [item for s in picker.sections for item in s.items][:2]
            await relay.send(phone, "acme", "response",
                             Response(menu["id"], (first.id, second.id)).body())
            [answer] = await relay.received(phone, 1)
            assert answer["body"] == {"text": f"you chose: {first.title}, {second.title}",
                                      "reply_to": menu["id"]}
            await relay.send(phone, "acme", "response",
                             Response(str(uuid.uuid4()), (first.id,)).body())
            [expired] = await relay.received(phone, 1)
            assert expired["body"] == {"text": "That menu has expired: write menu."}
            await relay.send(phone, "acme", "message", {"text": "ping"})
            [echo] = await relay.received(phone, 1)
            assert echo["body"] == {"text": "echo: ping"}
            laptop_got = await relay.received(laptop, 8)
            assert [m["type"] for m in laptop_got] == ["echo", "message"] * 4
            await relay.assert_empty(relay.device_queue(phone), relay.device_queue(laptop))
        finally:
            if example.returncode is None:
                example.terminate()
            assert await asyncio.wait_for(example.wait(), WAIT) == 0


    async def test_every_picker_reactions_and_the_desk(self, relay: Relay) -> None:
        """With --desk, examples/business_echo.py marks each message read and types before
        it answers; "quick", "time" and "link" get a quick reply, a time picker and a rich
        link that relayd takes, each answer is echoed with its titles, and a reaction is
        put on (and taken off) the same message."""
        phone, _, _ = await open_conversation(relay)
        example = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--business", "acme", "--inbox", relay.inbox("acme"),
            "--desk", "--url", amqp_url("guest", "guest", relay.vhost),
            stdout=asyncio.subprocess.PIPE)
        try:
            assert example.stdout is not None
            await asyncio.wait_for(example.stdout.readline(), WAIT)  # consuming
            kinds = {}
            for word in ("quick", "time", "link"):
                await relay.send(phone, "acme", "message", {"text": word})
                read, typing, message = await relay.received(phone, 3)
                assert (read["type"], typing["type"], message["type"]) == (
                    "read", "typing_start", "message")
                kinds[word] = parse_body("message", message["body"], sender="business")
                if not isinstance(kinds[word], RichLink):
                    first = next(iter(_choices(kinds[word])))
                    await relay.send(phone, "acme", "response",
                                     Response(message["id"], (first,)).body())
                    [answer] = await relay.received(phone, 1)
                    assert answer["body"]["reply_to"] == message["id"]
                    assert answer["body"]["text"] == "you chose: " + _choices(kinds[word])[first]
            assert [type(k) for k in kinds.values()] == [QuickReply, TimePicker, RichLink]
            link = kinds["link"]
            assert isinstance(link, RichLink)
            assert link.image is not None
            assert "data" in link.image  # inline: an app shows it without a fetch
            target = str(uuid.uuid4())
            for remove in (False, True):
                sent = Reaction(target, "👍", remove).body()
                await relay.send(phone, "acme", "reaction", sent)
                [echoed] = await relay.received(phone, 1)
                assert (echoed["type"], echoed["body"]) == ("reaction", sent)
        finally:
            if example.returncode is None:
                example.terminate()
            assert await asyncio.wait_for(example.wait(), WAIT) == 0


def _choices(picker: Any) -> dict[str, str]:
    """What a quick reply or time picker offers, with the titles business_echo answers."""
    if isinstance(picker, QuickReply):
        return {o.id: o.title for o in picker.options}
    assert isinstance(picker, TimePicker)
    return {s.id: time.strftime("%H:%M UTC", time.gmtime(s.start // 1000)) for s in picker.slots}
