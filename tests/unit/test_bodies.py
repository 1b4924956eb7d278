"""The bodies of contract 1.1 (relayd.bodies), through both doors: a device's up payload
(refused as `malformed`) and a business's reply (refused as `invalid`)."""

from __future__ import annotations

import base64
import copy
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd import bodies, payload
from relayd.config import Limits
from relayd.errors import EnvelopeError, ReplyError
from tests.unit import strategies as s
from tests.unit.helpers import FAST, up_claims

LIMITS = Limits()
CONVERSATION = "abcdefghijklmnopqrstuvwxyz234567"
MESSAGE_ID = "0b8f7a9e-3c2d-4e5f-8a1b-2c3d4e5f6a7b"


def up(kind: str, body: Any, limits: Limits = LIMITS) -> payload.Up:
    return payload.validate_up(up_claims(type=kind, body=body), limits)


def reply(kind: str, body: Any, limits: Limits = LIMITS) -> payload.Reply:
    raw = orjson.dumps({"v": 1, "type": kind, "conversation": CONVERSATION,
                        "id": str(uuid.uuid4()), "body": body})
    return payload.parse_reply(raw, limits)


def malformed(kind: str, body: Any, limits: Limits = LIMITS) -> str:
    with pytest.raises(EnvelopeError) as caught:
        up(kind, body, limits)
    assert caught.value.reason == "malformed"
    return caught.value.detail


def invalid(kind: str, body: Any, limits: Limits = LIMITS) -> str:
    with pytest.raises(ReplyError) as caught:
        reply(kind, body, limits)
    assert caught.value.reason == "invalid"
    return caught.value.detail


def refused_by_both(kind: str, body: Any, limits: Limits = LIMITS) -> None:
    """Refused from a device and from a business alike."""
    malformed(kind, body, limits)
    invalid(kind, body, limits)


def message(key: str, value: Any, **extra: Any) -> dict[str, Any]:
    return {"text": "Choose one", key: value, **extra}


def options(count: int, title_length: int = 5) -> dict[str, Any]:
    return {"options": [{"id": f"o{i}", "title": "t" * title_length} for i in range(count)]}


def picker(*section_sizes: int, **item: Any) -> dict[str, Any]:
    sections = [{"items": [{"id": f"s{n}i{i}", "title": "Item", **item} for i in range(size)]}
                for n, size in enumerate(section_sizes)]
    return {"title": "Menu", "sections": sections}


def slots(count: int, **slot: Any) -> dict[str, Any]:
    return {"title": "When?", "timezone": "Europe/Paris",
            "slots": [{"id": f"t{i}", "start": 1_795_000_000_000 + i * 1_800_000,
                       "duration": 1800, **slot} for i in range(count)]}


def thumbnail(size: int) -> dict[str, Any]:
    return {"data": base64.b64encode(b"\xff" * size).decode(), "mime": "image/jpeg"}


class TestValidPassUnchanged:
    @FAST
    @given(s.from_business)
    def test_business_bodies(self, sample: tuple[str, dict[str, Any]]) -> None:
        """Every valid business body is accepted and passed on exactly as sent."""
        kind, body = sample
        before = copy.deepcopy(body)
        assert reply(kind, body).body == before
        assert body == before

    @FAST
    @given(s.from_user)
    def test_user_bodies(self, sample: tuple[str, dict[str, Any]]) -> None:
        """Every valid device body is accepted and passed on exactly as sent."""
        kind, body = sample
        before = copy.deepcopy(body)
        assert up(kind, body).body == before
        assert body == before

    @pytest.mark.parametrize("emoji", s.EMOJI)
    def test_every_sample_emoji_is_an_emoji(self, emoji: str) -> None:
        """Flags, keycaps, skin tones, ZWJ families, tag flags and © are emoji."""
        assert bodies.is_emoji(emoji)


