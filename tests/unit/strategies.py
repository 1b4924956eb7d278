"""Hypothesis strategies for the bodies of contract 1.1: valid ones, within the default
limits, and the paths into them that the mutation tests change."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

from hypothesis import strategies as st

from relayd import bodies

Path = tuple[str | int, ...]

EMOJI = ["👍", "❤️", "😂", "🙏", "👨‍👩‍👧‍👦", "🇫🇷", "1️⃣", "#️⃣", "🏴󠁧󠁢󠁥󠁮󠁧󠁿", "👩🏽‍💻", "©️",
         "☕", "🫠", "🧑🏿‍🤝‍🧑🏻"]
REFERENCE = {"url": "https://files.example/i/1", "key": "k2V5", "sha256": "ab" * 32,
             "size": 12_345, "mime": "image/png"}

ids = st.from_regex(bodies.ID, fullmatch=True)
message_ids = st.uuids().map(str)
texts = st.text(max_size=40)
titles = st.text(min_size=1, max_size=40)
references = st.builds(lambda url, size, mime: {**REFERENCE, "url": url, "size": size,
                                                "mime": mime},
                       st.text(min_size=1, max_size=30), st.integers(0, 2**40),
                       st.sampled_from(["image/png", "image/jpeg", "image/webp"]))
thumbnails = st.builds(lambda raw: {"data": base64.b64encode(raw).decode(), "mime": "image/jpeg"},
                       st.binary(max_size=64))
timezones = st.sampled_from(["UTC", "Europe/Paris", "America/Argentina/Buenos_Aires",
                             "Etc/GMT+5", "America/Port-au-Prince"])
https_urls = st.from_regex(r"https://[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]{1,60}", fullmatch=True)


def _unique(items: st.SearchStrategy[dict[str, Any]], low: int,
            high: int) -> st.SearchStrategy[list[dict[str, Any]]]:
    return st.lists(items, min_size=low, max_size=high, unique_by=lambda i: i["id"])


def _optional(base: dict[str, Any], **extra: st.SearchStrategy[Any]) -> st.SearchStrategy[
        dict[str, Any]]:
    """`base` with each of `extra`'s keys present or absent."""
    return st.fixed_dictionaries(base, optional=extra)


options = st.fixed_dictionaries({"id": ids, "title": st.text(min_size=1, max_size=20)})
quick_replies = st.fixed_dictionaries({"options": _unique(options, 2, 5)})
items = _optional({"id": ids, "title": titles}, subtitle=titles, image=references)
sections = st.integers(1, 4).flatmap(lambda n: st.lists(
    _optional({"items": st.lists(items, min_size=1, max_size=4)}, title=titles),
    min_size=n, max_size=n)).filter(
    lambda ss: len({i["id"] for s in ss for i in s["items"]}) == sum(len(s["items"]) for s in ss))
list_pickers = _optional({"title": titles, "sections": sections}, multiple=st.booleans())
slots = st.fixed_dictionaries({"id": ids, "start": st.integers(0, bodies.MAX_START_MS),
                               "duration": st.integers(1, bodies.MAX_SLOT_SECONDS)})
time_pickers = st.fixed_dictionaries({"title": titles, "timezone": timezones,
                                      "slots": _unique(slots, 1, 6)})
rich_links = _optional({"url": https_urls, "title": titles},
                       image=st.one_of(references, thumbnails))
INTERACTIVE = {"quick_reply": quick_replies, "list_picker": list_pickers,
               "time_picker": time_pickers, "rich_link": rich_links}


@st.composite
def interactive_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A business's message carrying one interactive key, and maybe reply_to."""
    key = draw(st.sampled_from(sorted(INTERACTIVE)))
    body = {"text": draw(texts), key: draw(INTERACTIVE[key])}
    if draw(st.booleans()):
        body["reply_to"] = draw(message_ids)
    return body


plain_messages = _optional({"text": texts}, reply_to=message_ids,
                           attachments=st.lists(references, min_size=1, max_size=3))
responses = st.fixed_dictionaries({"message_id": message_ids,
                                   "selected": st.lists(ids, min_size=1, max_size=5,
                                                        unique=True)})
reactions = _optional({"message_id": message_ids, "emoji": st.sampled_from(EMOJI)},
                      remove=st.just(True))

# (type, body) valid from each side.
from_user = st.one_of(st.tuples(st.just("message"), plain_messages),
                      st.tuples(st.just("response"), responses),
                      st.tuples(st.just("reaction"), reactions))
from_business = st.one_of(st.tuples(st.just("message"), interactive_messages()),
                          st.tuples(st.just("message"), plain_messages),
                          st.tuples(st.just("reaction"), reactions))

# Every key name the contract gives a body, at any depth: a key outside it is unknown.
KNOWN_KEYS = frozenset({
    "text", "attachments", "reply_to", "intent", "group", *bodies.INTERACTIVE, "options", "id",
    "title", "sections", "multiple", "items", "subtitle", "image", "timezone", "slots",
    "start", "duration", "url", "key", "sha256", "size", "mime", "data", "name",
    "message_id", "selected", "emoji", "remove",
})
unknown_keys = st.text(min_size=1, max_size=12).filter(lambda k: k not in KNOWN_KEYS)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False,
                                                                              allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                  max_size=3),
    max_leaves=6)


# What a careless client sends instead of each JSON type: the same value in another type.
NEAR_MISSES: dict[str, list[object]] = {
    "bool": [0, 1, "true", None], "int": [True, False, 1.0, "1"], "str": [1, None, ["x"]],
    "list": [{}, "[]", None], "dict": [[], "{}", None], "float": [1, True], "null": [0, ""],
}


def other_type(value: object) -> st.SearchStrategy[object]:
    """Any JSON value of another type than `value`'s."""
    was = kind_of(value)
    return json_values.filter(lambda v: kind_of(v) != was)


def kind_of(value: object) -> str:
    """The JSON type of a value (bool apart from int, as the contract counts them)."""
    for name, python in (("bool", bool), ("int", int), ("float", float), ("str", str),
                         ("list", list), ("dict", dict)):
        if isinstance(value, python):
            return name
    return "null"


def paths(value: object, prefix: Path = ()) -> Iterator[Path]:
    """Every path below `value` (not the root itself)."""
    children: list[tuple[str | int, object]] = []
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list):
        children = list(enumerate(value))
    for key, child in children:
        yield (*prefix, key)
        yield from paths(child, (*prefix, key))


def dict_paths(value: object) -> list[Path]:
    """The root and every path below it that holds an object."""
    return [p for p in [(), *paths(value)] if isinstance(get(value, p), dict)]


def get(value: Any, path: Path) -> Any:
    for step in path:
        value = value[step]
    return value
