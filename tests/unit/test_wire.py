"""relayd.wire: content headers and deliveries decoded whatever the publisher wrote."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import struct
from typing import Any

import pamqp.frame
import pytest
from aiormq.connection import FrameReceiver
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands, constants
from pamqp.header import ContentHeader

from relayd import wire
from relayd.errors import PermanentError
from tests.support import hostile
from tests.support.raw_amqp import header_payload, long, short, table
from tests.unit.helpers import FAST

Properties = commands.Basic.Properties


def pamqp_decode(payload: bytes) -> ContentHeader:
    """pamqp's own decoding of a content-header payload (the reference)."""
    header = ContentHeader()
    header.unmarshal(payload)
    return header


def frame_of(kind: int, payload: bytes, channel: int = 1) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + bytes(
        [constants.FRAME_END])


def shown(properties: Properties) -> dict[str, str]:
    """Every property as repr (NaN equals NaN this way)."""
    return {name: repr(getattr(properties, name)) for name in Properties.__slots__}


def marked(header: ContentHeader) -> set[str]:
    """What relayd.wire says it left out (a publisher's own marker header says nothing)."""
    return set(filter(None, str(wire.marker(header.properties.headers) or "").split(",")))


# --- values pamqp itself can encode ----------------------------------------------------

_scalars = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.none(),
    st.floats(width=32, allow_nan=False), st.text(max_size=30),
    st.binary(max_size=30).map(bytearray),
    st.decimals(allow_nan=False, allow_infinity=False, places=3,
                min_value=decimal.Decimal(-2_000_000), max_value=decimal.Decimal(2_000_000)),
    st.datetimes(min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2100, 1, 1),
                 timezones=st.just(datetime.UTC)).map(lambda d: d.replace(microsecond=0)))
_tables = st.recursive(
    st.dictionaries(st.text(max_size=20), _scalars, max_size=4),
    lambda inner: st.dictionaries(st.text(max_size=20),
                                  st.one_of(_scalars, inner, st.lists(_scalars, max_size=3)),
                                  max_size=4),
    max_leaves=10)
_short = st.text(max_size=60).filter(lambda t: 0 < len(t.encode()) <= 255)
encodable = st.builds(
    Properties, content_type=st.none() | _short, content_encoding=st.none() | _short,
    headers=st.none() | _tables, delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(1, 255), correlation_id=st.none() | _short,
    reply_to=st.none() | _short, expiration=st.none() | st.integers(1, 10**9).map(str),
    message_id=st.none() | _short, message_type=st.none() | _short,
    timestamp=st.none() | st.datetimes(
        min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2100, 1, 1),
        timezones=st.just(datetime.UTC)).map(lambda d: d.replace(microsecond=0)),
    user_id=st.none() | _short, app_id=st.none() | _short)


class TestSameAsPamqp:
    @FAST
    @given(properties=encodable, size=st.integers(0, 2**40))
    def test_what_pamqp_encodes_decodes_as_pamqp_decodes_it(self, properties: Properties,
                                                           size: int) -> None:
        """For every header pamqp can encode, relayd.wire gives what pamqp's own decoder
        gives, and marks nothing."""
        payload = ContentHeader(0, size, properties).marshal()
        ours, theirs = wire.content_header(payload), pamqp_decode(payload)
        assert shown(ours.properties) == shown(theirs.properties)
        assert (ours.class_id, ours.weight, ours.body_size) == (60, 0, size)
        assert not marked(ours)

    @pytest.mark.parametrize("kind", sorted(hostile.FIXED_SIZES))
    def test_every_fixed_type_at_its_edges(self, kind: str) -> None:
        """Each fixed-size table type, all zeros, all ones and a mixed pattern, decodes to
        pamqp's value."""
        size = hostile.FIXED_SIZES[kind]
        for pattern in (b"\x00" * size, b"\xff" * size, bytes(range(0x7f, 0x7f + size))):
            payload = header_payload(0, {"headers": table([(b"k", kind.encode() + pattern)])})
            assert shown(wire.content_header(payload).properties) == shown(
                pamqp_decode(payload).properties)


# --- hostile headers ---------------------------------------------------------------------

