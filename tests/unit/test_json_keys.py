"""Duplicate keys in JSON are refused at every door (relayd.payload.loads).

orjson keeps the last of two equal keys; another parser may keep the first, so a payload
with a key twice can mean two things. The oracle here is the text itself: JSON written
from (key, value) pairs, some keys repeated on purpose, in every spacing and escaping.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd import config, gdpr, payload
from relayd.errors import EnvelopeError, PermanentError, ReplyError
from tests.unit.helpers import FAST


@dataclass(frozen=True)
class Obj:
    pairs: list[tuple[str, Any]]


@dataclass(frozen=True)
class Arr:
    items: list[Any]


@dataclass(frozen=True)
class Style:
    comma: str
    colon: str
    ascii: bool


def write(value: Any, style: Style) -> str:
    if isinstance(value, Obj):
        return "{" + style.comma.join(
            json.dumps(k, ensure_ascii=style.ascii) + style.colon + write(v, style)
            for k, v in value.pairs) + "}"
    if isinstance(value, Arr):
        return "[" + style.comma.join(write(v, style) for v in value.items) + "]"
    return json.dumps(value, ensure_ascii=style.ascii)


def has_duplicate(value: Any) -> bool:
    if isinstance(value, Obj):
        keys = [k for k, _ in value.pairs]
        return len(set(keys)) < len(keys) or any(has_duplicate(v) for _, v in value.pairs)
    if isinstance(value, Arr):
        return any(has_duplicate(v) for v in value.items)
    return False


# Few key characters, so that keys repeat; colons, quotes and backslashes in keys and
# values, so that the count of members cannot be fooled by what strings hold.
TRICKY = st.text(alphabet='a:"\\{}é', max_size=3)
SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | TRICKY
           | st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=8))
VALUES = st.recursive(SCALARS, lambda children: (
    st.lists(children, max_size=4).map(Arr)
    | st.lists(st.tuples(TRICKY, children), max_size=4).map(Obj)), max_leaves=20)
STYLES = st.builds(Style, st.sampled_from([",", ", ", " ,\n"]),
                   st.sampled_from([":", ": ", " :\t"]), st.booleans())


class TestLoads:
    @FAST
    @given(value=VALUES, style=STYLES)
    def test_refused_exactly_when_some_object_repeats_a_key(self, value: Any,
                                                            style: Style) -> None:
        """loads refuses a text iff one of its objects has a key twice; otherwise it gives
        what orjson gives."""
        text = write(value, style).encode()
        if has_duplicate(value):
            with pytest.raises(ValueError, match="twice"):
                payload.loads(text)
        else:
            assert payload.loads(text) == json.loads(text)

    @pytest.mark.parametrize("text", [
        b'{"a":1,"a":1}', b'{"a":1,"\\u0061":2}', b'{"b":{"a":":","a":"x"}}',
        b'[{"a":"\\":"},{"a":1,"a":2}]', b'{"a":"\\u003a","a":"b","c":"::"}',
    ], ids=repr)
    def test_duplicates_hidden_behind_escapes_and_colons(self, text: bytes) -> None:
        """A key repeated through an escape, or beside strings full of colons, is seen."""
        with pytest.raises(ValueError, match="twice"):
            payload.loads(text)

    def test_not_json(self) -> None:
        """Text that is not JSON is a ValueError with a fixed message, no input in it."""
        with pytest.raises(ValueError, match=r"^not JSON$"):
            payload.loads(b'{"secret": ')


class TestAtEveryDoor:
    def test_up_payload_with_a_key_twice_is_malformed(self) -> None:
        """An up payload naming `device` twice is malformed before any key is looked up."""
        raw = (b'{"v":1,"device":"mallory","seq":1,"ts":1,"id":"' + str(uuid.uuid4()).encode()
               + b'","to":"acme","type":"start","body":{},"device":"alice-phone"}')
        with pytest.raises(EnvelopeError) as caught:
            payload.peek_device(raw)
        assert caught.value.reason == "malformed"
        assert "twice" in caught.value.detail

    def test_reply_with_a_key_twice_is_invalid(self) -> None:
        """A reply naming `conversation` twice is answered `invalid`."""
        raw = (b'{"v":1,"type":"message","conversation":"' + b"a" * 32 + b'","id":"'
               + str(uuid.uuid4()).encode() + b'","body":{"text":"x","text":"y"}}')
        with pytest.raises(ReplyError) as caught:
            payload.parse_reply(raw, config.Limits())
        assert caught.value.reason == "invalid"

    def test_erase_request_with_a_key_twice_is_malformed(self) -> None:
        """An erase request naming `user` twice is dead-lettered as malformed."""
        settings = config.parse({"amqp": {"url": "amqp://localhost"},
                                 "store": {"url": "sqlite:///x.db"}, "keys": {"dir": "/k"},
                                 "gdpr": {"identity_user": "identity"}}, environ={})
        erasure = gdpr.Erasure(settings, None, None, None)  # type: ignore[arg-type]
        raw = (b'{"v":1,"type":"erase","user":"alice","user":"bob","id":"'
               + str(uuid.uuid4()).encode() + b'"}')
        with pytest.raises(PermanentError) as caught:
            erasure.parse(raw, "identity")
        assert caught.value.reason == "malformed"
