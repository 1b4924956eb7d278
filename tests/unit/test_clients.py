"""The client helpers a device app or a business imports (relayd.client)."""

from __future__ import annotations

import copy
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd import bodies, envelope, keys, payload
from relayd.client import (
    DeviceKeys,
    Item,
    ListPicker,
    Option,
    QuickReply,
    Reaction,
    RelayPublic,
    Response,
    RichLink,
    Section,
    Slot,
    TimePicker,
    parse_body,
    parse_event,
    reply,
)
from relayd.config import Limits
from relayd.crypto import Kem, b64d
from tests.unit import strategies as s
from tests.unit.helpers import FAST


class TestRelayPublic:
    @pytest.mark.parametrize("kem", list(Kem))
    def test_from_keys_show_output(self, tmp_path: Path, kem: Kem) -> None:
        """RelayPublic.from_json reads `keys show` output into raw keys, as str or bytes."""
        keys.generate(tmp_path, "k1", kem)
        ring = keys.load(tmp_path, timedelta(days=1))
        info = ring.public_info()
        relay = RelayPublic.from_json(orjson.dumps(info))
        assert relay == RelayPublic.from_json(info) == RelayPublic.from_json(
            orjson.dumps(info).decode())
        assert (relay.kid, relay.kem) == ("k1", kem)
        assert relay.enc_public_key == ring.current.public_raw
        assert relay.sign_public_key == ring.signing.public_key().public_bytes_raw()

    def test_device_seal_opens_with_loaded_ring(self, tmp_path: Path) -> None:
        """A device sealing to `keys show` output reaches the key the relay loads from disk."""
        keys.generate(tmp_path, "k1", Kem.X25519)
        ring = keys.load(tmp_path, timedelta(days=1))
        device = DeviceKeys.generate("phone-1")
        plain = device.payload("acme", "start", {"intent": "support"})
        body = device.seal(RelayPublic.from_json(ring.public_info()), plain)
        key = ring.hpke["k1"]
        _, opened = envelope.open_sealed(body, direction="up", kid=key.kid, kem=key.kem,
                                         private=key.private)
        assert opened == plain


class TestDeviceKeys:
    def test_payload_counts_seq_from_one(self) -> None:
        """Successive payloads carry seq 1, 2, 3 unless a seq is given."""
        device = DeviceKeys.generate("phone-1")
        seqs = [orjson.loads(device.payload("acme", "read"))["seq"] for _ in range(3)]
        assert seqs == [1, 2, 3]
        assert orjson.loads(device.payload("acme", "read", seq=99))["seq"] == 99

    def test_payload_is_valid_up(self) -> None:
        """A payload built by the device client passes peek_device and validate_up."""
        device = DeviceKeys.generate("phone-1")
        claims, device_id = payload.peek_device(device.payload("acme", "message",
                                                               {"text": "hi"}))
        up = payload.validate_up(claims, Limits())
        assert device_id == "phone-1"
        assert (up.type, up.to, up.body) == ("message", "acme", {"text": "hi"})
        assert str(uuid.UUID(up.id)) == up.id

    def test_fixed_message_id_kept(self) -> None:
        """A message id given for a retry is used as is."""
        device = DeviceKeys.generate("phone-1")
        message_id = str(uuid.uuid4())
        assert orjson.loads(device.payload("acme", "read", message_id=message_id))["id"] == (
            message_id)

    @pytest.mark.parametrize(("kem", "enc_size"), [(Kem.X25519, 32),
                                                   (Kem.MLKEM768_X25519, 1216)])
    def test_registration(self, kem: Kem, enc_size: int) -> None:
        """registration() gives user, device, kem and base64url public keys of the right size."""
        device = DeviceKeys.generate("phone-1", kem)
        reg = device.registration("alice")
        assert set(reg) == {"user", "device", "kem", "enc_key", "sign_key"}
        assert (reg["user"], reg["device"], reg["kem"]) == ("alice", "phone-1", kem.value)
        assert len(b64d(reg["enc_key"])) == enc_size
        assert b64d(reg["sign_key"]) == device.sign_public


