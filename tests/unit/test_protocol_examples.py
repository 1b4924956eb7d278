"""The JSON examples of the rich-conversations section of docs/protocol.md pass the relay's
own rules, so the contract cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from relayd import bodies, payload
from relayd.config import Limits

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
SECTION = re.compile(r"^## \d+\. Rich conversations.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
BLOCK = re.compile(r"```json\n(.*?)```", re.DOTALL)


def examples() -> list[dict[str, Any]]:
    section = SECTION.search(PROTOCOL.read_text())
    assert section is not None, "docs/protocol.md has no section on rich conversations"
    found = [orjson.loads(line) for block in BLOCK.findall(section.group())
             for line in block.splitlines() if line.startswith("{")]
    return [e for e in found if "v" in e]  # whole payloads; bare bodies are fragments


def role(example: dict[str, Any]) -> str:
    if "to" in example:
        return "up"
    if "from" in example:
        return "down"
    return "event" if "ts" in example else "reply"


@pytest.mark.parametrize("example", examples(), ids=lambda e: f"{role(e)}-{e['type']}")
def test_example_passes_the_relay(example: dict[str, Any]) -> None:
    """Each up payload, reply, event and down payload shown is one relayd accepts or
    produces: its fields and its body follow the rules for its side."""
    limits = Limits()
    kind = role(example)
    if kind == "up":
        assert payload.validate_up(example, limits).body == example["body"]
    elif kind == "reply":
        assert payload.parse_reply(orjson.dumps(example), limits).body == example["body"]
    elif kind == "event":
        assert example.keys() == {"v", "type", "conversation", "id", "ts", "body"}
        assert bodies.problem(example["type"], example["body"], limits, "user") is None
    else:
        assert example.keys() == {"v", "device", "seq", "ts", "id", "from", "type", "body"}
        if example["type"] == "echo":
            inner = example["body"]
            assert bodies.problem(inner["type"], inner["body"], limits, "user") is None
        else:
            assert bodies.problem(example["type"], example["body"], limits, "business") is None


def test_every_new_type_has_an_example() -> None:
    """The section shows each interactive key, a response and a reaction from each side."""
    shown = {(role(e), e["type"], key) for e in examples() for key in e["body"]}
    for key in bodies.INTERACTIVE:
        assert ("reply", "message", key) in shown
    assert {("up", "response", "selected"), ("event", "response", "selected"),
            ("up", "reaction", "emoji"), ("reply", "reaction", "emoji"),
            ("down", "reaction", "emoji"), ("up", "message", "reply_to"),
            ("reply", "message", "reply_to")} <= shown