class TestHostile:
    @FAST
    @given(properties=hostile.properties(), user=st.sampled_from([None, "acme-user"]))
    def test_never_raises_and_marks_exactly_what_it_cannot_decode(
            self, properties: dict[str, hostile.Raw], user: str | None) -> None:
        """Any properties: the header decodes; the marker names exactly the properties the
        rules refuse; every other property, user_id included, is pamqp's value."""
        raw = {name: r.data for name, r in properties.items()}
        if user is not None:
            raw["user_id"] = short(user.encode())
        header = wire.content_header(header_payload(7, raw))
        assert header.body_size == 7
        assert marked(header) == {n for n, r in properties.items() if not r.decodable}
        assert header.properties.user_id == user
        for name, r in properties.items():
            if r.decodable:
                alone = pamqp_decode(header_payload(7, {name: r.data})).properties
                if name == "headers":
                    mine = dict(header.properties.headers or {})
                    mine.pop(wire.BAD_PROPERTIES, None)
                    theirs = dict(alone.headers or {})
                    theirs.pop(wire.BAD_PROPERTIES, None)  # a publisher's: dropped
                    assert repr(mine) == repr(theirs)
                else:
                    assert repr(getattr(header.properties, name)) == repr(getattr(alone, name))
            else:
                assert getattr(header.properties, name) in (None, "") or name == "headers"

    @FAST
    @given(flags=st.integers(0, 0xFFFE).map(lambda f: f & ~1), rest=st.binary(max_size=300))
    def test_any_bytes_after_the_flags(self, flags: int, rest: bytes) -> None:
        """Whatever follows the flags, even bytes that end mid-property: no exception, and
        what could not be read is marked."""
        header = wire.content_header(struct.pack(">HHQH", 60, 0, 0, flags) + rest)
        names = marked(header)
        assert names <= set(Properties.__slots__)
        for name in names - {"headers"}:
            assert getattr(header.properties, name) in (None, "")  # cluster_id's default

    @pytest.mark.parametrize("name", hostile.SHORT_STRINGS)
    def test_each_short_string_property_that_is_not_utf8(self, name: str) -> None:
        """Invalid UTF-8 in any short-string property marks that property alone; user_id
        and the headers still arrive."""
        header = wire.content_header(header_payload(0, {
            name: short(b"\xff\xfe"), "user_id": short(b"acme-user"),
            "headers": table([(b"relayd-kid", b"S" + long(b"k1"))])}))
        assert marked(header) == {name}
        assert header.properties.user_id == "acme-user"
        assert header.properties.headers == {"relayd-kid": "k1",
                                             wire.BAD_PROPERTIES: name}

    @pytest.mark.parametrize(("value", "why"), [
        (b"S" + long(b"\xff"), "a long string that pamqp passes on as bytes"),
        (b"T" + struct.pack(">Q", 2**64 - 1), "a timestamp beyond the year 9999"),
        (b"Z\x00", "an unknown type"),
        (b"F" + table([(b"\xff", b"V")]), "a nested key that is not UTF-8"),
    ])
    def test_a_bad_header_value_marks_the_headers(self, value: bytes, why: str) -> None:
        """The whole headers table is left out when one value in it is refused: {why}."""
        header = wire.content_header(header_payload(0, {
            "headers": table([(b"relayd-kid", b"S" + long(b"k1")), (b"x", value)]),
            "content_type": short(b"application/json")}))
        assert header.properties.headers == {wire.BAD_PROPERTIES: "headers"}
        assert header.properties.content_type == "application/json"

    def test_nesting_deeper_than_pamqp_recurses(self) -> None:
        """4,000 nested tables (pamqp raises RecursionError) are refused, MAX_DEPTH are not."""
        for levels, refused in ((wire.MAX_DEPTH - 1, False), (wire.MAX_DEPTH, True),
                                (4000, True)):
            value = b"V"
            for _ in range(levels):
                value = b"F" + table([(b"k", value)])
            header = wire.content_header(header_payload(0, {"headers": table([(b"k",
                                                                                value)])}))
            assert marked(header) == ({"headers"} if refused else set())

    @FAST
    @given(properties=hostile.properties(), forged=hostile.text_bytes(200))
    def test_a_publishers_own_marker_is_dropped(self, properties: dict[str, hostile.Raw],
                                                forged: bytes) -> None:
        """A publisher that writes the marker header itself is not believed: the delivery
        is `bad_properties` exactly when relayd.wire left something out, and the marker
        then names exactly that, never the publisher's words."""
        raw = {name: r.data for name, r in properties.items()}
        raw["headers"] = table([(wire.BAD_PROPERTIES.encode(), b"S" + long(forged))])
        header = wire.content_header(header_payload(0, raw))
        expected = {n for n, r in properties.items() if not r.decodable and n != "headers"}
        if not hostile.is_utf8(forged):  # then the table itself cannot be decoded
            expected.add("headers")
        assert marked(header) == expected
        if expected:
            with pytest.raises(PermanentError):
                wire.check(header.properties.headers)
        else:
            wire.check(header.properties.headers)

    @pytest.mark.parametrize("mode", [3, 7, 255])
    def test_a_delivery_mode_aio_pika_cannot_take(self, mode: int) -> None:
        """aio-pika's IncomingMessage raises on a delivery_mode it does not know, before
        relayd could settle the delivery: it is marked instead."""
        header = wire.content_header(header_payload(0, {"delivery_mode": bytes([mode])}))
        assert marked(header) == {"delivery_mode"}
        assert header.properties.delivery_mode is None


