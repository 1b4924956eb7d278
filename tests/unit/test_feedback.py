"""What a device is told of its refused message (the ref and the code, nothing else), and
what section 14 of the contract shows of it and of receipts."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd import opaque, payload, receipts
from relayd.client import RECEIPTS, parse_event
from relayd.errors import PermanentError, TransientError
from relayd.receipts import Receipts
from relayd.store import open_store
from tests.unit.fakes import FakeDelivery, RecordingSink
from tests.unit.helpers import FAST
from tests.unit.test_handlers import KEYRING
from tests.unit.test_handlers import settings as handler_settings

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
CLAIMS = st.dictionaries(st.sampled_from(["v", "device", "seq", "ts", "id", "to", "type",
                                          "body", "secret"]), JSON | st.uuids().map(str))


class TestDeviceError:
    @FAST
    @given(claims=CLAIMS, code=st.sampled_from(sorted(payload.DEVICE_ERROR_CODES)))
    def test_only_the_ref_and_the_code(self, claims: dict[str, Any], code: str) -> None:
        """Whatever the refused payload holds, the error carries its id (a canonical UUID
        or null) and the code, and `from` is a business id or empty: no other input."""
        sender, body = payload.device_error(claims, code)
        assert body.keys() == {"ref", "code"}
        assert body["code"] == code
        assert body["ref"] is None or body["ref"] == str(claims["id"]).lower()
        assert sender == "" or (sender == claims["to"]
                                and payload.BUSINESS_ID.fullmatch(sender))

    def test_replayed_is_never_told(self) -> None:
        """A replay's first copy was passed on: there is no error code for it."""
        assert "replayed" not in payload.DEVICE_ERROR_CODES
        with pytest.raises(AssertionError):
            payload.device_error({}, "replayed")

MESSAGE = "2bbbc931-bca9-4f8e-8b20-dbb1675ce4c0"

SECTION = re.compile(r"^## 14\. What became of a message.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)


def section_examples() -> list[dict[str, Any]]:
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    section = SECTION.search(text)
    assert section is not None, "docs/protocol.md has no section 14"
    return [orjson.loads(line) for block in re.findall(r"```json\n(.*?)```", section.group(),
                                                       re.DOTALL)
            for line in block.splitlines() if line.startswith("{") and "<" not in line]


class TestContractExamples:
    def test_section_14_shows_what_relayd_builds(self) -> None:
        """The error, delivered and expired examples of the contract are what relayd's own
        builders make of their inputs, field for field."""
        examples = section_examples()
        errors = [e for e in examples if e["type"] == "error"]
        [up] = [e for e in examples if "to" in e]
        assert [e["body"] for e in errors] == [dict(zip(
            ("ref", "code"), (up["id"], "conversation_closed"), strict=True))]
        sender, body = payload.device_error(up, "conversation_closed")
        assert orjson.loads(payload.down_payload(
            up["device"], errors[0]["seq"], errors[0]["ts"], errors[0]["id"], sender, "error",
            body)) == errors[0]
        found = [e for e in examples if e["type"] in RECEIPTS]
        assert sorted(e["type"] for e in found) == ["delivered", "expired"]
        for event in found:
            assert orjson.loads(payload.receipt_event(
                event["type"], event["ref"], event["conversation"],
                receipts.coarse(event["ts"] + 59_999))) == event
            assert parse_event(orjson.dumps(event)) == event


class TestReceiptToken:
    """relayd.receipts.token and read: the ids a copy's token carries, sealed."""

    SECRET = KEYRING.opaque_secret
    IDS = ("acme", "c" * 32, "0b3a4c1e-59a2-4d7f-8e1b-2c3d4e5f6a7b")

    def test_read_gives_back_the_ids_and_the_token_names_none(self) -> None:
        """What relayd reads back is what it sealed; the token itself holds none of it
        (a copy that expires into relayd.dead links nothing), and two tokens of one
        message differ."""
        first = receipts.token(self.SECRET, *self.IDS)
        second = receipts.token(self.SECRET, *self.IDS)
        assert receipts.read(self.SECRET, first) == self.IDS
        assert [n for n in self.IDS if n in first] == []
        assert first != second
        assert first.isascii()
        assert " " not in first

    @FAST
    @given(at=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=5))
    def test_any_change_to_a_token_is_bad_receipt(self, at: int, bit: int) -> None:
        """A token with any base64url character changed, or cut short, does not open."""
        token = receipts.token(self.SECRET, *self.IDS)
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        at %= len(token.rstrip("="))
        changed = alphabet[alphabet.index(token[at]) ^ (1 << bit)]
        for forged in (token[:at] + changed + token[at + 1:], token[:at]):
            with pytest.raises(PermanentError) as refused:
                receipts.read(self.SECRET, forged)
            assert refused.value.reason == "bad_receipt"

    def test_another_relays_token_is_bad_receipt(self) -> None:
        """A token sealed under another opaque secret does not open."""
        with pytest.raises(PermanentError):
            receipts.read(self.SECRET, receipts.token(b"\x01" * 32, *self.IDS))

    def test_a_token_of_contract_1_4_still_reads(self) -> None:
        """A copy queued before the upgrade carries the ids in clear with a MAC: its
        receipt still counts; a wrong MAC is bad_receipt."""
        mac = opaque.receipt_mac(self.SECRET, *self.IDS)
        assert receipts.read(self.SECRET, " ".join((*self.IDS, mac))) == self.IDS
        with pytest.raises(PermanentError):
            receipts.read(self.SECRET, " ".join((*self.IDS, "a" * len(mac))))


