"""The JSON payloads, validated field by field and type by type, and built.

Validation is strict: unknown fields, wrong types and oversized values are rejected.
Device payloads fail with EnvelopeError("malformed"); business replies with
ReplyError("invalid").
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from typing import Any, Final

import orjson

from relayd.config import Limits
from relayd.errors import EnvelopeError, ReplyError

VERSION: Final = 1
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # always fullmatch()
BUSINESS_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
CONVERSATION_ID = re.compile(r"[a-z2-7]{32}")
UP_TYPES: Final = frozenset({"start", "message", "typing_start", "typing_end", "read", "close"})
REPLY_TYPES: Final = frozenset({"message", "typing_start", "typing_end", "read", "close"})
ERROR_CODES: Final = frozenset({"unknown_conversation", "conversation_closed",
                                "not_your_conversation", "invalid", "too_large", "rate_limited"})
_UP_KEYS: Final = frozenset({"v", "device", "seq", "ts", "id", "to", "type", "body"})
_REPLY_KEYS: Final = frozenset({"v", "type", "conversation", "id", "body"})
_REFERENCE_KEYS: Final = frozenset({"url", "key", "sha256", "size", "mime"})
_MAX_SEQ: Final = 2**63 - 1
_SHORT: Final = 256


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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short_str(value: object, limit: int = _SHORT) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


def _uuid(value: object) -> str | None:
    if not isinstance(value, str) or len(value) != 36:
        return None
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        return None
    return canonical if canonical == value.lower() else None


def _attachment(item: object, limits: Limits) -> str | None:
    """Why an attachment is invalid, or None when it is fine."""
    if not isinstance(item, dict):
        return "an attachment is an object"
    if item.keys() == _REFERENCE_KEYS:  # a reference is passed through untouched
        ok = (all(_short_str(item[k], 2048) for k in ("url", "key", "sha256", "mime"))
              and _is_int(item["size"]) and item["size"] >= 0)
        return None if ok else "a reference needs url, key, sha256, mime strings and a size"
    if not item.keys() <= {"data", "mime", "name"} or not {"data", "mime"} <= item.keys():
        return "an attachment is a reference {url,key,sha256,size,mime} or inline {data,mime,name?}"
    if not _short_str(item["mime"]) or ("name" in item and not _short_str(item["name"])):
        return "mime and name are short strings"
    data = item["data"]
    if not isinstance(data, str) or len(data) > limits.max_inline_attachment_bytes * 4 // 3 + 4:
        return "inline data is standard base64 within max_inline_attachment_bytes"
    try:
        size = len(base64.b64decode(data, validate=True))
    except binascii.Error:
        return "inline data is not base64"
    return None if size <= limits.max_inline_attachment_bytes else "inline data is too large"


def body_problem(kind: str, body: object, limits: Limits) -> str | None:
    """Why `body` is not a valid body for a message of type `kind`, or None."""
    if not isinstance(body, dict):
        return "body must be an object"
    if "text" in body and (not isinstance(body["text"], str)
                           or len(body["text"]) > limits.max_text_chars):
        return f"text is a string of at most {limits.max_text_chars} characters"
    if kind == "start":
        if not body.keys() <= {"intent", "group", "text"}:
            return "a start body holds only intent, group and text"
        if any(k in body and not _short_str(body[k]) for k in ("intent", "group")):
            return "intent and group are short strings"
        return None
    if kind == "message":
        if not body.keys() <= {"text", "attachments"} or not body:
            return "a message body holds text and/or attachments"
        if "attachments" not in body:
            return None
        attachments = body["attachments"]
        if not isinstance(attachments, list) or not 0 < len(attachments) <= limits.max_attachments:
            return f"attachments is a list of 1 to {limits.max_attachments}"
        for item in attachments:
            if problem := _attachment(item, limits):
                return problem
        return None
    return "this type carries an empty body" if body else None


def peek_device(payload: bytes) -> tuple[dict[str, Any], str]:
    """Parse an up payload far enough to find the device whose key must verify it."""
    try:
        claims = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise EnvelopeError("malformed", "payload is not JSON") from None
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
    if claims["v"] != VERSION or not _is_int(claims["v"]):
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
    if problem := body_problem(kind, claims["body"], limits):
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
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ReplyError("invalid", "not JSON") from None
    if not isinstance(data, dict):
        raise ReplyError("invalid", "not a JSON object")
    if data.keys() != _REPLY_KEYS:
        raise ReplyError("invalid", "fields must be exactly v, type, conversation, id, body")
    if data["v"] != VERSION or not _is_int(data["v"]):
        raise ReplyError("invalid", "v must be 1")
    reply_id = _uuid(data["id"])
    if reply_id is None:
        raise ReplyError("invalid", "id is a UUID")
    if not isinstance(data["type"], str) or data["type"] not in REPLY_TYPES:
        raise ReplyError("invalid", "type is not one of " + ", ".join(sorted(REPLY_TYPES)))
    conversation = data["conversation"]
    if not isinstance(conversation, str) or not CONVERSATION_ID.fullmatch(conversation):
        raise ReplyError("unknown_conversation", "not a conversation id")
    if problem := body_problem(data["type"], data["body"], limits):
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


def down_payload(device: str, seq: int, ts_ms: int, message_id: str, sender: str, kind: str,
                 body: dict[str, Any]) -> bytes:
    """A payload sealed to one device."""
    return orjson.dumps({"v": VERSION, "device": device, "seq": seq, "ts": ts_ms,
                         "id": message_id, "from": sender, "type": kind, "body": body})
