"""Deliveries decoded whatever the publisher put in them.

Why this exists. RabbitMQ passes a message's properties on much as the publisher wrote
them. RabbitMQ 3.10 accepts invalid UTF-8 in every short-string property and in long
strings, timestamps beyond the year 9999 and tables nested thousands deep, and routing
keys of any bytes. pamqp (under aiormq and aio-pika) decodes a content header in one
piece, and on any of these it raises: UnicodeDecodeError, ValueError for the year,
RecursionError. aiormq then closes the connection. The broker requeues every unacked
delivery of that connection and counts one more delivery against each of them, and a
quorum queue dead-letters a message at `topology.delivery_limit`. So one hostile message
cost other tenants their valid messages. A long string that is not UTF-8 is not refused:
it comes through as bytes, which pamqp cannot encode again.

What it does. `install()` replaces `pamqp.frame._unmarshal_header_frame`, the function
`pamqp.frame.unmarshal` calls for every content-header frame, with `content_header`.
That function decodes each property on its own and never raises for anything a publisher
controls. It leaves out each property it cannot decode and names it in the header
`x-relayd-bad-properties`, so the delivery still arrives. The consumer then dead-letters
that delivery alone as `bad_properties` (`check`). The others, `user_id` included, are
decoded as usual. The marker's value is an `Undecoded`, a type nothing decoded from the
wire has: a publisher that writes that header itself is not believed (`check`), and its
words are not copied into the dead-letter copy. It refuses:
- a short string, a table key or a long string that is not UTF-8;
- a table type that is not one of RabbitMQ's ('t b B s u I i l f d D S x A F T V'), or
  pamqp's extra 'L' and NUL;
- a timestamp that Python's datetime cannot hold;
- tables and arrays nested deeper than MAX_DEPTH;
- a `delivery_mode` that aio-pika's DeliveryMode does not know, which would raise in
  aio-pika before relayd's consumer could settle the delivery.
Every value it accepts decodes to the same Python value as pamqp's decoder gives.

Basic.Deliver frames go through pamqp as before. Only when pamqp refuses one is it
decoded again here, with each byte that is not UTF-8 replaced by U+FFFD. A routing key
like that is never a business id, so the reply is answered as `invalid`.

Checked against pamqp 4.0.1, aiormq 7.2.4, aio-pika 10.2.1 and RabbitMQ 3.10.8.
`install()` checks that the hook took effect by decoding a hostile frame through
`pamqp.frame.unmarshal`, and raises if it did not. tests/unit/test_wire.py checks the same
through aiormq's own frame reader. So a pamqp or aiormq that decodes frames elsewhere
fails loudly instead of silently dropping the defence.
"""

from __future__ import annotations

import datetime
import decimal
import struct
from collections.abc import Callable, Mapping
from typing import Any

import pamqp.frame
from pamqp import commands
from pamqp.exceptions import UnmarshalingException
from pamqp.header import ContentHeader

from relayd.errors import PermanentError

BAD_PROPERTIES = "x-relayd-bad-properties"  # the properties left out, comma-separated
MAX_DEPTH = 8  # nested tables and arrays; RabbitMQ's own x-death header uses 3
_UNDECODABLE = (ValueError, IndexError, struct.error, OverflowError, OSError)

_HEAD = struct.Struct(">HHQ")  # class id, weight, body size
_U16, _U32, _U64 = (struct.Struct(f) for f in (">H", ">I", ">Q"))
_FIXED = {kind.encode(): struct.Struct(">" + form) for kind, form in (
    ("t", "B"), ("b", "b"), ("B", "B"), ("s", "h"), ("u", "H"), ("I", "i"), ("i", "I"),
    ("l", "q"), ("L", "q"), ("f", "f"), ("d", "d"))}
_DECIMAL = struct.Struct(">Bi")
_PROPERTIES = [(name, commands.Basic.Properties.flags[name],
                commands.Basic.Properties.amqp_type(name))
               for name in commands.Basic.Properties.__slots__]
_DELIVER_INDEX = _U32.pack(commands.Basic.Deliver.index)


def install() -> None:
    """Put the tolerant decoders in pamqp's place; idempotent. RuntimeError if pamqp's
    frame decoding does not go through them afterwards."""
    pamqp.frame._unmarshal_header_frame = content_header
    pamqp.frame._unmarshal_method_frame = _method
    _self_test()