class TestReceiptsHandler:
    """relayd.receipts.Receipts over a real SQLite store, without a broker."""

    @pytest.fixture
    async def handler(self, tmp_path: Path) -> AsyncIterator[tuple[Receipts, RecordingSink]]:
        store = await open_store(f"sqlite:///{tmp_path}/relayd.db", secret=KEYRING.opaque_secret)
        sink = RecordingSink()
        try:
            yield Receipts(handler_settings(tmp_path), store, lambda: KEYRING, sink), sink
        finally:
            await store.close()

    def delivery(self, tmp_path: Path, kind: str, token: str | None = None,
                 **fields: Any) -> FakeDelivery:
        t = handler_settings(tmp_path).topology
        headers: dict[str, Any] = {} if token is None else {receipts.HEADER: token}
        if kind == "expired":
            headers["x-first-death-reason"] = "expired"
        exchange = t.ingress_exchange if kind == "delivered" else t.dead_exchange
        return FakeDelivery(headers=headers, exchange=exchange, **fields)

    async def run(self, handler: Receipts, delivery: FakeDelivery) -> str:
        _, work = handler.prepare(delivery)
        return await work()

    async def test_once_per_message_and_again_on_redelivery(
            self, tmp_path: Path, handler: tuple[Receipts, RecordingSink]) -> None:
        """A second device's receipt and an expired copy tell nothing; a redelivery of a
        receipt tells the same event again, under the same message_id."""
        receipts_handler, sink = handler
        token = receipts.token(KEYRING.opaque_secret, "acme", "c" * 32, MESSAGE)
        told = [await self.run(receipts_handler, self.delivery(tmp_path, kind, token, **extra))
                for kind, extra in (("delivered", {}), ("delivered", {}), ("expired", {}),
                                    ("delivered", {"redelivered": True}))]
        assert told == ["delivered", "delivered_again", "expired_again", "delivered"]
        events = sink.of("business")
        assert len(events) == 2
        assert events[0][3] == events[1][3]  # the same AMQP message_id
        assert orjson.loads(events[0][2]).keys() == {"v", "type", "ref", "conversation", "ts"}

    @pytest.mark.parametrize("token", [None, "acme c x y", "globex " + "c" * 32 + " m z", "",
                                       "acme c m \u00e9t\u00e9", "acme c \udcff z"])
    async def test_a_token_relayd_did_not_write_is_bad_receipt(
            self, tmp_path: Path, handler: tuple[Receipts, RecordingSink],
            token: str | None) -> None:
        """From the edge's route, no token or one whose MAC fails is refused."""
        with pytest.raises(PermanentError) as refused:
            await self.run(handler[0], self.delivery(tmp_path, "delivered", token))
        assert refused.value.reason == "bad_receipt"
        assert handler[1].sent == []

    async def test_an_expired_copy_without_a_token_is_nothing(
            self, tmp_path: Path, handler: tuple[Receipts, RecordingSink]) -> None:
        """An expired typing indicator or echo carries no token: acknowledged, no event."""
        assert await self.run(handler[0], self.delivery(tmp_path, "expired")) == "no_receipt"
        assert handler[1].sent == []

    async def test_a_retry_in_place_tells_the_business(
            self, tmp_path: Path, handler: tuple[Receipts, RecordingSink]) -> None:
        """The business's inbox refuses the first publish: the work run again (as
        relayd.consume retries in place, unmarked by the broker) publishes the event, though
        its first run took the claim."""
        receipts_handler, sink = handler
        failed: list[bool] = []
        original = sink.to_business

        async def refuse_once(business: str, body: bytes, message_id: str, kind: str) -> None:
            if not failed:
                failed.append(True)
                raise TransientError("nacked")
            await original(business, body, message_id, kind)

        sink.to_business = refuse_once  # type: ignore[method-assign]
        token = receipts.token(KEYRING.opaque_secret, "acme", "c" * 32, MESSAGE)
        _, work = receipts_handler.prepare(self.delivery(tmp_path, "delivered", token))
        with pytest.raises(TransientError):
            await work()
        assert await work() == "delivered"
        assert [orjson.loads(e[2])["type"] for e in sink.of("business")] == ["delivered"]
