"""The body of each message type, checked against the contract's rules and limits.

`problem(kind, body, limits, sender)` says why a body is refused, or returns None. relayd
passes a valid body on untouched, so nothing here rewrites one. Contract 1.1 added the
interactive keys of a business's `message` (quick_reply, list_picker, time_picker,
rich_link), `reply_to` on any message, and the `response` and `reaction` types.

relayd keeps none of these bodies: a response or a reaction is checked for its shape only,
never against the message it names (docs/protocol.md, "Answers and what relayd checks").
"""

from __future__ import annotations

import base64
import re
import unicodedata
import uuid
from collections.abc import Callable, Collection
from typing import Any, Final, Literal, TypeGuard

from relayd.config import Limits

Sender = Literal["user", "business"]

SHORT: Final = 256  # titles, subtitles, intent, group, inline mime and name
LONG: Final = 2048  # the fields of a reference, a link's url
OPTION_TITLE: Final = 64  # a quick reply is a button: its title is short
MAX_SECTIONS: Final = 10
MAX_SLOT_SECONDS: Final = 86_400
MAX_START_MS: Final = 2**53 - 1  # the largest integer a JavaScript number holds exactly
EMOJI_CODE_POINTS: Final = 16
ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")  # option, item, slot ids
TIMEZONE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_+-]{0,31}(?:/[A-Za-z0-9_+-]{1,32}){0,2}")
# https and then only what RFC 3986 allows in a URI: no space, quote, <, >, \, ^, `, {, |, }.
HTTPS_URL: Final = re.compile(r"https://[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]{1,2040}")
INTERACTIVE: Final = ("quick_reply", "list_picker", "time_picker", "rich_link")

_REFERENCE_KEYS: Final = frozenset({"url", "key", "sha256", "size", "mime"})
# What may join the symbols of one emoji: zero-width joiner, variation selectors 15 and
# 16, the combining keycap, the tag characters of subdivision flags, and the keycap bases.
_KEYCAP: Final = 0x20E3
_EMOJI_JOINERS: Final = frozenset({0x200D, 0xFE0E, 0xFE0F, _KEYCAP, *range(0xE0020, 0xE0080),
                                   *b"0123456789#*"})


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def short_str(value: object, limit: int = SHORT) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


def canonical_uuid(value: object) -> str | None:
    """The lower-case canonical form of a UUID in 8-4-4-4-12 form (any case), or None."""
    if not isinstance(value, str) or len(value) != 36:
        return None
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        return None
    return canonical if canonical == value.lower() else None


def _message_id(value: object) -> bool:
    """A message id inside a body: relayd passes bodies untouched, so only the lower-case
    form that relayd itself hands out is accepted."""
    return isinstance(value, str) and canonical_uuid(value) == value


def _id(value: object) -> bool:
    return isinstance(value, str) and ID.fullmatch(value) is not None


def _symbol(char: str) -> bool:
    return 0x1F000 <= ord(char) <= 0x1FAFF or unicodedata.category(char) == "So"


def is_emoji(value: object) -> bool:
    """One emoji, as bounded here: 1 to 16 code points, each a symbol (Unicode category So,
    or anything in U+1F000..U+1FAFF, where new emoji are added) or a joiner, and at least
    one symbol or keycap. No letters, spaces or controls: a reaction cannot carry text."""
    if not isinstance(value, str) or not 0 < len(value) <= EMOJI_CODE_POINTS:
        return False
    if not all(_symbol(c) or ord(c) in _EMOJI_JOINERS for c in value):
        return False
    return any(_symbol(c) or ord(c) == _KEYCAP for c in value)


def _keys(item: object, required: Collection[str],
          optional: Collection[str] = ()) -> TypeGuard[dict[str, Any]]:
    return (isinstance(item, dict) and item.keys() >= set(required)
            and item.keys() <= {*required, *optional})


def _list(value: object, low: int, high: int) -> bool:
    return isinstance(value, list) and low <= len(value) <= high