class TestBusinessClient:
    def test_reply_parses_at_relay(self) -> None:
        """A reply built by the business client passes parse_reply."""
        conversation = "a" * 32
        raw = reply(conversation, "message", {"text": "hello"})
        parsed = payload.parse_reply(raw, Limits())
        assert (parsed.type, parsed.conversation, parsed.body) == (
            "message", conversation, {"text": "hello"})

    def test_reply_keeps_given_id(self) -> None:
        """A reply id given for a retry is used as is."""
        reply_id = str(uuid.uuid4())
        assert orjson.loads(reply("a" * 32, "read", reply_id=reply_id))["id"] == reply_id

    def test_parse_event_reads_relay_events(self) -> None:
        """parse_event returns the relay's business events as dicts."""
        raw = payload.business_event("start", "a" * 32, "e-1", 1, {})
        assert parse_event(raw)["type"] == "start"
        assert parse_event(payload.error_event("r", None, "invalid", "x"))["code"] == "invalid"

    @pytest.mark.parametrize("raw", [b"[]", b'{"v": 2, "type": "start"}', b'{"v": 1}'])
    def test_parse_event_refuses_other_versions(self, raw: bytes) -> None:
        """Anything but a v1 object with a type is a ValueError."""
        with pytest.raises(ValueError, match="not a relayd v1 event"):
            parse_event(raw)


class TestRichClient:
    """relayd.client builds and parses every body of contract 1.1."""

    @FAST
    @given(st.one_of(s.from_business.map(lambda x: ("business", *x)),
                     s.from_user.map(lambda x: ("user", *x))))
    def test_parse_then_build_gives_the_body_back(
            self, sample: tuple[str, str, dict[str, Any]]) -> None:
        """Every valid body parses into its object, whose body() is the same body (a
        `multiple: false` left out, as it is the default) and is accepted by the relay."""
        sender, kind, body = sample
        parsed = parse_body(kind, body, sender=sender)
        if parsed is None:
            assert kind == "message"
            assert not body.keys() & set(bodies.INTERACTIVE)
            return
        built = parsed.body()
        expected = copy.deepcopy(body)
        if expected.get("list_picker", {}).get("multiple") is False:
            del expected["list_picker"]["multiple"]
        assert built == expected
        assert parse_body(kind, built, sender=sender) == parsed
        if sender == "business":
            assert payload.parse_reply(reply("a" * 32, kind, built), Limits()).body == built
        else:
            device = DeviceKeys.generate("phone-1")
            claims, _ = payload.peek_device(device.payload("acme", kind, built))
            assert payload.validate_up(claims, Limits()).body == built

    def test_builders_refuse_what_the_relay_refuses(self) -> None:
        """A body the relay would refuse is a ValueError when it is built."""
        with pytest.raises(ValueError, match="2 to 5"):
            QuickReply("Pick", (Option("a", "A"),)).body()
        with pytest.raises(ValueError, match="https"):
            RichLink("See", "javascript:alert(1)", "A").body()
        with pytest.raises(ValueError, match="emoji"):
            Reaction(str(uuid.uuid4()), "lol").body()
        with pytest.raises(ValueError, match="selected"):
            Response(str(uuid.uuid4()), ()).body()

    def test_builders_name_each_field(self) -> None:
        """Each builder writes the contract's keys, and reply_to when given."""
        message_id = str(uuid.uuid4())
        picker = ListPicker("What would you like?", "Menu", (
            Section((Item("tea", "Tea", "hot"), Item("cake", "Cake")), "Menu"),), multiple=True,
            reply_to=message_id)
        assert picker.body() == {"text": "What would you like?", "reply_to": message_id,
                                 "list_picker": {"title": "Menu", "multiple": True, "sections": [
                                     {"title": "Menu", "items": [
                                         {"id": "tea", "title": "Tea", "subtitle": "hot"},
                                         {"id": "cake", "title": "Cake"}]}]}}
        times = TimePicker("When?", "Visit", "Europe/Paris", (Slot("9", 1_795_000_000_000, 1800),))
        assert times.body()["time_picker"] == {"title": "Visit", "timezone": "Europe/Paris",
                                               "slots": [{"id": "9", "start": 1_795_000_000_000,
                                                          "duration": 1800}]}
        assert Reaction(message_id, "👍", remove=True).body() == {
            "message_id": message_id, "emoji": "👍", "remove": True}
        assert Response(message_id, ("tea", "cake")).body() == {
            "message_id": message_id, "selected": ["tea", "cake"]}

    def test_parse_refuses_and_ignores(self) -> None:
        """A body the relay would refuse is a ValueError; other types parse to None."""
        with pytest.raises(ValueError, match=r"text, attachments, reply_to$"):
            parse_body("message", {"text": "x", "quick_reply": {"options": []}}, sender="user")
        with pytest.raises(ValueError, match="options: 2 to 5"):
            parse_body("message", {"text": "x", "quick_reply": {"options": []}},
                       sender="business")
        assert parse_body("message", {"text": "hi"}, sender="business") is None
        assert parse_body("read", {}, sender="user") is None
