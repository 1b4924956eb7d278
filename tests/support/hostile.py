"""Hypothesis strategies for hostile AMQP properties, as raw wire bytes.

Each strategy yields the bytes a publisher writes and whether relayd.wire should decode
them (True) or leave them out and mark the delivery `bad_properties` (False). The oracle
is written here from the rules, not by calling relayd.wire: strings must be UTF-8, a
timestamp must fit Python's datetime, table types must be known, nesting at most
MAX_DEPTH, delivery_mode one aio-pika knows.

Every AMQP field-table type RabbitMQ knows is covered ('t b B s u I i l f d D S x A F T
V'), with pamqp's 'L', unknown type bytes, every bit pattern of the fixed-size types
(NaN and infinite floats, out-of-range timestamps), long and short strings that are or
are not UTF-8, and tables that are large or nested thousands deep. The broker refuses
some of these itself (unknown types, NaN floats, a bad expiration, another user's
user_id); the suites count what the broker accepted.
"""

from __future__ import annotations

import datetime
import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from relayd.wire import MAX_DEPTH
from tests.support.raw_amqp import PROPERTY_KIND, array, long, short, table

FIXED_SIZES = {"t": 1, "b": 1, "B": 1, "s": 2, "u": 2, "I": 4, "i": 4, "l": 8, "L": 8,
               "f": 4, "d": 8, "D": 5}
KNOWN = set(FIXED_SIZES) | set("SxAFTV")
UNKNOWN_TYPES = [bytes([b]) for b in range(256) if chr(b) not in KNOWN and b != 0]
SHORT_STRINGS = ["content_type", "content_encoding", "correlation_id", "reply_to",
                 "message_id", "message_type", "app_id", "cluster_id"]


@dataclass(frozen=True)
class Raw:
    """Wire bytes, whether relayd.wire decodes them, and (a field value) how many tables
    or arrays it nests, itself included: relayd.wire refuses a headers table whose
    deepest value sits below more than MAX_DEPTH of them, the headers table included."""

    data: bytes
    decodable: bool
    levels: int = 0

    def __repr__(self) -> str:  # hypothesis prints failing examples: keep them readable
        shown = self.data if len(self.data) <= 48 else self.data[:48] + b"..."
        return f"Raw({shown!r} ({len(self.data)} bytes), decodable={self.decodable})"


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def timestamp_fits(value: int) -> bool:
    """pamqp's reading of a timestamp (milliseconds beyond 32 bits) fits a datetime."""
    seconds = value / 1000.0 if value > 0xFFFFFFFF else value
    try:
        datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    except (ValueError, OverflowError, OSError):
        return False
    return True


def text_bytes(max_size: int) -> st.SearchStrategy[bytes]:
    """UTF-8 text, or any bytes (mostly not UTF-8), at most `max_size` bytes."""
    return st.one_of(
        st.text(max_size=max_size // 4).map(str.encode),
        st.binary(max_size=max_size),
        st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"caf\xe9", b"ok\x00\xfe"]))


def short_string() -> st.SearchStrategy[Raw]:
    return text_bytes(255).map(lambda b: Raw(short(b), is_utf8(b)))


def timestamps() -> st.SearchStrategy[int]:
    """Any 64 bits, with the edges of what a datetime holds."""
    return st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([
        0, 0xFFFFFFFF, 0x100000000, 253402300799999, 253402300800000, 2**63, 2**64 - 1]))


def _leaf() -> st.SearchStrategy[Raw]:
    fixed = st.sampled_from(sorted(FIXED_SIZES)).flatmap(
        lambda kind: st.binary(min_size=FIXED_SIZES[kind], max_size=FIXED_SIZES[kind]).map(
            lambda b: Raw(kind.encode() + b, True)))
    special_floats = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300,
                                      -0.0, 3.5e38]).flatmap(lambda v: st.sampled_from([
                                          Raw(b"d" + struct.pack(">d", v), True),
                                          Raw(b"f" + struct.pack(">f", max(min(v, 3.4e38),
                                                                           -3.4e38)), True)]))
    stamp = timestamps().map(lambda v: Raw(b"T" + struct.pack(">Q", v), timestamp_fits(v)))
    string = text_bytes(300).map(lambda b: Raw(b"S" + long(b), is_utf8(b)))
    big_string = st.integers(0, 60_000).map(lambda n: Raw(b"S" + long(b"a" * n), True))
    byte_array = st.binary(max_size=300).map(lambda b: Raw(b"x" + long(b), True))
    unknown = st.tuples(st.sampled_from(UNKNOWN_TYPES), st.binary(max_size=8)).map(
        lambda t: Raw(t[0] + t[1], False))
    return st.one_of(fixed, special_floats, stamp, string, big_string, byte_array,
                     st.just(Raw(b"V", True)), unknown)


