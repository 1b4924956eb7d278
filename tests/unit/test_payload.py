"""Payload validation and building (relayd.payload)."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson
import pytest

from relayd import payload
from relayd.config import Limits
from relayd.errors import EnvelopeError, ReplyError
from tests.unit.helpers import up_claims

LIMITS = Limits()
SMALL = Limits(max_text_chars=10, max_inline_attachment_bytes=30, max_attachments=2,
               max_envelope_bytes=400)
REFERENCE = {"url": "https://files.example/a/1", "key": "k2V5", "sha256": "ab" * 32,
             "size": 12_345, "mime": "image/png"}
CONVERSATION = "abcdefghijklmnopqrstuvwxyz234567"
NOW_MS = 1_790_000_000_000


def _inline(size: int, **extra: str) -> dict[str, Any]:
    return {"data": base64.b64encode(b"\x5a" * size).decode(), "mime": "image/jpeg", **extra}


REPLY_ID = "4d2c1b0a-9e8f-4a7b-8c6d-5e4f3a2b1c0d"  # fixed: the parameters name tests


def _reply(**overrides: Any) -> bytes:
    data: dict[str, Any] = {"v": 1, "type": "message", "conversation": CONVERSATION,
                            "id": REPLY_ID, "body": {"text": "hello"}}
    data.update(overrides)
    return orjson.dumps(data)


def _malformed(claims: dict[str, Any], limits: Limits = LIMITS) -> str:
    with pytest.raises(EnvelopeError) as caught:
        payload.validate_up(claims, limits)
    assert caught.value.reason == "malformed"
    return caught.value.detail


class TestValidateUp:
    @pytest.mark.parametrize(("kind", "body"), [
        ("start", {}),
        ("start", {"intent": "support", "group": "billing", "text": "hi"}),
        ("start", {"text": "x" * 10}),
        ("message", {"text": "hello"}),
        ("message", {"attachments": [REFERENCE]}),
        ("message", {"text": "see", "attachments": [_inline(30), _inline(1, name="a.jpg")]}),
        ("typing_start", {}),
        ("typing_end", {}),
        ("read", {}),
        ("close", {}),
    ])
    def test_accepts_every_type_with_valid_body(self, kind: str, body: dict[str, Any]) -> None:
        """Each up type with a valid body passes, and the result carries its fields."""
        claims = up_claims(type=kind, body=body)
        up = payload.validate_up(claims, SMALL)
        assert (up.device, up.seq, up.ts, up.id, up.to, up.type, up.body) == (
            claims["device"], claims["seq"], claims["ts"], claims["id"], claims["to"], kind,
            body)

    def test_reference_attachment_passed_through_untouched(self) -> None:
        """A reference attachment comes out exactly as it went in."""
        body = {"attachments": [dict(REFERENCE)]}
        assert payload.validate_up(up_claims(body=body), LIMITS).body["attachments"][0] == (
            REFERENCE)

    def test_types_cover_the_contract(self) -> None:
        """The up types are exactly the eight the contract lists; replies have six."""
        assert {"start", "message", "typing_start", "typing_end", "read", "close", "response",
                "reaction"} == payload.UP_TYPES
        assert payload.UP_TYPES - {"start", "response"} == payload.REPLY_TYPES

    @pytest.mark.parametrize("field", sorted(["v", "device", "seq", "ts", "id", "to", "type",
                                              "body"]))
    def test_missing_field_rejected(self, field: str) -> None:
        """Leaving out any one field is malformed."""
        claims = up_claims()
        del claims[field]
        _malformed(claims)

    def test_extra_field_rejected(self) -> None:
        """An unknown top-level field is malformed."""
        _malformed(up_claims(extra=1))

    def test_from_field_rejected(self) -> None:
        """A down-only field (`from`) in an up payload is malformed."""
        _malformed(up_claims(**{"from": "acme"}))

    @pytest.mark.parametrize("overrides", [
        {"v": 2}, {"v": True}, {"v": 1.0}, {"v": "1"},
        {"seq": True}, {"seq": 0}, {"seq": -1}, {"seq": 1.0}, {"seq": "1"}, {"seq": 2**63},
        {"ts": 1.5}, {"ts": float(NOW_MS)}, {"ts": True}, {"ts": -1}, {"ts": "1"},
        {"id": "not-a-uuid"}, {"id": 5}, {"id": ""}, {"id": "6f1c2f5e-8d0b-4a0e-9d7e-0a8f4c2b1e3"},
        {"id": "6f1c2f5e-8d0b-4a0e-9d7e-0a8f4c2b1e3dx"},
        {"to": ""}, {"to": "-acme"}, {"to": "ac me"}, {"to": "acme!"}, {"to": "a" * 65},
        {"to": 5},
        {"type": "echo"}, {"type": "START"}, {"type": ""}, {"type": None},
        {"body": []}, {"body": None}, {"body": "text"},
    ], ids=repr)
    def test_wrong_field_types_rejected(self, overrides: dict[str, Any]) -> None:
        """Wrong types or values in any field are malformed (bool is not an int)."""
        _malformed(up_claims(**overrides))

    def test_longest_business_id_accepted(self) -> None:
        """A 64-character business id is still a business id."""
        assert payload.validate_up(up_claims(to="a" * 64), LIMITS).to == "a" * 64

    @pytest.mark.parametrize("kind", ["typing_start", "typing_end", "read", "close"])
    def test_non_empty_body_rejected_for_signal_types(self, kind: str) -> None:
        """typing, read and close carry an empty body and nothing else."""
        _malformed(up_claims(type=kind, body={"text": "x"}))

    @pytest.mark.parametrize("body", [
        {"text": "x" * 11},
        {"text": 5},
        {"intent": ""},
        {"intent": 3},
        {"group": "g" * 257},
        {"other": "x"},
    ], ids=repr)
    def test_bad_start_body_rejected(self, body: dict[str, Any]) -> None:
        """A start body holds only short intent/group strings and bounded text."""
        _malformed(up_claims(type="start", body=body), SMALL)

    def test_text_at_limit_accepted_and_one_over_rejected(self) -> None:
        """Text of exactly max_text_chars passes; one character more is malformed."""
        assert payload.validate_up(up_claims(body={"text": "é" * 10}), SMALL).body
        _malformed(up_claims(body={"text": "é" * 11}), SMALL)

    @pytest.mark.parametrize("body", [
        {},
        {"text": ["x"]},
        {"title": "x"},
        {"attachments": []},
        {"attachments": {}},
        {"attachments": [REFERENCE, REFERENCE, REFERENCE]},
    ], ids=repr)
    def test_bad_message_body_rejected(self, body: dict[str, Any]) -> None:
        """A message body holds text and/or 1..max_attachments attachments, nothing else."""
        _malformed(up_claims(body=body), SMALL)

    @pytest.mark.parametrize("attachment", [
        "https://files.example/a/1",
        {**REFERENCE, "size": -1},
        {**REFERENCE, "size": True},
        {**REFERENCE, "size": 1.0},
        {**REFERENCE, "url": ""},
        {**REFERENCE, "mime": 5},
        {**REFERENCE, "extra": "x"},
        {k: v for k, v in REFERENCE.items() if k != "sha256"},
        {**REFERENCE, "url": "u" * 2049},
        {"data": "AAAA"},
        {"mime": "image/png"},
        {"data": "AAAA", "mime": "image/png", "url": "https://x"},
        {"data": "AAAA", "mime": ""},
        {"data": "AAAA", "mime": "image/png", "name": ""},
        {"data": "AAAA", "mime": "image/png", "name": 7},
        {"data": 1234, "mime": "image/png"},
        {"data": "AAA", "mime": "image/png"},  # missing padding
        {"data": "AA==AA==", "mime": "image/png"},
        {"data": "-_-_", "mime": "image/png"},  # base64url, not standard base64
        {"data": "AA AA", "mime": "image/png"},
        {"data": "QUJD\n", "mime": "image/png"},
        _inline(31),
        {"data": "A" * 1000, "mime": "image/png"},  # over the size bound before decoding
    ], ids=repr)
    def test_bad_attachment_rejected(self, attachment: object) -> None:
        """Attachments are a reference object or standard base64 within the inline limit."""
        _malformed(up_claims(body={"attachments": [attachment]}), SMALL)

    def test_inline_at_default_limit_accepted(self) -> None:
        """Inline data of exactly max_inline_attachment_bytes passes; one byte more fails."""
        limit = LIMITS.max_inline_attachment_bytes
        assert payload.validate_up(up_claims(body={"attachments": [_inline(limit)]}), LIMITS)
        _malformed(up_claims(body={"attachments": [_inline(limit + 1)]}))

    def test_standard_base64_alphabet_accepted(self) -> None:
        """Inline data using '+' and '/' (the standard alphabet) passes."""
        data = base64.b64encode(b"\xfb\xff\xbf").decode()
        assert set(data) >= {"+", "/"}
        up = payload.validate_up(up_claims(body={"attachments": [{"data": data,
                                                                  "mime": "a/b"}]}), LIMITS)
        assert up.body["attachments"][0]["data"] == data

    @pytest.mark.parametrize("kind", [[], {}], ids=repr)
    def test_unhashable_type_rejected(self, kind: object) -> None:
        """A list or object as `type` is malformed, not a crash."""
        _malformed(up_claims(type=kind))

    @pytest.mark.parametrize(("kind", "body"), [("message", {"text": None}),
                                                ("message", {"attachments": None}),
                                                ("start", {"text": None})], ids=repr)
    def test_null_text_or_attachments_rejected(self, kind: str, body: dict[str, Any]) -> None:
        """null is not a string nor a list: a body with null text/attachments is malformed."""
        _malformed(up_claims(type=kind, body=body))

    def test_business_id_with_trailing_newline_rejected(self) -> None:
        """`to` of 'acme\\n' is not a business id."""
        _malformed(up_claims(to="acme\n"))

    @pytest.mark.parametrize("value", ["urn:" + "6f1c2f5e8d0b4a0e9d7e0a8f4c2b1e3d",
                                       "6f1c2f5e8d0b4a0e9d7e0a8f4c2b1e3d----",
                                       "6f1c2f5e8d0b-4a0e-9d7e-0a8f-4c2b1e3d"])
    def test_non_canonical_uuid_text_rejected(self, value: str) -> None:
        """Only the hyphenated 8-4-4-4-12 form is a UUID id."""
        assert len(value) == 36
        _malformed(up_claims(id=value))


class TestPeekDevice:
    def test_returns_claims_and_device(self) -> None:
        """A JSON object with a valid device id yields (claims, device)."""
        claims = up_claims(device="phone_1-A")
        assert payload.peek_device(orjson.dumps(claims)) == (claims, "phone_1-A")

    @pytest.mark.parametrize("raw", [
        b"", b"not json", b"\xff\xfe", b"[1, 2]", b'"device"', b"null", b"{}",
        b'{"device": 5}', b'{"device": ""}', b'{"device": "-x"}', b'{"device": "a b"}',
        b'{"device": null}', b'{"device": "' + b"d" * 129 + b'"}',
    ], ids=repr)
    def test_rejects_non_json_non_object_and_bad_device(self, raw: bytes) -> None:
        """Non-JSON, non-object or missing/invalid device is malformed."""
        with pytest.raises(EnvelopeError) as caught:
            payload.peek_device(raw)
        assert caught.value.reason == "malformed"

    def test_device_with_trailing_newline_rejected(self) -> None:
        """A device id of 'dev1\\n' is not a device id."""
        with pytest.raises(EnvelopeError):
            payload.peek_device(b'{"device": "dev1\\n"}')


class TestCheckFresh:
    def test_within_bounds_passes(self) -> None:
        """ts at now, at now + skew and at now - max_age is fresh."""
        skew = int(LIMITS.clock_skew_seconds * 1000)
        age = int(LIMITS.max_age_seconds * 1000)
        for ts in (NOW_MS, NOW_MS + skew, NOW_MS - age):
            assert payload.check_fresh(ts, NOW_MS, LIMITS) is None

    def test_too_far_ahead_is_stale(self) -> None:
        """ts one millisecond beyond the allowed skew is stale."""
        ahead = NOW_MS + int(LIMITS.clock_skew_seconds * 1000) + 1
        with pytest.raises(EnvelopeError) as caught:
            payload.check_fresh(ahead, NOW_MS, LIMITS)
        assert caught.value.reason == "stale"

    def test_too_old_is_stale(self) -> None:
        """ts one millisecond older than max_age_seconds is stale."""
        old = NOW_MS - int(LIMITS.max_age_seconds * 1000) - 1
        with pytest.raises(EnvelopeError) as caught:
            payload.check_fresh(old, NOW_MS, LIMITS)
        assert caught.value.reason == "stale"

    def test_zero_skew_rejects_any_future(self) -> None:
        """With clock_skew_seconds 0, a ts 1 ms ahead is stale."""
        with pytest.raises(EnvelopeError) as caught:
            payload.check_fresh(NOW_MS + 1, NOW_MS, Limits(clock_skew_seconds=0))
        assert caught.value.reason == "stale"


class TestParseReply:
    @pytest.mark.parametrize(("kind", "body"), [
        ("message", {"text": "hello"}), ("message", {"attachments": [REFERENCE]}),
        ("typing_start", {}), ("typing_end", {}), ("read", {}), ("close", {}),
    ])
    def test_accepts_valid_replies(self, kind: str, body: dict[str, Any]) -> None:
        """Each reply type with a valid body parses into a Reply."""
        reply_id = str(uuid.uuid4())
        reply = payload.parse_reply(_reply(type=kind, body=body, id=reply_id), LIMITS)
        assert reply == payload.Reply(kind, CONVERSATION, reply_id, body)

    @pytest.mark.parametrize("raw", [
        b"not json", b"[]", b"1",
        _reply(extra=1), orjson.dumps({"v": 1, "type": "read", "conversation": CONVERSATION,
                                       "id": REPLY_ID}),
        _reply(v=2), _reply(v=True), _reply(id="nope"), _reply(id=7),
        _reply(type="start"), _reply(type="echo"), _reply(type="error"),
        _reply(body=[]), _reply(body={}), _reply(type="read", body={"text": "x"}),
        _reply(body={"text": "x" * 10_001}),
    ], ids=repr)
    def test_invalid(self, raw: bytes) -> None:
        """Non-JSON, wrong shape, wrong types or a bad body give code invalid."""
        with pytest.raises(ReplyError) as caught:
            payload.parse_reply(raw, LIMITS)
        assert caught.value.reason == "invalid"

    def test_too_large(self) -> None:
        """A reply longer than max_envelope_bytes gives code too_large, before parsing."""
        raw = _reply(body={"text": "x" * 500})
        assert len(raw) > SMALL.max_envelope_bytes
        with pytest.raises(ReplyError) as caught:
            payload.parse_reply(raw, SMALL)
        assert caught.value.reason == "too_large"

    def test_at_size_limit_accepted(self) -> None:
        """A reply of exactly max_envelope_bytes is not too large."""
        prefix = _reply(body={"text": ""})
        raw = _reply(body={"text": "x" * (SMALL.max_envelope_bytes - len(prefix))})
        assert len(raw) == SMALL.max_envelope_bytes
        assert payload.parse_reply(raw, Limits(max_envelope_bytes=len(raw))).type == "message"

    @pytest.mark.parametrize("conversation", [
        "", "abc", CONVERSATION.upper(), CONVERSATION[:-1], CONVERSATION + "a",
        "abcdefghijklmnopqrstuvwxyz234561", 12,
    ], ids=repr)
    def test_unknown_conversation(self, conversation: object) -> None:
        """A conversation that is not an opaque id gives code unknown_conversation."""
        with pytest.raises(ReplyError) as caught:
            payload.parse_reply(_reply(conversation=conversation), LIMITS)
        assert caught.value.reason == "unknown_conversation"

    @pytest.mark.parametrize("kind", [[], {}], ids=repr)
    def test_unhashable_type_invalid(self, kind: object) -> None:
        """A list or object as `type` gives code invalid, not a crash."""
        with pytest.raises(ReplyError) as caught:
            payload.parse_reply(_reply(type=kind), LIMITS)
        assert caught.value.reason == "invalid"

    def test_conversation_with_trailing_newline_unknown(self) -> None:
        """A conversation id followed by a newline is not a conversation id."""
        with pytest.raises(ReplyError) as caught:
            payload.parse_reply(_reply(conversation=CONVERSATION + "\n"), LIMITS)
        assert caught.value.reason == "unknown_conversation"


class TestReplyRef:
    def test_best_effort_id_and_conversation(self) -> None:
        """reply_ref recovers id and conversation from an otherwise invalid reply."""
        assert payload.reply_ref(orjson.dumps({"id": "r-1", "conversation": "c-1", "v": 9})) == (
            "r-1", "c-1")

    @pytest.mark.parametrize("raw", [b"not json", b"[]",
                                     orjson.dumps({"id": 5, "conversation": "x" * 65})])
    def test_nothing_usable(self, raw: bytes) -> None:
        """Non-JSON, non-objects and non-string or long values give (None, None)."""
        assert payload.reply_ref(raw) == (None, None)


class TestBuilders:
    def test_business_event_omits_user_unless_first_party(self) -> None:
        """A business event has exactly the contract's fields; `user` only when given."""
        event = orjson.loads(payload.business_event("message", CONVERSATION, "e-1", NOW_MS,
                                                    {"text": "hi"}))
        assert event == {"v": 1, "type": "message", "conversation": CONVERSATION, "id": "e-1",
                         "ts": NOW_MS, "body": {"text": "hi"}}
        first_party = orjson.loads(payload.business_event("start", CONVERSATION, "e-2", NOW_MS,
                                                          {}, user="alice"))
        assert first_party["user"] == "alice"

    def test_error_event_fields(self) -> None:
        """An error event carries v, type error, ref, conversation, code and detail."""
        event = orjson.loads(payload.error_event("r-1", CONVERSATION, "too_large", "big"))
        assert event == {"v": 1, "type": "error", "ref": "r-1", "conversation": CONVERSATION,
                         "code": "too_large", "detail": "big"}

    def test_down_payload_fields(self) -> None:
        """A down payload has exactly v, device, seq, ts, id, from, type, body."""
        event = orjson.loads(payload.down_payload("d1", 3, NOW_MS, "m-1", "acme", "echo", {}))
        assert event == {"v": 1, "device": "d1", "seq": 3, "ts": NOW_MS, "id": "m-1",
                         "from": "acme", "type": "echo", "body": {}}