class Undecoded(str):
    """The marker's value: the properties left out, comma-separated. Only content_header
    makes one; a header a publisher wrote decodes to a plain str."""

    __slots__ = ()


def marker(headers: Mapping[str, Any] | None) -> Undecoded | None:
    """The properties relayd.wire left out of this delivery, if it left any out."""
    value = (headers or {}).get(BAD_PROPERTIES)
    return value if isinstance(value, Undecoded) else None


def check(headers: Mapping[str, Any] | None) -> None:
    """PermanentError `bad_properties` for a delivery whose properties were left out."""
    if marker(headers) is not None:
        raise PermanentError("bad_properties", "a property could not be decoded")


# --- content headers ------------------------------------------------------------------

def content_header(frame_data: bytes) -> ContentHeader:
    """A content-header frame's payload decoded; never raises for what a publisher wrote.

    The class id, size and flags are the broker's own, so a frame too short for them is
    refused as pamqp refuses it.
    """
    try:
        class_id, weight, body_size = _HEAD.unpack_from(frame_data)
        flags, at = _flags(frame_data, _HEAD.size)
    except struct.error as exc:
        raise UnmarshalingException("ContentHeader", exc) from exc
    header = ContentHeader(weight, body_size)
    header.class_id = class_id
    properties = header.properties
    present = [(name, kind) for name, bit, kind in _PROPERTIES if flags & bit]
    bad: list[str] = []
    for i, (name, kind) in enumerate(present):
        try:
            end = _extent(kind, frame_data, at)
            if end > len(frame_data):
                raise ValueError("truncated")
        except _UNDECODABLE:  # where the next one starts is unknown: leave the rest out
            bad += [n for n, _ in present[i:]]
            break
        try:
            value = _VALUE[kind](frame_data, at, end)
            _check_usable(name, value)
            setattr(properties, name, value)
        except _UNDECODABLE:
            bad.append(name)
        at = end
    if bad:
        headers = properties.headers if isinstance(properties.headers, dict) else {}
        headers[BAD_PROPERTIES] = Undecoded(",".join(bad))
        properties.headers = headers
    return header


def _flags(data: bytes, at: int) -> tuple[int, int]:
    """The property flags (continued while bit 0 is set) and where the properties begin."""
    flags, word = 0, 0
    while True:
        (partial,) = _U16.unpack_from(data, at)
        at += 2
        flags |= partial << (16 * word)
        word += 1
        if not partial & 1:
            return flags, at


def _check_usable(name: str, value: Any) -> None:
    """ValueError for a value aio-pika's IncomingMessage raises on, before relayd's
    consumer could settle the delivery (RabbitMQ 3.10 refuses both at publish)."""
    if name == "delivery_mode" and value not in (0, 1, 2):
        raise ValueError("aio-pika knows no such delivery mode")
    if name == "expiration":
        float(value)


def _extent(kind: str, data: bytes, at: int) -> int:
    """Where the property of `kind` that starts at `at` ends."""
    if kind == "octet":
        return at + 1
    if kind == "shortstr":
        return at + 1 + data[at]
    if kind == "timestamp":
        return at + 8
    if kind == "table":
        size: int = _U32.unpack_from(data, at)[0]
        return at + 4 + size
    raise ValueError(f"no property of type {kind}")


def _octet(data: bytes, at: int, end: int) -> int:
    return data[at]


def _shortstr(data: bytes, at: int, end: int) -> str:
    return data[at + 1:end].decode("utf-8")


def _timestamp(data: bytes, at: int, end: int) -> datetime.datetime:
    return _datetime(_U64.unpack_from(data, at)[0])


def _datetime(value: float) -> datetime.datetime:
    """pamqp's reading: seconds, or milliseconds when beyond 32 bits."""
    if value > 0xFFFFFFFF:
        value /= 1000.0
    return datetime.datetime.fromtimestamp(value, tz=datetime.UTC)


def _field_table(data: bytes, at: int, end: int) -> dict[str, Any]:
    return _table(data, at + 4, end, 1)


