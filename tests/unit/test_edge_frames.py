"""The edge's frames: exactly the contract's, and one error for anything else."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.edge import frames
from relayd.edge.frames import FrameError


class TestParse:
    @pytest.mark.parametrize(("text", "expected"), [
        ('{"type":"login","device":"phone","sig":"AA"}', frames.Login("phone", "AA")),
        ('{"type":"send","ref":0,"kid":"r1","sealed":"AA"}', frames.Send(0, "r1", "AA")),
        ('{"sealed":"AA","kid":"r1","ref":9007199254740991,"type":"send"}',
         frames.Send(2**53 - 1, "r1", "AA")),
        ('{"type":"received","tag":3}', frames.Received(3)),
        ('{"type":"ping","ref":1}', frames.Ping(1)),
    ])
    def test_the_contract_frames_parse(self, text: str, expected: frames.Frame) -> None:
        """Each frame of the contract, in any key order, parses to its value."""
        assert frames.parse(text) == expected

    @pytest.mark.parametrize("text", [
        b'{"type":"ping","ref":1}',  # a binary frame
        "", "[]", "null", "1", '"ping"', "{", '{"type":"ping","ref":1}{}',
        '{"type":"pong","ref":1}',  # the edge's frame, not the device's
        '{"type":"ping"}', '{"type":"ping","ref":1,"extra":0}', '{"ref":1}',
        '{"type":"ping","ref":1,"ref":2}', '{"type":"ping","type":"ping","ref":1}',
        '{"type":"ping","ref":true}', '{"type":"ping","ref":1.0}', '{"type":"ping","ref":"1"}',
        '{"type":"ping","ref":-1}', '{"type":"ping","ref":9007199254740992}',
        '{"type":"ping","ref":NaN}', '{"type":"ping","ref":Infinity}',
        '{"type":"ping","ref":' + "9" * 5000 + "}",
        '{"type":"login","device":1,"sig":"AA"}', '{"type":"send","ref":1,"kid":null,"sealed":""}',
        '{"type":"received","tag":[1]}', '{"type":["ping"],"ref":1}',
        "[" * 100_000 + "]" * 100_000,
    ])
    def test_anything_else_is_a_frame_error(self, text: str | bytes) -> None:
        """Binary, not one JSON object, another or no type, a field missing, extra,
        twice or of the wrong type (bool and float are not integers), out of range."""
        with pytest.raises(FrameError) as caught:
            frames.parse(text)
        assert caught.value.reason == "bad_frame"

    @given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                     st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                                  | st.text(max_size=20),
                                  lambda children: st.lists(children, max_size=4)
                                  | st.dictionaries(st.text(max_size=10), children,
                                                    max_size=5),
                                  max_leaves=20).map(lambda v: json.dumps(v))))
    def test_hostile_input_parses_or_raises_frame_error(self, data: str | bytes) -> None:
        """Whatever arrives, parse returns a frame of the contract or raises FrameError:
        no other exception escapes."""
        try:
            frame = frames.parse(data)
        except FrameError:
            return
        assert isinstance(frame, frames.Login | frames.Send | frames.Received | frames.Ping)

    @given(st.sampled_from(["login", "send", "received", "ping"]),
           st.dictionaries(st.sampled_from(["type", "device", "sig", "ref", "kid", "sealed",
                                            "tag", "v", "extra"]),
                           st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           max_size=6))
    def test_near_misses_raise_frame_error(self, kind: str, fields: dict[str, object]) -> None:
        """Frames close to the contract's parse only when every field is exactly right."""
        data = json.dumps({**fields, "type": kind})
        try:
            frame = frames.parse(data)
        except FrameError:
            return
        assert json.loads(data)["type"] == kind
        assert type(frame).__name__.lower() == kind


class TestBuild:
    def test_outgoing_frames_are_the_contracts(self) -> None:
        """What the edge sends, to the byte."""
        assert frames.challenge("e", "AA") == b'{"type":"challenge","v":1,"edge":"e","nonce":"AA"}'
        assert frames.READY == b'{"type":"ready","v":1}'
        assert frames.REFUSED == b'{"type":"refused","code":"login_failed"}'
        assert frames.ack(1) == b'{"type":"ack","ref":1}'
        assert frames.nack(2, "too_large") == b'{"type":"nack","ref":2,"code":"too_large"}'
        assert frames.deliver(3, "AA") == b'{"type":"deliver","tag":3,"sealed":"AA"}'
        assert frames.pong(4) == b'{"type":"pong","ref":4}'
