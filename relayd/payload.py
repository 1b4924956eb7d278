"""The JSON payloads, validated field by field and type by type, and built.

Validation is strict: duplicate keys, unknown fields, wrong types and oversized values
are rejected. Device payloads fail with EnvelopeError("malformed"); business replies with
ReplyError("invalid").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from relayd import bodies
from relayd.bodies import canonical_uuid as _uuid
from relayd.bodies import is_int as _is_int
from relayd.bodies import short_str as _short_str
from relayd.config import Limits
from relayd.errors import EnvelopeError, ReplyError

VERSION: Final = 1


def is_version(value: object) -> bool:
    """`value` is this contract's version, as JSON gave it: an integer, not true or 1.0."""
    return _is_int(value) and value == VERSION


DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # always fullmatch()
BUSINESS_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
CONVERSATION_ID = re.compile(r"[a-z2-7]{32}")
MAX_USER_ID: Final = 1024  # characters
UP_TYPES: Final = frozenset({"start", "message", "typing_start", "typing_end", "read", "close",
                             "response", "reaction"})
REPLY_TYPES: Final = frozenset({"message", "typing_start", "typing_end", "read", "close",
                                "reaction"})
ECHOED: Final = frozenset({"start", "message", "response", "reaction"})  # to the other devices
ERROR_CODES: Final = frozenset({"unknown_conversation", "conversation_closed",
                                "not_your_conversation", "invalid", "too_large", "rate_limited"})
# The refusals of a verified up message that its device is told of, in a down `error`:
# the dead-letter reasons from check 10 of the opening order on, but `replayed` (the
# first copy got through, or was answered already).
DEVICE_ERROR_CODES: Final = frozenset({"malformed", "stale", "rate_limited", "unknown_business",
                                       "unknown_conversation", "conversation_closed"})
RECEIPTS: Final = frozenset({"delivered", "expired"})  # the events of relayd.receipts
_UP_KEYS: Final = frozenset({"v", "device", "seq", "ts", "id", "to", "type", "body"})
_REPLY_KEYS: Final = frozenset({"v", "type", "conversation", "id", "body"})
_MAX_SEQ: Final = 2**63 - 1


_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def _members(value: Any) -> int:
    """How many members the objects in `value` hold, nested ones included."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            count += len(item)
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return count


def _separators(raw: bytes) -> int:
    """How many members the objects in the JSON text `raw` are written with: its colons
    outside strings."""
    if b"\\" in raw:  # an escaped quote would shift the split below
        return _STRING.sub(b"", raw).count(b":")
    return b"".join(raw.split(b'"')[::2]).count(b":")


def loads(raw: bytes) -> Any:
    """Parse JSON; ValueError, with a fixed message, when it is not JSON or when an object
    has a key twice (orjson keeps the last silently, another parser may keep the first).

    A key written twice leaves fewer members parsed than written. Counting them costs
    2 to 3 µs per up message (docs/performance.md).
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    members = _members(data)
    if raw.count(b":") != members and _separators(raw) != members:
        raise ValueError("a key appears twice in an object")
    return data


def is_user_id(value: object) -> bool:
    """A user id: the operator's own, any text of 1 to MAX_USER_ID characters that every
    store can hold, so no NUL (PostgreSQL text refuses it) and no lone surrogate (what
    Python leaves of bytes that were not UTF-8; no store can encode it)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_USER_ID or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Up:
    """A device's message, after its signature verified and every field checked."""

    device: str
    seq: int
    ts: int
    id: str
    to: str
    type: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reply:
    """A business's reply, every field checked."""

    type: str
    conversation: str
    id: str
    body: dict[str, Any]


def peek_device(payload: bytes) -> tuple[dict[str, Any], str]:
    """Parse an up payload far enough to find the device whose key must verify it."""
    try:
        claims = loads(payload)
    except ValueError as exc:
        raise EnvelopeError("malformed", f"payload: {exc}") from None
    if not isinstance(claims, dict):
        raise EnvelopeError("malformed", "payload is not a JSON object")
    device = claims.get("device")
    if not isinstance(device, str) or not DEVICE_ID.fullmatch(device):
        raise EnvelopeError("malformed", "device is missing or not a device id")
    return claims, device


def validate_up(claims: dict[str, Any], limits: Limits) -> Up:
    """Check every field of a verified up payload."""
    def bad(detail: str) -> EnvelopeError:
        return EnvelopeError("malformed", detail)

    if claims.keys() != _UP_KEYS:
        raise bad("fields must be exactly v, device, seq, ts, id, to, type, body")
    if not is_version(claims["v"]):
        raise bad("v must be 1")
    seq, ts = claims["seq"], claims["ts"]
    if not _is_int(seq) or not 1 <= seq <= _MAX_SEQ:
        raise bad("seq is an integer >= 1")
    if not _is_int(ts) or not 0 <= ts <= _MAX_SEQ:
        raise bad("ts is unix milliseconds")
    message_id = _uuid(claims["id"])
    if message_id is None:
        raise bad("id is a UUID")
    to = claims["to"]
    if not isinstance(to, str) or not BUSINESS_ID.fullmatch(to):
        raise bad("to is a business id")
    kind = claims["type"]
    if not isinstance(kind, str) or kind not in UP_TYPES:
        raise bad("type is not one of " + ", ".join(sorted(UP_TYPES)))
    if problem := bodies.problem(kind, claims["body"], limits, "user"):
        raise bad(problem)
    return Up(claims["device"], seq, ts, message_id, to, kind, claims["body"])


