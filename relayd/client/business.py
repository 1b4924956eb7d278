"""The business side: plain JSON over AMQP, no crypto."""

from __future__ import annotations

import uuid
from typing import Any, Final

import orjson

# The events that say what became of a `message` you sent (contract 1.4): each carries
# `ref` (your message's id), `conversation` and `ts` (to the minute), and arrives once.
RECEIPTS: Final = frozenset({"delivered", "expired"})


def reply(conversation: str, kind: str, body: dict[str, Any] | None = None,
          reply_id: str | None = None) -> bytes:
    """A reply payload; publish it to `relayd.replies` with routing key = your business id
    and AMQP `user_id` = your RabbitMQ username."""
    return orjson.dumps({"v": 1, "type": kind, "conversation": conversation,
                         "id": reply_id or str(uuid.uuid4()), "body": body or {}})


def parse_event(body: bytes) -> dict[str, Any]:
    """An event from your inbox (the queue `relayd business add` named for you: it is
    keyed, not derived from your id); ValueError if it is not a version-1 event."""
    event = orjson.loads(body)
    if not isinstance(event, dict) or event.get("v") != 1 or "type" not in event:
        raise ValueError("not a relayd v1 event")
    return event