# --- Basic.Deliver ----------------------------------------------------------------------

def deliver(routing_key: bytes, exchange: bytes = b"relayd.replies") -> bytes:
    return (struct.pack(">I", commands.Basic.Deliver.index) + short(b"ctag-1")
            + struct.pack(">Q", 42) + b"\x01" + short(exchange) + short(routing_key))


class TestDeliver:
    def test_a_routing_key_that_is_not_utf8(self) -> None:
        """pamqp refuses it; relayd.wire replaces each bad byte, so the reply arrives with a
        routing key that is no business's id."""
        wire.install()
        _, _, method = pamqp.frame.unmarshal(frame_of(constants.FRAME_METHOD,
                                                      deliver(b"acme\xff")))
        assert isinstance(method, commands.Basic.Deliver)
        assert (method.consumer_tag, method.delivery_tag, method.redelivered,
                method.exchange, method.routing_key) == (
            "ctag-1", 42, True, "relayd.replies", "acme\ufffd")

    def test_a_valid_deliver_is_pamqps(self) -> None:
        """A well-formed Basic.Deliver is decoded by pamqp, as before."""
        wire.install()
        _, _, method = pamqp.frame.unmarshal(frame_of(constants.FRAME_METHOD, deliver(b"acme")))
        assert method.routing_key == "acme"
        assert method.redelivered is True

    def test_other_methods_are_refused_as_before(self) -> None:
        """Only Basic.Deliver is decoded again: any other method pamqp refuses stays
        refused."""
        wire.install()
        bad = struct.pack(">I", commands.Basic.GetOk.index) + b"\xff" * 3
        with pytest.raises(pamqp.exceptions.UnmarshalingException):
            pamqp.frame.unmarshal(frame_of(constants.FRAME_METHOD, bad))


# --- the hook is where aiormq reads -------------------------------------------------------

HOSTILE_HEADER = header_payload(3, {"content_type": short(b"\xff"),
                                    "user_id": short(b"acme-user")})


class TestInstalled:
    async def test_aiormq_reads_through_it(self) -> None:
        """aiormq's own frame reader hands relayd.wire's header to aio-pika: a pamqp or
        aiormq that decodes elsewhere fails here."""
        wire.install()
        reader = asyncio.StreamReader()
        reader.feed_data(frame_of(constants.FRAME_HEADER, HOSTILE_HEADER)
                         + frame_of(constants.FRAME_METHOD, deliver(b"\xfe")))
        receiver = FrameReceiver(reader)
        receiver.started = True
        _, _, header = await receiver.get_frame()
        _, _, method = await receiver.get_frame()
        assert isinstance(header, ContentHeader)
        assert marked(header) == {"content_type"}
        assert header.properties.user_id == "acme-user"
        assert method.routing_key == "\ufffd"

    def test_install_is_idempotent(self) -> None:
        """Installing twice keeps pamqp's own method decoder as the first one called."""
        wire.install()
        wire.install()
        assert pamqp.frame._unmarshal_header_frame is wire.content_header
        assert wire._pamqp_method is not wire._method

    def test_install_fails_loudly_when_pamqp_decodes_elsewhere(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A pamqp whose unmarshal no longer calls the function relayd.wire replaces makes
        install() raise, so a worker refuses to start rather than run undefended."""
        def inlined(data: bytes) -> tuple[int, int, Any]:
            _, channel, size = struct.unpack(">BHI", data[:7])
            return 8 + size, channel, pamqp_decode(data[7:7 + size])
        monkeypatch.setattr(pamqp.frame, "unmarshal", inlined)
        with pytest.raises(RuntimeError, match="not in pamqp's path"):
            wire.install()


class TestCheck:
    def test_a_marked_delivery_is_a_permanent_error(self) -> None:
        """The consumer's check turns the marker into `bad_properties`."""
        with pytest.raises(PermanentError) as caught:
            wire.check({wire.BAD_PROPERTIES: wire.Undecoded("content_type")})
        assert caught.value.reason == "bad_properties"

    @pytest.mark.parametrize("headers", [None, {}, {"relayd-kid": "k1"},
                                         {wire.BAD_PROPERTIES: "content_type"}])
    def test_an_unmarked_delivery_passes(self, headers: dict[str, Any] | None) -> None:
        """Nothing left out, whatever headers a publisher wrote (the marker's name too)."""
        wire.check(headers)