def attachment_problem(item: object, inline_limit: int) -> str | None:
    """Why an attachment is invalid, or None when it is fine."""
    if not isinstance(item, dict):
        return "an attachment is an object"
    if item.keys() == _REFERENCE_KEYS:  # a reference is passed through untouched
        ok = (all(short_str(item[k], LONG) for k in ("url", "key", "sha256", "mime"))
              and is_int(item["size"]) and item["size"] >= 0)
        return None if ok else "a reference needs url, key, sha256, mime strings and a size"
    if not _keys(item, ("data", "mime"), ("name",)):
        return "an attachment is a reference {url,key,sha256,size,mime} or inline {data,mime,name?}"
    if not short_str(item["mime"]) or ("name" in item and not short_str(item["name"])):
        return "mime and name are short strings"
    data = item["data"]
    if not isinstance(data, str) or len(data) > inline_limit * 4 // 3 + 4:
        return "inline data is standard base64 within its size limit"
    try:
        size = len(base64.b64decode(data, validate=True))
    except ValueError:  # binascii.Error, or a str that is not ASCII
        return "inline data is not base64"
    return None if size <= inline_limit else "inline data is too large"


def _image(item: object, inline_limit: int | None) -> str | None:
    """An image: a reference, or inline up to `inline_limit` bytes when that is not None."""
    if inline_limit is None and not (isinstance(item, dict) and item.keys() == _REFERENCE_KEYS):
        return "an image is a reference {url,key,sha256,size,mime}"
    if problem := attachment_problem(item, inline_limit or 0):
        return problem
    assert isinstance(item, dict)
    return None if item["mime"].startswith("image/") else "an image's mime is image/…"


def _unique_ids(items: list[dict[str, Any]], what: str) -> str | None:
    if not all(_id(item["id"]) for item in items):
        return f"a {what} id is 1 to 64 letters, digits and _ . : / - (a letter or digit first)"
    ids = [item["id"] for item in items]
    return None if len(set(ids)) == len(ids) else f"{what} ids are unique in their message"


def _quick_reply(value: object, limits: Limits) -> str | None:
    high = limits.max_quick_replies
    shape = f"quick_reply is {{options: 2 to {high} of {{id, title}}}}"
    if not _keys(value, ("options",)) or not _list(value["options"], 2, high):
        return shape
    options = value["options"]
    if not all(_keys(o, ("id", "title")) and short_str(o["title"], OPTION_TITLE)
               for o in options):
        return f"a quick reply option is {{id, title}}, its title 1 to {OPTION_TITLE} characters"
    return _unique_ids(options, "option")


def _list_picker(value: object, limits: Limits) -> str | None:
    if not _keys(value, ("title", "sections"), ("multiple",)):
        return "list_picker is {title, sections, multiple?}"
    if not short_str(value["title"]) or not isinstance(value.get("multiple", False), bool):
        return "a list picker's title is a short string, and multiple is true or false"
    sections = value["sections"]
    if not _list(sections, 1, MAX_SECTIONS):
        return f"a list picker has 1 to {MAX_SECTIONS} sections"
    if not all(_keys(s, ("items",), ("title",)) and ("title" not in s or short_str(s["title"]))
               and _list(s["items"], 1, limits.max_list_items) for s in sections):
        return "a section is {items, title?}: a short title and at least one item"
    items = [item for section in sections for item in section["items"]]
    if len(items) > limits.max_list_items:
        return f"a list picker has at most {limits.max_list_items} items"
    for item in items:
        if not _keys(item, ("id", "title"), ("subtitle", "image")) or not all(
                short_str(item[k]) for k in ("title", "subtitle") if k in item):
            return "an item is {id, title, subtitle?, image?}, title and subtitle short strings"
        if "image" in item and (problem := _image(item["image"], None)):
            return problem
    return _unique_ids(items, "item")


def _time_picker(value: object, limits: Limits) -> str | None:
    if not _keys(value, ("title", "timezone", "slots")) or not short_str(value["title"]):
        return "time_picker is {title, timezone, slots}, its title a short string"
    timezone = value["timezone"]
    if not isinstance(timezone, str) or not TIMEZONE.fullmatch(timezone):
        return "timezone is an IANA time zone name such as Europe/Paris"
    slots = value["slots"]
    if not _list(slots, 1, limits.max_time_slots):
        return f"a time picker has 1 to {limits.max_time_slots} slots"
    if not all(_keys(s, ("id", "start", "duration"))
               and is_int(s["start"]) and 0 <= s["start"] <= MAX_START_MS
               and is_int(s["duration"]) and 0 < s["duration"] <= MAX_SLOT_SECONDS
               for s in slots):
        return ("a slot is {id, start, duration}: start in unix milliseconds, duration "
                f"1 to {MAX_SLOT_SECONDS} seconds")
    return _unique_ids(slots, "slot")