def deep() -> st.SearchStrategy[Raw]:
    """Nothing inside `levels` tables or arrays, around MAX_DEPTH and far beyond it."""
    def build(levels: int, arrays: bool) -> Raw:
        data = b"V"
        for _ in range(levels):
            data = b"A" + array([data]) if arrays else b"F" + table([(b"k", data)])
        return Raw(data, True, levels)
    return st.builds(build, st.sampled_from([0, 1, MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH,
                                             1000, 4000]), st.booleans())


def field_values() -> st.SearchStrategy[Raw]:
    """A field value of any type, nested a few levels."""
    def containers(children: st.SearchStrategy[Raw]) -> st.SearchStrategy[Raw]:
        entries = st.lists(st.tuples(text_bytes(40), children), max_size=4)
        as_table = entries.map(lambda e: Raw(
            b"F" + table([(k, v.data) for k, v in e]),
            all(is_utf8(k) and v.decodable for k, v in e),
            1 + max((v.levels for _, v in e), default=0)))
        as_array = st.lists(children, max_size=4).map(lambda vs: Raw(
            b"A" + array([v.data for v in vs]), all(v.decodable for v in vs),
            1 + max((v.levels for v in vs), default=0)))
        return st.one_of(as_table, as_array)
    return st.one_of(st.recursive(_leaf(), containers, max_leaves=8), deep())


# Header names that mean something to relayd or to the broker: a publisher may write them
# too, with any value (relayd's marker among them: it must not be taken for relayd's).
RESERVED_HEADERS = [b"x-relayd-bad-properties", b"x-relayd-reason", b"x-relayd-queue",
                    b"x-relayd-amqp-user", b"x-relayd-routing-key", b"x-relayd-redelivered",
                    b"relayd-kid", b"x-delivery-count", b"x-death", b"CC", b"BCC"]


def headers() -> st.SearchStrategy[Raw]:
    """A headers table: a few hostile entries, sometimes thousands of harmless ones."""
    names = st.one_of(text_bytes(60), st.sampled_from(RESERVED_HEADERS))
    entries = st.lists(st.tuples(names, field_values()), max_size=6)
    padding = st.sampled_from([0, 0, 0, 2000])
    return st.builds(
        lambda e, n: Raw(table([(k, v.data) for k, v in e]
                               + [(f"h{i}".encode(), b"b\x01") for i in range(n)]),
                         all(is_utf8(k) and v.decodable for k, v in e)
                         and 1 + max((v.levels for _, v in e), default=0) <= MAX_DEPTH),
        entries, padding)


def properties() -> st.SearchStrategy[dict[str, Raw]]:
    """Any subset of the properties, user_id aside (the broker checks it against the
    login; the suites set it)."""
    octet = st.integers(0, 255)
    strategies: dict[str, st.SearchStrategy[Raw]] = {
        name: short_string() for name in SHORT_STRINGS}
    strategies["headers"] = headers()
    # mostly what the broker takes (it refuses other delivery modes and expirations)
    strategies["delivery_mode"] = st.one_of(st.sampled_from([1, 2]), octet).map(
        lambda v: Raw(bytes([v]), v in (0, 1, 2)))
    strategies["priority"] = octet.map(lambda v: Raw(bytes([v]), True))
    strategies["timestamp"] = timestamps().map(
        lambda v: Raw(struct.pack(">Q", v), timestamp_fits(v)))
    strategies["expiration"] = st.one_of(
        st.integers(0, 10**12).map(lambda v: Raw(short(str(v).encode()), True)),
        st.integers(0, 10**12).map(lambda v: Raw(short(str(v).encode()), True)),
        short_string().map(lambda r: Raw(r.data, r.decodable and _is_number(r.data[1:]))))
    assert set(strategies) | {"user_id"} == set(PROPERTY_KIND)
    return st.fixed_dictionaries({}, optional=strategies)


def _is_number(data: bytes) -> bool:
    try:
        float(data.decode("utf-8"))
    except ValueError:
        return False
    return True


def bodies() -> st.SearchStrategy[bytes]:
    """Bodies of every size, from empty to one byte beyond relayd's 1 MiB envelope limit,
    across the broker's frame size (128 KiB)."""
    sizes = st.one_of(st.integers(0, 200), st.sampled_from([4096, 65_535, 131_072,
                                                            1_048_576, 1_048_577]))
    return st.builds(lambda n, pattern: (pattern * (n // len(pattern) + 1))[:n],
                     sizes, st.binary(min_size=1, max_size=64))