def check_fresh(ts_ms: int, now_ms: int, limits: Limits) -> None:
    """Raise EnvelopeError("stale") for a device clock too far ahead or too old."""
    if ts_ms > now_ms + limits.clock_skew_seconds * 1000:
        raise EnvelopeError("stale", "ts is ahead of the relay's clock beyond the skew allowed")
    if ts_ms < now_ms - limits.max_age_seconds * 1000:
        raise EnvelopeError("stale", "ts is older than max_age_seconds")


def parse_reply(body: bytes, limits: Limits) -> Reply:
    """Parse and check a business reply; ReplyError carries the contract's code."""
    if len(body) > limits.max_envelope_bytes:
        raise ReplyError("too_large", f"a reply is at most {limits.max_envelope_bytes} bytes")
    try:
        data = loads(body)
    except ValueError as exc:
        raise ReplyError("invalid", str(exc)) from None
    if not isinstance(data, dict):
        raise ReplyError("invalid", "not a JSON object")
    if data.keys() != _REPLY_KEYS:
        raise ReplyError("invalid", "fields must be exactly v, type, conversation, id, body")
    if not is_version(data["v"]):
        raise ReplyError("invalid", "v must be 1")
    reply_id = _uuid(data["id"])
    if reply_id is None:
        raise ReplyError("invalid", "id is a UUID")
    if not isinstance(data["type"], str) or data["type"] not in REPLY_TYPES:
        raise ReplyError("invalid", "type is not one of " + ", ".join(sorted(REPLY_TYPES)))
    conversation = data["conversation"]
    if not isinstance(conversation, str) or not CONVERSATION_ID.fullmatch(conversation):
        raise ReplyError("unknown_conversation", "not a conversation id")
    if problem := bodies.problem(data["type"], data["body"], limits, "business"):
        raise ReplyError("invalid", problem)
    return Reply(data["type"], conversation, reply_id, data["body"])


def reply_ref(body: bytes) -> tuple[str | None, str | None]:
    """Best effort (id, conversation) of a reply that failed to parse, for its error event."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    ref, conversation = data.get("id"), data.get("conversation")
    return (ref if _short_str(ref, 64) else None,
            conversation if _short_str(conversation, 64) else None)


def business_event(kind: str, conversation: str, event_id: str, ts_ms: int,
                   body: dict[str, Any], user: str | None = None) -> bytes:
    """What a business receives for a user's message; `user` only for first-party ones."""
    event: dict[str, Any] = {"v": VERSION, "type": kind, "conversation": conversation,
                             "id": event_id, "ts": ts_ms, "body": body}
    if user is not None:
        event["user"] = user
    return orjson.dumps(event)


def error_event(ref: str | None, conversation: str | None, code: str, detail: str) -> bytes:
    assert code in ERROR_CODES, code
    return orjson.dumps({"v": VERSION, "type": "error", "ref": ref,
                         "conversation": conversation, "code": code, "detail": detail})


def device_error(claims: dict[str, Any], code: str) -> tuple[str, dict[str, Any]]:
    """What a device is told of its verified message refused with `code`: the `from` of
    the down `error` (the business it wrote to, "" when `to` is no business id) and its
    body, the message's id as `ref` (null when it is no UUID) and the code, nothing else."""
    assert code in DEVICE_ERROR_CODES, code
    to = claims.get("to")
    sender = to if isinstance(to, str) and BUSINESS_ID.fullmatch(to) else ""
    return sender, {"ref": _uuid(claims.get("id")), "code": code}


def receipt_event(kind: str, ref: str, conversation: str, ts_ms: int) -> bytes:
    """A `delivered` or `expired` event: which message, in which conversation, and when to
    the minute; nothing of the devices."""
    assert kind in RECEIPTS, kind
    return orjson.dumps({"v": VERSION, "type": kind, "ref": ref, "conversation": conversation,
                         "ts": ts_ms})


def down_payload(device: str, seq: int, ts_ms: int, message_id: str, sender: str, kind: str,
                 body: dict[str, Any]) -> bytes:
    """A payload sealed to one device."""
    return orjson.dumps({"v": VERSION, "device": device, "seq": seq, "ts": ts_ms,
                         "id": message_id, "from": sender, "type": kind, "body": body})
