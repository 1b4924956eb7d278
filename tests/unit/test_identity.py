"""The identity service's requests (relayd.identity): parsed, applied and answered without
a broker: fake deliveries, a recording sink and a SQLite store in the test's directory."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relayd.client import DeviceKeys
from relayd.crypto import Kem, b64e
from relayd.errors import PermanentError
from relayd.identity import (
    MAX_REQUEST_BYTES,
    Identity,
    Register,
    Revoke,
    answer,
    parse_enrolment,
)
from relayd.store import Device, Store, open_store
from tests.unit.fakes import FakeDelivery, RecordingSink
from tests.unit.helpers import FAST
from tests.unit.test_handlers import KEYRING, settings
from tests.unit.test_weak_keys import LIBSODIUM_ED25519_BLOCKLIST, LIBSODIUM_X25519_BLOCKLIST

PHONE = DeviceKeys.generate("alice-phone")
TO = "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAADtAAAAABrDY8v.zcicA0lbFTzSfuO6cWE8Tw=="


def register(keys: DeviceKeys = PHONE, user: str = "alice", **overrides: Any) -> dict[str, Any]:
    data = {"v": 1, "type": "register", "id": str(uuid.uuid4()), **keys.registration(user)}
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not ...}


def revoke(device: str = "alice-phone", user: str = "alice") -> dict[str, Any]:
    return {"v": 1, "type": "revoke", "id": str(uuid.uuid4()), "user": user, "device": device}


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(PermanentError) as caught:
        parse_enrolment(data)
    return caught.value.reason


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    backend = await open_store(f"sqlite:///{tmp_path}/relayd.db", secret=KEYRING.opaque_secret)
    yield backend
    await backend.close()


class Door:
    """An Identity handler over a store, and what it published."""

    def __init__(self, tmp_path: Path, store: Store) -> None:
        self.sink = RecordingSink()
        self.store = store
        self.identity = Identity(settings(tmp_path), store, lambda: KEYRING, self.sink)

    async def ask(self, data: dict[str, Any] | bytes, user_id: str | None = "identity",
                  reply_to: str | None = TO) -> tuple[str | None, dict[str, Any] | None]:
        """Handle one request; (the reason it was refused or None, its answer)."""
        body = data if isinstance(data, bytes) else orjson.dumps(data)
        before = len(self.sink.of("answer"))
        try:
            _, work = self.identity.prepare(FakeDelivery(
                body=body, user_id=user_id, reply_to=reply_to, correlation_id="c-1"))
            await work()
            reason = None
        except PermanentError as exc:
            reason = exc.reason
        answers = self.sink.of("answer")[before:]
        assert len(answers) <= 1
        for _, queue, correlation, _ in answers:
            assert (queue, correlation) == (TO, "c-1")
        return reason, orjson.loads(answers[0][3]) if answers else None


def accepted(outcome: str) -> dict[str, Any]:
    return {"v": 1, "type": "answer", "accepted": True, "outcome": outcome}


def refusal(reason: str) -> dict[str, Any]:
    return {"v": 1, "type": "answer", "accepted": False, "reason": reason}


class TestParse:
    @pytest.mark.parametrize("kem", list(Kem))
    def test_a_registration_carries_the_device_and_its_keys(self, kem: Kem) -> None:
        """A well-formed registration names the device, its user and its public keys."""
        keys = DeviceKeys.generate("alice-phone", kem)
        request = parse_enrolment(register(keys))
        assert isinstance(request, Register)
        assert request.device == Device("alice-phone", "alice", kem, keys.enc_public,
                                        keys.sign_public)

    def test_a_revocation_names_user_and_device(self) -> None:
        """A well-formed revocation names the user and the device."""
        request = revoke()
        assert parse_enrolment(request) == Revoke("alice", "alice-phone", request["id"])

    @pytest.mark.parametrize("raw", LIBSODIUM_X25519_BLOCKLIST[:5])
    def test_a_weak_encryption_key_is_refused(self, raw: bytes) -> None:
        """An X25519 key of low order (libsodium's blocklist) is `weak_key`."""
        assert refused(register(enc_key=b64e(raw))) == "weak_key"

    def test_a_weak_hybrid_key_is_refused(self) -> None:
        """An ML-KEM-768 key whose t is zero is `weak_key`."""
        keys = DeviceKeys.generate("alice-phone", Kem.MLKEM768_X25519)
        weak = bytes(1152) + keys.enc_public[1152:]
        assert refused(register(keys, enc_key=b64e(weak))) == "weak_key"

    @pytest.mark.parametrize("raw", LIBSODIUM_ED25519_BLOCKLIST[:5])
    def test_a_weak_signing_key_is_refused(self, raw: bytes) -> None:
        """An Ed25519 key of small order (libsodium's blocklist) is `weak_key`."""
        assert refused(register(sign_key=b64e(raw))) == "weak_key"

    @pytest.mark.parametrize("change", [
        {"v": 2}, {"v": True}, {"type": "enrol"}, {"type": []}, {"type": {}}, {"extra": 1},
        {"kem": ...}, {"kem": "X448"}, {"enc_key": "!!"}, {"enc_key": b64e(bytes(31))},
        {"sign_key": 7}, {"device": "a b"}, {"device": ""}, {"user": ""}, {"user": "a\x00"},
        {"user": "u" * 1025}, {"id": "x"}, {"id": str(uuid.uuid4()).upper()[:35] + "!"},
        {"enc_key": PHONE.registration("alice")["sign_key"] + "AA"},
    ])
    def test_anything_else_is_malformed(self, change: dict[str, Any]) -> None:
        """A field missing, added, of the wrong type or value: `malformed`."""
        assert refused(register(**change)) == "malformed"

    @FAST
    @given(st.dictionaries(st.sampled_from(sorted(register())), st.none() | st.booleans()
                           | st.integers() | st.text(max_size=60) | st.just("X25519")
                           | st.lists(st.none(), max_size=2) | st.just({})
                           | st.sampled_from(list(register().values())), max_size=9))
    @example({**register(), "type": "revoke"})
    def test_any_fields_give_a_request_or_a_typed_refusal(self, data: dict[str, Any]) -> None:
        """Whatever the fields hold: a request, or `malformed` / `weak_key`; no other error."""
        reason = None
        try:
            parse_enrolment(data)
        except PermanentError as exc:
            reason = exc.reason
        assert reason in {None, "malformed", "weak_key"}


class TestIdentity:
    async def test_register_then_again_then_other_keys(self, tmp_path: Path,
                                                       store: Store) -> None:
        """A registration declares the queue, then registers, and is answered
        `registered`; the same again `unchanged`; other keys for the device are refused
        `device_exists` (answered, then dead-lettered) and change nothing."""
        door = Door(tmp_path, store)
        assert await door.ask(register()) == (None, accepted("registered"))
        assert door.sink.sent[0] == ("declare", "alice-phone")
        assert await door.ask(register()) == (None, accepted("unchanged"))
        other = DeviceKeys.generate("alice-phone")
        assert await door.ask(register(other)) == ("device_exists", refusal("device_exists"))
        stored = await store.device("alice-phone")
        assert stored is not None
        assert stored.sign_key == PHONE.sign_public

    async def test_revoke(self, tmp_path: Path, store: Store) -> None:
        """A revocation by another user is refused `wrong_user`; by the owner it
        unregisters the device, then deletes its queue; again, `unchanged`."""
        door = Door(tmp_path, store)
        await door.ask(register())
        assert await door.ask(revoke(user="mallory")) == ("wrong_user", refusal("wrong_user"))
        assert await store.device("alice-phone") is not None
        assert await door.ask(revoke()) == (None, accepted("revoked"))
        assert await store.device("alice-phone") is None
        assert door.sink.sent[-2] == ("delete", "alice-phone")
        assert await door.ask(revoke()) == (None, accepted("unchanged"))

    async def test_erase_is_answered_too(self, tmp_path: Path, store: Store) -> None:
        """An erase request that asks for an answer gets `erased`."""
        door = Door(tmp_path, store)
        await door.ask(register())
        erase = {"v": 1, "type": "erase", "user": "alice", "id": str(uuid.uuid4())}
        assert await door.ask(erase) == (None, accepted("erased"))
        assert await store.devices_of("alice") == []

    async def test_without_reply_to_no_answer(self, tmp_path: Path, store: Store) -> None:
        """A request without reply_to is applied and not answered."""
        door = Door(tmp_path, store)
        assert await door.ask(register(), reply_to=None) == (None, None)
        assert await store.device("alice-phone") is not None

    @pytest.mark.parametrize("user_id", [None, "", "guest", "identity2"])
    async def test_anyone_else_is_refused_unanswered(self, tmp_path: Path, store: Store,
                                                     user_id: str | None) -> None:
        """A request whose user_id is not gdpr.identity_user is `unauthenticated`, and not
        answered: relayd answers the identity service only."""
        door = Door(tmp_path, store)
        assert await door.ask(register(), user_id=user_id) == ("unauthenticated", None)
        assert door.sink.sent == []

    @pytest.mark.parametrize("reply_to", ["", "relayd.inbound", "relayd.biz.acme.inbox",
                                          "amq.rabbitmq.reply-to", "amq.rabbitmq.reply-to."])
    async def test_answers_go_to_direct_reply_to_only(self, tmp_path: Path, store: Store,
                                                      reply_to: str) -> None:
        """A reply_to that is not a direct reply-to name is `bad_reply_to`: relayd never
        publishes where a requester points it (a queue of the relay's, a business's)."""
        door = Door(tmp_path, store)
        assert await door.ask(register(), reply_to=reply_to) == ("bad_reply_to", None)
        assert door.sink.sent == []
        assert await store.device("alice-phone") is None

    async def test_oversized_and_not_json(self, tmp_path: Path, store: Store) -> None:
        """A body over MAX_REQUEST_BYTES is `too_large` before it is read; one that is not
        a JSON object is `malformed`; both answered."""
        door = Door(tmp_path, store)
        big = orjson.dumps(register(user="u" * MAX_REQUEST_BYTES))
        assert await door.ask(big) == ("too_large", refusal("too_large"))
        for body in (b"\xff", b"[]", b'{"type":"register","type":"revoke"}'):
            assert await door.ask(body) == ("malformed", refusal("malformed"))
        assert [s[0] for s in door.sink.sent] == ["answer"] * 4

    async def test_one_lane_per_user(self, tmp_path: Path, store: Store) -> None:
        """Every request of one user runs in that user's lane, erasure included."""
        door = Door(tmp_path, store)
        for data in (register(), revoke(),
                     {"v": 1, "type": "erase", "user": "alice", "id": str(uuid.uuid4())}):
            lane, _ = door.identity.prepare(FakeDelivery(body=orjson.dumps(data),
                                                         user_id="identity"))
            assert lane == "u:alice"


PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def documented() -> list[dict[str, Any]]:
    """The JSON lines of docs/protocol.md's section on the identity service's requests."""
    text = PROTOCOL.read_text()
    start = text.index("### Requests from the identity service")
    section = text[start:text.index("\n## ", start)]
    return [orjson.loads(line) for block in re.findall(r"```json\n(.*?)```", section, re.DOTALL)
            for line in block.splitlines() if line.startswith("{")]


class TestTheContract:
    def test_every_example_is_what_relayd_reads_or_writes(self, tmp_path: Path) -> None:
        """Each request shown parses, from the identity service, as its type; each
        answer shown is one relayd writes."""
        identity = Identity(settings(tmp_path), None, lambda: KEYRING, None)  # type: ignore[arg-type]
        examples = documented()
        requests = [e for e in examples if e["type"] != "answer"]
        assert sorted(e["type"] for e in requests) == ["erase", "register", "revoke"]
        for shown in requests:
            parsed = identity.parse(orjson.dumps(shown), "identity")
            assert type(parsed).__name__ == {"register": "Register", "revoke": "Revoke",
                                             "erase": "EraseRequest"}[shown["type"]]
        answers = [e for e in examples if e["type"] == "answer"]
        assert answers == [orjson.loads(answer(True, "registered")),
                           orjson.loads(answer(False, "weak_key"))]