class TestUnknownKeysAndWrongTypes:
    @FAST
    @given(st.one_of(s.from_business.map(lambda x: ("business", *x)),
                     s.from_user.map(lambda x: ("user", *x))), st.data())
    def test_unknown_key_at_any_depth_refused(self, sample: tuple[str, str, dict[str, Any]],
                                              data: st.DataObject) -> None:
        """A key the contract does not name, added to any object of a body, is refused."""
        sender, kind, body = sample
        where = data.draw(st.sampled_from(s.dict_paths(body)))
        s.get(body, where)[data.draw(s.unknown_keys)] = data.draw(s.json_values)
        (invalid if sender == "business" else malformed)(kind, body)

    @FAST
    @given(st.one_of(s.from_business.map(lambda x: ("business", *x)),
                     s.from_user.map(lambda x: ("user", *x))), st.data())
    def test_wrong_type_at_any_depth_refused(self, sample: tuple[str, str, dict[str, Any]],
                                             data: st.DataObject) -> None:
        """Any value of a body replaced by a value of another JSON type is refused."""
        sender, kind, body = sample
        where = data.draw(st.sampled_from(list(s.paths(body))))
        s.get(body, where[:-1])[where[-1]] = data.draw(s.other_type(s.get(body, where)))
        (invalid if sender == "business" else malformed)(kind, body)

    @FAST
    @given(st.one_of(s.from_business.map(lambda x: ("business", *x)),
                     s.from_user.map(lambda x: ("user", *x))))
    def test_every_near_miss_at_every_depth_refused(
            self, sample: tuple[str, str, dict[str, Any]]) -> None:
        """Each value of a body, in turn, replaced by each near miss of another type (true
        for 1, "1" for 1, null for a string…) is refused."""
        sender, kind, body = sample
        refuse = invalid if sender == "business" else malformed
        for where in s.paths(body):
            for wrong in s.NEAR_MISSES[s.kind_of(s.get(body, where))]:
                changed = copy.deepcopy(body)
                s.get(changed, where[:-1])[where[-1]] = wrong
                refuse(kind, changed)

    @FAST
    @given(s.interactive_messages())
    def test_interactive_from_a_device_refused(self, body: dict[str, Any]) -> None:
        """Only a business sends interactive messages: from a device they are malformed."""
        malformed("message", body)

    @pytest.mark.parametrize("kind", ["response", "start"])
    def test_user_only_types_are_not_replies(self, kind: str) -> None:
        """A business cannot send a response (nor a start)."""
        invalid(kind, {"message_id": MESSAGE_ID, "selected": ["a"]})


class TestMessage:
    @pytest.mark.parametrize("body", [
        {"reply_to": MESSAGE_ID},  # reply_to alone: nothing to show
        {"text": "x", "reply_to": MESSAGE_ID.upper()},  # bodies pass untouched: lower case
        {"text": "x", "reply_to": "not-a-uuid"},
        {"text": "x", "reply_to": None},
    ], ids=repr)
    def test_bad_reply_to_refused(self, body: dict[str, Any]) -> None:
        """reply_to is a lower-case canonical UUID beside text or attachments."""
        refused_by_both("message", body)

    def test_interactive_needs_text_and_no_attachments(self) -> None:
        """An interactive message carries text, the fallback older apps show, and no
        attachments; two interactive keys in one message are refused."""
        assert reply("message", message("quick_reply", options(2)))
        invalid("message", {"quick_reply": options(2)})
        invalid("message", message("quick_reply", options(2), attachments=[s.REFERENCE]))
        invalid("message", message("quick_reply", options(2), rich_link={
            "url": "https://a.example", "title": "A"}))

    def test_text_limit_applies_to_interactive_text(self) -> None:
        """The text of an interactive message is bounded by max_text_chars."""
        small = Limits(max_text_chars=5)
        assert reply("message", {"text": "12345", "quick_reply": options(2)}, small)
        invalid("message", {"text": "123456", "quick_reply": options(2)}, small)


