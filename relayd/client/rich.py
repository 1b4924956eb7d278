"""Interactive messages, responses and reactions (contract 1.1): build their bodies, and
parse the bodies that arrive, with the rules the relay itself applies.

A business sends `reply(conversation, "message", ListPicker(...).body())`; a device
answers with `payload("acme", "response", Response(message_id, ("blue",)).body())`; and
either side reads what arrived with `parse_body(type, body, sender=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relayd import bodies
from relayd.config import Limits

Image = dict[str, Any]  # a reference {url, key, sha256, size, mime}, or inline {data, mime}


def _checked(kind: str, body: dict[str, Any], sender: bodies.Sender,
             limits: Limits) -> dict[str, Any]:
    if problem := bodies.problem(kind, body, limits, sender):
        raise ValueError(problem)
    return body


def _message(text: str, key: str, value: dict[str, Any], reply_to: str | None,
             limits: Limits) -> dict[str, Any]:
    body = {"text": text, key: value}
    if reply_to is not None:
        body["reply_to"] = reply_to
    return _checked("message", body, "business", limits)


@dataclass(frozen=True, slots=True)
class Option:
    id: str
    title: str


@dataclass(frozen=True, slots=True)
class QuickReply:
    """A prompt (`text`) and 2 to `limits.max_quick_replies` buttons."""

    text: str
    options: tuple[Option, ...]
    reply_to: str | None = None

    def body(self, limits: Limits | None = None) -> dict[str, Any]:
        options = [{"id": o.id, "title": o.title} for o in self.options]
        return _message(self.text, "quick_reply", {"options": options}, self.reply_to,
                        limits or Limits())


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    title: str
    subtitle: str | None = None
    image: Image | None = None  # a reference only


@dataclass(frozen=True, slots=True)
class Section:
    items: tuple[Item, ...]
    title: str | None = None


@dataclass(frozen=True, slots=True)
class ListPicker:
    """A titled list of sections of items; the user picks one, or several if `multiple`."""

    text: str
    title: str
    sections: tuple[Section, ...]
    multiple: bool = False
    reply_to: str | None = None

    def body(self, limits: Limits | None = None) -> dict[str, Any]:
        sections = []
        for section in self.sections:
            items = [_without_none({"id": i.id, "title": i.title, "subtitle": i.subtitle,
                                    "image": i.image}) for i in section.items]
            sections.append(_without_none({"title": section.title, "items": items}))
        picker: dict[str, Any] = {"title": self.title, "sections": sections}
        if self.multiple:
            picker["multiple"] = True
        return _message(self.text, "list_picker", picker, self.reply_to, limits or Limits())


@dataclass(frozen=True, slots=True)
class Slot:
    id: str
    start: int  # unix milliseconds
    duration: int  # seconds


@dataclass(frozen=True, slots=True)
class TimePicker:
    """Slots to choose from, shown in the IANA time zone `timezone`."""

    text: str
    title: str
    timezone: str
    slots: tuple[Slot, ...]
    reply_to: str | None = None

    def body(self, limits: Limits | None = None) -> dict[str, Any]:
        slots = [{"id": s.id, "start": s.start, "duration": s.duration} for s in self.slots]
        return _message(self.text, "time_picker",
                        {"title": self.title, "timezone": self.timezone, "slots": slots},
                        self.reply_to, limits or Limits())


@dataclass(frozen=True, slots=True)
class RichLink:
    """An https link with a title and an optional image; relayd never fetches either."""

    text: str
    url: str
    title: str
    image: Image | None = None  # a reference, or an inline thumbnail
    reply_to: str | None = None

    def body(self, limits: Limits | None = None) -> dict[str, Any]:
        link = _without_none({"url": self.url, "title": self.title, "image": self.image})
        return _message(self.text, "rich_link", link, self.reply_to, limits or Limits())


@dataclass(frozen=True, slots=True)
class Response:
    """The user's answer to an interactive message: the ids they chose."""

    message_id: str
    selected: tuple[str, ...]

    def body(self, limits: Limits | None = None) -> dict[str, Any]:
        return _checked("response", {"message_id": self.message_id,
                                     "selected": list(self.selected)}, "user",
                        limits or Limits())


@dataclass(frozen=True, slots=True)
class Reaction:
    """An emoji on a message, or (`remove`) taking that emoji off it again."""

    message_id: str
    emoji: str
    remove: bool = False

    def body(self, limits: Limits | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"message_id": self.message_id, "emoji": self.emoji}
        if self.remove:
            body["remove"] = True
        return _checked("reaction", body, "business", limits or Limits())


Interactive = QuickReply | ListPicker | TimePicker | RichLink
Parsed = Interactive | Response | Reaction


def _without_none(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def parse_body(kind: str, body: dict[str, Any], *, sender: bodies.Sender,
               limits: Limits | None = None) -> Parsed | None:
    """What a `message` (interactive), `response` or `reaction` body holds, or None for any
    other body; ValueError if it breaks the rules the relay applies to `sender`'s bodies.

    A device reads a business's message with sender="business"; a business reads its
    events, and a device reads an echo's inner body, with sender="user"."""
    _checked(kind, body, sender, limits or Limits())
    reply_to = body.get("reply_to")
    if kind == "response":
        return Response(body["message_id"], tuple(body["selected"]))
    if kind == "reaction":
        return Reaction(body["message_id"], body["emoji"], body.get("remove", False))
    if kind != "message":
        return None
    if "quick_reply" in body:
        options = tuple(Option(o["id"], o["title"]) for o in body["quick_reply"]["options"])
        return QuickReply(body["text"], options, reply_to)
    if "list_picker" in body:
        picker = body["list_picker"]
        sections = tuple(
            Section(tuple(Item(i["id"], i["title"], i.get("subtitle"), i.get("image"))
                          for i in s["items"]), s.get("title"))
            for s in picker["sections"])
        return ListPicker(body["text"], picker["title"], sections, picker.get("multiple", False),
                          reply_to)
    if "time_picker" in body:
        picker = body["time_picker"]
        slots = tuple(Slot(s["id"], s["start"], s["duration"]) for s in picker["slots"])
        return TimePicker(body["text"], picker["title"], picker["timezone"], slots, reply_to)
    if "rich_link" in body:
        link = body["rich_link"]
        return RichLink(body["text"], link["url"], link["title"], link.get("image"), reply_to)
    return None
