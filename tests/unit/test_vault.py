"""The key vault's door (relayd.vault): parse() and VaultDoor without a broker, over a
SQLite vault file in the test's directory, fake deliveries and a recording sink."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from relayd import opaque, wire
from relayd.crypto import b64d, b64e
from relayd.errors import PermanentError
from relayd.store.pseudonym import seal, unseal
from relayd.store.sqlite import SqliteStore
from relayd.vault import _FIELDS as OPS
from relayd.vault import (
    CHUNK,
    MAX_REQUEST_BYTES,
    AmqpVault,
    VaultDoor,
    asker_allowed,
    parse,
    request,
)
from tests.unit.fakes import FakeDelivery, RecordingSink
from tests.unit.helpers import FAST

TO = "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAADtAAAAABrDY8v.zcicA0lbFTzSfuO6cWE8Tw=="
ALICE = opaque.pseudonym(b"s" * 32, "user", "alice@example.org")
BOB = opaque.pseudonym(b"s" * 32, "user", "bob@example.org")
KEY, SEALED = bytes(range(32)), b"\x01" * 40
VAULT_USER = "relayd-vault"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1)
    | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)
ops = st.sampled_from(["person", "seal", "import_person", "people", "forget_people",
                       "all_people", "add_person", ""])
near_requests = st.builds(
    lambda op, extra: orjson.dumps({"v": 1, "op": op, **extra}), ops,
    st.dictionaries(st.sampled_from(["user", "users", "key", "sealed", "seen_before_ms",
                                     "after", "limit", "x"]), json_values, max_size=6))
bodies = st.one_of(st.binary(max_size=300), near_requests,
                   st.builds(orjson.dumps, json_values))


class TestParse:
    @FAST
    @given(body=bodies)
    @example(body=b'{"v":1,"op":"people","users":[],"users":["x"]}')
    @example(body=request("import_person", user=ALICE, key=b64e(KEY[:31]),
                          sealed=b64e(SEALED)))
    @example(body=request("people", users=[ALICE.upper()]))
    @example(body=b'{"v":1,"op":"all_people","seen_before_ms":1e400,"after":"","limit":1}')
    @example(body=b'{"v":1,"op":"all_people","seen_before_ms":99999999999999999999999,'
                  b'"after":"","limit":1}')
    @example(body=request("all_people", seen_before_ms=True, after="", limit=1))
    @example(body=request("forget_people", users=[ALICE], seen_before_ms=True))
    @example(body=request("forget_people", users=[ALICE], seen_before_ms=-1))
    @example(body=request("people", users=[ALICE], seen_before_ms=1))
    def test_anything_parses_or_is_refused_with_a_reason(self, body: bytes) -> None:
        """Any body is a request of the vault or a PermanentError malformed/too_large,
        never another exception."""
        reason = None
        try:
            parse(body)
        except PermanentError as exc:
            reason = exc.reason
        assert reason in {None, "malformed", "too_large"}

    def test_each_operation_parses(self) -> None:
        """The operations, as AmqpVault sends them, parse to what they carry."""
        added = parse(request("import_person", user=ALICE, key=b64e(KEY), sealed=b64e(SEALED)))
        assert (added.users, added.key, added.sealed) == ((ALICE,), KEY, SEALED)
        assert parse(request("person", user=ALICE)).users == (ALICE,)
        assert parse(request("seal", user=ALICE, sealed=b64e(SEALED))).sealed == SEALED
        assert parse(request("people", users=[ALICE])).users == (ALICE,)
        assert parse(request("forget_people", users=[])).users == ()
        assert parse(request("forget_people", users=[ALICE])).seen_before_ms is None
        since = parse(request("forget_people", users=[ALICE], seen_before_ms=5))
        assert (since.users, since.seen_before_ms) == ((ALICE,), 5)
        page = parse(request("all_people", seen_before_ms=5, after=ALICE, limit=10))
        assert (page.seen_before_ms, page.after, page.limit) == (5, ALICE, 10)

    @pytest.mark.parametrize(("body", "reason"), [
        (b"x" * (MAX_REQUEST_BYTES + 1), "too_large"),
        (request("people", users=[ALICE] * (CHUNK + 1)), "malformed"),
        (request("people", users=["alice@example.org"]), "malformed"),  # an id, not a pseudonym
        (request("import_person", user=ALICE, key=b64e(KEY), sealed=b64e(b"")), "malformed"),
        (request("person", user=ALICE, key=b64e(KEY)), "malformed"),  # no key goes in
        (request("people", users=[ALICE], extra=1), "malformed"),
        (request("people", users=[ALICE], seen_before_ms=1), "malformed"),  # forget's only
        (request("forget_people", users=[ALICE], seen_before_ms="1"), "malformed"),
        (request("forget_people", users=[ALICE], seen_before_ms=2 ** 62 + 1), "malformed"),
        (b"[]", "malformed"),
    ])
    def test_refusals(self, body: bytes, reason: str) -> None:
        """Each kind of bad request is refused with its reason."""
        with pytest.raises(PermanentError) as refused:
            parse(body)
        assert refused.value.reason == reason


    @FAST
    @given(users=st.lists(st.sampled_from([ALICE, BOB]), max_size=3),
           since=st.none() | st.integers(0, 2 ** 62))
    def test_forget_people_carries_its_cutoff_or_none(
            self, users: list[str], since: int | None) -> None:
        """forget_people parses with its optional seen_before_ms as sent, and without it
        as an unconditional forget (a host older than the field asks so)."""
        fields: dict[str, Any] = {} if since is None else {"seen_before_ms": since}
        got = parse(request("forget_people", users=users, **fields))
        assert (got.op, got.users, got.seen_before_ms) == ("forget_people", tuple(users),
                                                           since)


@pytest.fixture
async def door(tmp_path: Path) -> AsyncIterator[tuple[VaultDoor, RecordingSink]]:
    keys = SqliteStore(tmp_path / "keys.db")
    sink = RecordingSink()
    yield VaultDoor(keys, sink, VAULT_USER), sink
    await keys.close()


async def ask(door: VaultDoor, sink: RecordingSink, body: bytes, reply_to: str | None = TO,
              headers: dict[str, Any] | None = None,
              user_id: str | None = VAULT_USER) -> tuple[FakeDelivery, Any]:
    delivery = FakeDelivery(body=body, reply_to=reply_to, correlation_id="c1", headers=headers,
                            user_id=user_id)
    before = len(sink.sent)
    await door.on_message(delivery)
    answers = sink.sent[before:]
    return delivery, (orjson.loads(answers[0][3]) if answers else None)


class TestDoor:
    async def test_keys_are_made_sealed_found_and_forgotten(
            self, door: tuple[VaultDoor, RecordingSink]) -> None:
        """`person` makes a key (and gives the same one again), `seal` sets the account
        id once, people finds them, forget_people destroys them; import_person keeps the
        key it is given; every request is answered and acked once."""
        d, sink = door
        delivery, got = await ask(d, sink, request("person", user=ALICE))
        assert delivery.settled == ["ack"]
        made, empty = got["result"]
        assert (len(b64d(made)), empty) == (32, "")
        assert (await ask(d, sink, request("person", user=ALICE)))[1]["result"] == [made, ""]
        sealed = b64e(SEALED)
        assert (await ask(d, sink, request("seal", user=ALICE, sealed=sealed)))[1][
            "result"] == [made, sealed]
        again = request("seal", user=ALICE, sealed=b64e(b"\x02" * 40))
        assert (await ask(d, sink, again))[1]["result"] == [made, sealed]  # once only
        assert (await ask(d, sink, request("all_people", seen_before_ms=2 ** 62, after="",
                                           limit=10)))[1]["result"] == [ALICE]
        assert (await ask(d, sink, request("forget_people", users=[ALICE])))[1]["result"] == 1
        assert (await ask(d, sink, request("people", users=[ALICE])))[1]["result"] == {}
        assert (await ask(d, sink, request("seal", user=ALICE, sealed=sealed)))[1][
            "result"] is None
        imported = request("import_person", user=ALICE, key=b64e(KEY), sealed=sealed)
        assert (await ask(d, sink, imported))[1]["result"] == [b64e(KEY), sealed]

    async def test_forget_people_with_a_cutoff_spares_who_was_seen_since(
            self, door: tuple[VaultDoor, RecordingSink]) -> None:
        """forget_people with seen_before_ms forgets only people last added before it
        (retention: one who registered meanwhile keeps the key); without it, every one."""
        d, sink = door
        await ask(d, sink, request("person", user=ALICE))
        await ask(d, sink, request("person", user=BOB))
        spared = request("forget_people", users=[ALICE, BOB], seen_before_ms=0)
        assert (await ask(d, sink, spared))[1]["result"] == 0
        both = request("people", users=[ALICE, BOB])
        assert set((await ask(d, sink, both))[1]["result"]) == {ALICE, BOB}
        gone = request("forget_people", users=[ALICE], seen_before_ms=2 ** 62)
        assert (await ask(d, sink, gone))[1]["result"] == 1
        assert (await ask(d, sink, request("forget_people", users=[BOB])))[1]["result"] == 1
        assert (await ask(d, sink, both))[1]["result"] == {}


class TestWhoMayAsk:
    @FAST
    @given(user_id=st.none() | st.text(max_size=20), vault_user=st.text(min_size=1, max_size=20))
    @example(user_id=None, vault_user=VAULT_USER)
    @example(user_id="", vault_user=VAULT_USER)
    @example(user_id=VAULT_USER.upper(), vault_user=VAULT_USER)
    @example(user_id=VAULT_USER + " ", vault_user=VAULT_USER)
    def test_only_the_vault_user_may_ask(self, user_id: str | None, vault_user: str) -> None:
        """A request is allowed exactly when its user_id is vault.user, character for
        character; none, or any other, is not."""
        assert asker_allowed(user_id, vault_user) == (user_id == vault_user)

    @settings(FAST, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(user_id=st.none() | st.sampled_from(["relayd", "edge", "", "relayd-vault2",
                                                "Relayd-Vault"]) | st.text(max_size=12),
           op=st.sampled_from([request("people", users=[ALICE]),
                               request("all_people", seen_before_ms=2 ** 62, after="",
                                       limit=10),
                               request("person", user=BOB),
                               request("import_person", user=BOB, key=b64e(KEY),
                                       sealed=b64e(SEALED))]))
    async def test_anyone_else_gets_no_key(
            self, door: tuple[VaultDoor, RecordingSink], user_id: str | None,
            op: bytes) -> None:
        """A request from another broker user (the edge's, relayd's) is acked and answered
        `not_allowed`, changes nothing and reveals nothing; the log line says why and
        names no one."""
        d, sink = door
        await d.keys.add_person(ALICE, KEY, SEALED)
        if user_id == VAULT_USER:
            user_id = None
        with capture_logs() as logs:
            delivery, got = await ask(d, sink, op, user_id=user_id)
        assert delivery.settled == ["ack"]
        assert got == {"v": 1, "ok": False, "reason": "not_allowed"}
        assert await d.keys.people([BOB]) == {}
        assert logs == [{"event": "vault_refused", "log_level": "info", "op": "",
                         "reason": "not_allowed"}]
        # the vault user itself is answered
        assert (await ask(d, sink, request("people", users=[ALICE])))[1]["result"] == {
            ALICE: [b64e(KEY), b64e(SEALED)]}


class Recorded(AmqpVault):
    """AmqpVault whose requests are recorded and answered by a door, without a broker."""

    def __init__(self, door: VaultDoor) -> None:
        self.door = door
        self.sent: list[dict[str, Any]] = []

    async def _ask(self, op: str, **fields: Any) -> Any:
        self.sent.append({"op": op, **fields})
        return await self.door.apply(parse(request(op, **fields)))


class TestClient:
    async def test_no_request_carries_a_key_but_an_import(
            self, door: tuple[VaultDoor, RecordingSink]) -> None:
        """add_person sends the pseudonym, then the account id sealed under the key the
        vault made: never a key (the host's own one only opens what it sealed); the key
        it returns opens the account id; import_person alone sends a key."""
        client = Recorded(door[0])
        own = bytes(range(32))
        key, sealed = await client.add_person(ALICE, own, seal(own, "user", ALICE, "alice"))
        assert key != own
        assert unseal(key, "user", ALICE, sealed) == "alice"
        assert [r["op"] for r in client.sent] == ["person", "seal"]
        assert not [r for r in client.sent if "key" in r or b64e(key) in repr(r)]
        assert await client.add_person(ALICE, own, seal(own, "user", ALICE, "alice")) == (
            key, sealed)  # it has one already: that one
        await client.import_person(BOB, own, seal(own, "user", BOB, "bob"))
        assert client.sent[-1]["key"] == b64e(own)

    async def test_forget_people_sends_a_cutoff_only_when_given(
            self, door: tuple[VaultDoor, RecordingSink]) -> None:
        """An unconditional forget (erasure) is the request a service older than the
        cutoff knows; retention's carries seen_before_ms."""
        client = Recorded(door[0])
        await client.forget_people([ALICE])
        await client.forget_people([ALICE], seen_before_ms=7)
        assert client.sent == [{"op": "forget_people", "users": [ALICE]},
                               {"op": "forget_people", "users": [ALICE],
                                "seen_before_ms": 7}]


    @settings(FAST, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(body=bodies, reply_to=st.sampled_from([TO, None, "relayd.inbound",
                                                  "amq.rabbitmq.reply-to."]),
           headers=st.none() | st.dictionaries(st.text(max_size=12), json_values, max_size=3)
           | st.just({wire.BAD_PROPERTIES: wire.Undecoded("reply_to")}),
           user_id=st.just(VAULT_USER) | st.none() | st.text(max_size=12))
    async def test_hostile_requests_are_refused_by_type(
            self, door: tuple[VaultDoor, RecordingSink], body: bytes,
            reply_to: str | None, headers: dict[str, Any] | None,
            user_id: str | None) -> None:
        """Whatever the body, headers and reply_to, the delivery is acked once; it is
        answered only to a direct reply-to name and when its properties decoded, with a
        typed refusal unless it is a request; no log line holds what it carried."""
        with capture_logs() as logs:
            delivery, got = await ask(*door, body, reply_to, headers, user_id)
        assert delivery.settled == ["ack"]
        if reply_to != TO or wire.marker(headers) is not None:
            assert got is None
        elif user_id != VAULT_USER:
            assert got["reason"] == "not_allowed"
        else:
            assert got["ok"] or got["reason"] in {"malformed", "too_large"}
        # what a log line may say: fixed words only, never from the request
        assert all(set(line) <= {"event", "log_level", "op", "reason"} for line in logs)
        assert {line.get("op", "") for line in logs} <= {"", *OPS}
        assert {line.get("reason") for line in logs} <= {"malformed", "too_large",
                                                         "bad_reply_to", "bad_properties",
                                                         "not_allowed", None}