class TestQuickReply:
    def test_option_count_bounds(self) -> None:
        """2 to max_quick_replies options: 1 and max + 1 are refused."""
        assert reply("message", message("quick_reply", options(2)))
        assert reply("message", message("quick_reply", options(LIMITS.max_quick_replies)))
        invalid("message", message("quick_reply", options(1)))
        invalid("message", message("quick_reply", options(LIMITS.max_quick_replies + 1)))
        assert reply("message", message("quick_reply", options(3)), Limits(max_quick_replies=3))
        invalid("message", message("quick_reply", options(4)), Limits(max_quick_replies=3))

    def test_title_length(self) -> None:
        """An option's title is 1 to 64 characters."""
        assert reply("message", message("quick_reply", options(2, bodies.OPTION_TITLE)))
        invalid("message", message("quick_reply", options(2, bodies.OPTION_TITLE + 1)))
        invalid("message", message("quick_reply", options(2, 0)))

    @pytest.mark.parametrize("option_id", ["", " a", "a b", "-a", "a" * 65, "é", "a\n"],
                             ids=repr)
    def test_bad_ids(self, option_id: str) -> None:
        """Ids are 1 to 64 of letters, digits and _ . : / -, a letter or digit first."""
        body = message("quick_reply", {"options": [{"id": option_id, "title": "A"},
                                                   {"id": "b", "title": "B"}]})
        invalid("message", body)

    def test_duplicate_ids(self) -> None:
        """Two options with one id are refused: the answer would be ambiguous."""
        body = message("quick_reply", {"options": [{"id": "a", "title": "A"},
                                                   {"id": "a", "title": "B"}]})
        invalid("message", body)