_VALUE: dict[str, Callable[[bytes, int, int], Any]] = {
    "octet": _octet, "shortstr": _shortstr, "timestamp": _timestamp, "table": _field_table}


def _table(data: bytes, at: int, end: int, depth: int) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise ValueError("nested too deep")
    table: dict[str, Any] = {}
    while at < end:
        key_end = at + 1 + data[at]
        if key_end > end:
            raise ValueError("truncated")
        key = data[at + 1:key_end].decode("utf-8")
        table[key], at = _field(data, key_end, end, depth)
    return table


def _array(data: bytes, at: int, end: int, depth: int) -> list[Any]:
    if depth > MAX_DEPTH:
        raise ValueError("nested too deep")
    values: list[Any] = []
    while at < end:
        value, at = _field(data, at, end, depth)
        values.append(value)
    return values


def _field(data: bytes, at: int, end: int, depth: int) -> tuple[Any, int]:
    """One field value (a type byte and its encoding) and where it ends, within `end`."""
    kind, at = data[at:at + 1], at + 1
    value: Any
    fixed = _FIXED.get(kind)
    if fixed is not None:
        (value,), after = fixed.unpack_from(data, at), at + fixed.size
        if kind == b"t":
            value = bool(value)
    elif kind in (b"S", b"x", b"F", b"A"):
        after = at + 4 + _U32.unpack_from(data, at)[0]
        if after > end:
            raise ValueError("truncated")
        if kind == b"S":
            value = data[at + 4:after].decode("utf-8")
        elif kind == b"x":
            value = bytearray(data[at + 4:after])
        elif kind == b"F":
            value = _table(data, at + 4, after, depth + 1)
        else:
            value = _array(data, at + 4, after, depth + 1)
    elif kind == b"D":
        scale, raw = _DECIMAL.unpack_from(data, at)
        value, after = decimal.Decimal(raw) * (decimal.Decimal(10) ** -scale), at + 5
    elif kind == b"T":
        value, after = _datetime(_U64.unpack_from(data, at)[0]), at + 8
    elif kind in (b"V", b"\x00"):
        value, after = None, at
    else:
        raise ValueError("unknown field type")
    if after > end:
        raise ValueError("truncated")
    return value, after


# --- Basic.Deliver ----------------------------------------------------------------------

_pamqp_method = pamqp.frame._unmarshal_method_frame  # pamqp's own, before install()


def _method(frame_data: bytes) -> Any:
    """pamqp's method-frame decoder; a Basic.Deliver it refuses is decoded again with each
    byte that is not UTF-8 replaced."""
    try:
        return _pamqp_method(frame_data)
    except UnmarshalingException:
        if frame_data[:4] != _DELIVER_INDEX:
            raise
        try:
            return _deliver(frame_data, 4)
        except _UNDECODABLE as exc:
            raise UnmarshalingException("Basic.Deliver", exc) from exc


def _deliver(data: bytes, at: int) -> commands.Basic.Deliver:
    def short() -> str:
        nonlocal at
        end = at + 1 + data[at]
        if end > len(data):
            raise ValueError("truncated")
        text, at = data[at + 1:end].decode("utf-8", "replace"), end
        return text

    consumer_tag = short()
    (delivery_tag,) = _U64.unpack_from(data, at)
    redelivered = bool(data[at + 8] & 1)
    at += 9
    exchange = short()
    routing_key = short()
    return commands.Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange,
                                  routing_key)


# --- the check that the hook is in place ------------------------------------------------

def _self_test() -> None:
    hostile = (_HEAD.pack(60, 0, 0) + _U16.pack(commands.Basic.Properties.flags["message_id"])
               + b"\x01\xff")
    frame = (struct.pack(">BHI", 2, 1, len(hostile)) + hostile + b"\xce")
    try:
        _, _, decoded = pamqp.frame.unmarshal(frame)
    except Exception as exc:  # a pamqp whose decoding no longer goes through our hook
        raise RuntimeError(f"relayd.wire is not in pamqp's path: {type(exc).__name__}"
                           ) from None
    if not (isinstance(decoded, ContentHeader) and decoded.properties.headers == {
            BAD_PROPERTIES: "message_id"} and marker(decoded.properties.headers)):
        raise RuntimeError("relayd.wire is not in pamqp's path")