def _rich_link(value: object, limits: Limits) -> str | None:
    if not _keys(value, ("url", "title"), ("image",)) or not short_str(value["title"]):
        return "rich_link is {url, title, image?}, its title a short string"
    url = value["url"]
    if not isinstance(url, str) or not HTTPS_URL.fullmatch(url):
        return "a link's url is https:// and up to 2048 characters that RFC 3986 allows"
    if "image" in value:
        return _image(value["image"], limits.max_thumbnail_bytes)
    return None


_INTERACTIVE: Final[dict[str, Callable[[object, Limits], str | None]]] = {
    "quick_reply": _quick_reply, "list_picker": _list_picker,
    "time_picker": _time_picker, "rich_link": _rich_link,
}


_MESSAGE_KEYS: Final[dict[Sender, frozenset[str]]] = {
    "user": frozenset({"text", "attachments", "reply_to"}),
    "business": frozenset({"text", "attachments", "reply_to", *INTERACTIVE}),
}


def _message(body: dict[str, Any], limits: Limits, sender: Sender) -> str | None:
    interactive = INTERACTIVE if sender == "business" else ()
    if not body.keys() <= _MESSAGE_KEYS[sender]:
        return ("a message body holds text, attachments, reply_to"
                + (" and one of " + ", ".join(INTERACTIVE) if interactive else ""))
    if not body.keys() & {"text", "attachments"}:
        return "a message body holds text and/or attachments"
    if "reply_to" in body and not _message_id(body["reply_to"]):
        return "reply_to is a message id: a lower-case canonical UUID"
    kinds = [k for k in interactive if k in body]
    if len(kinds) > 1:
        return "a message carries at most one of " + ", ".join(INTERACTIVE)
    if kinds:
        if "text" not in body or "attachments" in body:
            return "an interactive message carries text (what older apps show), no attachments"
        return _INTERACTIVE[kinds[0]](body[kinds[0]], limits)
    if "attachments" not in body:
        return None
    attachments = body["attachments"]
    if not _list(attachments, 1, limits.max_attachments):
        return f"attachments is a list of 1 to {limits.max_attachments}"
    for item in attachments:
        if problem := attachment_problem(item, limits.max_inline_attachment_bytes):
            return problem
    return None


def _most_choices(limits: Limits) -> int:
    """The most ids one answer can name: every choice of the largest interactive message."""
    return max(limits.max_quick_replies, limits.max_list_items, limits.max_time_slots)


def _response(body: dict[str, Any], limits: Limits) -> str | None:
    if body.keys() != {"message_id", "selected"} or not _message_id(body["message_id"]):
        return "a response is {message_id, selected}, message_id a lower-case canonical UUID"
    selected, most = body["selected"], _most_choices(limits)
    if not _list(selected, 1, most) or not all(_id(s) for s in selected):
        return f"selected is 1 to {most} option, item or slot ids"
    return None if len(set(selected)) == len(selected) else "selected names each id once"


def _reaction(body: dict[str, Any]) -> str | None:
    if not _keys(body, ("message_id", "emoji"), ("remove",)) or not _message_id(
            body["message_id"]):
        return "a reaction is {message_id, emoji, remove?}, message_id a lower-case UUID"
    if not is_emoji(body["emoji"]):
        return f"emoji is one emoji: at most {EMOJI_CODE_POINTS} code points, no text"
    return None if body.get("remove", True) is True else "remove is true, or left out"


def problem(kind: str, body: object, limits: Limits, sender: Sender) -> str | None:
    """Why `body` is not a valid body for a message of type `kind` from `sender`, or None."""
    if not isinstance(body, dict):
        return "body must be an object"
    if "text" in body and (not isinstance(body["text"], str)
                           or len(body["text"]) > limits.max_text_chars):
        return f"text is a string of at most {limits.max_text_chars} characters"
    if kind == "start":
        if not body.keys() <= {"intent", "group", "text"}:
            return "a start body holds only intent, group and text"
        if any(k in body and not short_str(body[k]) for k in ("intent", "group")):
            return "intent and group are short strings"
        return None
    if kind == "message":
        return _message(body, limits, sender)
    if kind == "response":
        return _response(body, limits)
    if kind == "reaction":
        return _reaction(body)
    return "this type carries an empty body" if body else None