class TestListPicker:
    def test_item_count_bounds(self) -> None:
        """At most max_list_items items over all sections, at least one per section."""
        most = LIMITS.max_list_items
        assert reply("message", message("list_picker", picker(most // 2, most - most // 2)))
        invalid("message", message("list_picker", picker(most // 2, most - most // 2 + 1)))
        invalid("message", message("list_picker", picker(most + 1)))
        invalid("message", message("list_picker", picker(3, 0)))

    def test_section_count_bounds(self) -> None:
        """1 to 10 sections."""
        assert reply("message", message("list_picker", picker(*[1] * bodies.MAX_SECTIONS)))
        invalid("message", message("list_picker", picker(*[1] * (bodies.MAX_SECTIONS + 1))))
        invalid("message", message("list_picker", picker()))

    def test_lengths(self) -> None:
        """Titles and subtitles are 1 to 256 characters."""
        assert reply("message", message("list_picker", picker(1, subtitle="s" * 256)))
        invalid("message", message("list_picker", picker(1, subtitle="s" * 257)))
        invalid("message", message("list_picker", picker(1, subtitle="")))
        long_title = {**picker(1), "title": "t" * 257}
        invalid("message", message("list_picker", long_title))

    def test_item_image_is_an_image_reference(self) -> None:
        """An item's image is a reference with an image/ mime; inline data is refused."""
        assert reply("message", message("list_picker", picker(1, image=s.REFERENCE)))
        invalid("message", message("list_picker", picker(
            1, image={**s.REFERENCE, "mime": "application/pdf"})))
        invalid("message", message("list_picker", picker(1, image=thumbnail(10))))

    def test_ids_unique_across_sections(self) -> None:
        """An item id names one item in the whole picker."""
        body = picker(1, 1)
        body["sections"][1]["items"][0]["id"] = body["sections"][0]["items"][0]["id"]
        invalid("message", message("list_picker", body))

    def test_multiple_is_a_boolean(self) -> None:
        """multiple is true or false; 1 is not a boolean."""
        assert reply("message", message("list_picker", {**picker(2), "multiple": False}))
        invalid("message", message("list_picker", {**picker(2), "multiple": 1}))


class TestTimePicker:
    def test_slot_count_bounds(self) -> None:
        """1 to max_time_slots slots."""
        assert reply("message", message("time_picker", slots(LIMITS.max_time_slots)))
        invalid("message", message("time_picker", slots(LIMITS.max_time_slots + 1)))
        invalid("message", message("time_picker", slots(0)))

    @pytest.mark.parametrize(("field", "good", "bad"), [
        ("duration", bodies.MAX_SLOT_SECONDS, bodies.MAX_SLOT_SECONDS + 1),
        ("duration", 1, 0),
        ("start", bodies.MAX_START_MS, bodies.MAX_START_MS + 1),
        ("start", 0, -1),
    ])
    def test_slot_ranges(self, field: str, good: int, bad: int) -> None:
        """start is unix ms, 0 to 2^53 - 1; duration is 1 to 86400 seconds."""
        assert reply("message", message("time_picker", slots(1, **{field: good})))
        invalid("message", message("time_picker", slots(1, **{field: bad})))

    @pytest.mark.parametrize("zone", ["", "Europe/", "/Paris", "Europe Paris", "a/b/c/d",
                                      "../etc/passwd", "Europe/Paris\n", "x" * 33])
    def test_bad_timezones(self, zone: str) -> None:
        """timezone has the form of an IANA name."""
        invalid("message", message("time_picker", {**slots(1), "timezone": zone}))


class TestRichLink:
    @pytest.mark.parametrize("url", ["http://a.example", "javascript:alert(1)",
                                     "HTTPS://a.example", "https://", "https://a b",
                                     "https://a.example/\u202e", "https://é.example",
                                     "https://a.example/\"onclick=\"x", "https://a/<script>",
                                     "https://a/{x}", "https://a/a\\b", "https://a/`x`",
                                     "https://" + "a" * 2041])
    def test_only_https_uri_characters(self, url: str) -> None:
        """A link is https:// and at most 2048 characters of those RFC 3986 allows: no
        quote, angle bracket, brace, backslash or backquote for a renderer to trip on."""
        invalid("message", message("rich_link", {"url": url, "title": "A"}))

    def test_longest_url(self) -> None:
        """A 2048-character https URL, and every character RFC 3986 allows, are accepted."""
        url = "https://" + "a" * 2040
        assert reply("message", message("rich_link", {"url": url, "title": "A"}))
        every = "https://u@a.example:443/p-._~!$&'()*+,;=:@%20/?q=[1]#f"
        assert reply("message", message("rich_link", {"url": every, "title": "A"}))

    def test_thumbnail_bound(self) -> None:
        """An inline thumbnail is at most max_thumbnail_bytes and an image."""
        most = LIMITS.max_thumbnail_bytes
        link = {"url": "https://a.example", "title": "A"}
        assert reply("message", message("rich_link", {**link, "image": thumbnail(most)}))
        invalid("message", message("rich_link", {**link, "image": thumbnail(most + 1)}))
        invalid("message", message("rich_link", {**link, "image": {
            **thumbnail(1), "mime": "text/html"}}))


class TestResponse:
    def test_selected_bounds(self) -> None:
        """1 to the largest choice count ids, each once."""
        most = max(LIMITS.max_list_items, LIMITS.max_time_slots, LIMITS.max_quick_replies)
        selected = [f"i{n}" for n in range(most + 1)]
        assert up("response", {"message_id": MESSAGE_ID, "selected": selected[:most]})
        malformed("response", {"message_id": MESSAGE_ID, "selected": selected})
        malformed("response", {"message_id": MESSAGE_ID, "selected": []})
        malformed("response", {"message_id": MESSAGE_ID, "selected": ["a", "a"]})

    @pytest.mark.parametrize("message_id", [MESSAGE_ID.upper(), "", 7, None, "x" * 36])
    def test_message_id(self, message_id: object) -> None:
        """message_id is a lower-case canonical UUID."""
        malformed("response", {"message_id": message_id, "selected": ["a"]})


class TestReaction:
    @pytest.mark.parametrize("emoji", [
        "", "a", "ok", "👍 ", " 👍", "1", "👍\u202e", "\u200d", "\ufe0f", "👍" * 17,
        "<b>", "\x00", "👍a",
    ], ids=repr)
    def test_what_is_not_an_emoji(self, emoji: str) -> None:
        """Letters, spaces, controls, bidi marks, lone joiners and 17 code points are not one
        emoji."""
        refused_by_both("reaction", {"message_id": MESSAGE_ID, "emoji": emoji})

    def test_sixteen_code_points_accepted(self) -> None:
        """The bound is 16 code points."""
        assert up("reaction", {"message_id": MESSAGE_ID, "emoji": "👍" * 16})

    def test_remove_is_true_or_absent(self) -> None:
        """remove: true takes the emoji off; false or anything else is refused."""
        body = {"message_id": MESSAGE_ID, "emoji": "👍"}
        assert up("reaction", {**body, "remove": True}).body["remove"] is True
        refused_by_both("reaction", {**body, "remove": False})
        refused_by_both("reaction", {**body, "remove": 1})

    def test_no_message_id(self) -> None:
        """A reaction names the message it is on."""
        refused_by_both("reaction", {"emoji": "👍"})
