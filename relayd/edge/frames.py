"""The edge's frames: what a device may send, checked to the letter, and what it gets.

Pure: no I/O. A frame is one JSON object in a text frame (docs/protocol.md section 12).
parse() raises FrameError for anything but exactly one of the frames below; it never
lets a library's error through, so the edge has one thing to catch: close with 4400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import orjson

from relayd.errors import PermanentError

SUBPROTOCOL: Final = "relayd.v1"
PATH: Final = "/v1/device"
MAX_REF: Final = 2**53 - 1


class Close(IntEnum):
    """The close codes of the contract."""

    NORMAL = 1000
    TOO_LARGE = 1009
    ERROR = 1011
    RESTARTING = 1012
    TRY_AGAIN_LATER = 1013
    BAD_FRAME = 4400
    LOGIN_FAILED = 4401
    LOGIN_TIMEOUT = 4408
    REPLACED = 4409
    TOO_SLOW = 4429


class FrameError(PermanentError):
    """Not a frame of the contract: the edge closes the connection with 4400."""

    def __init__(self, detail: str) -> None:
        super().__init__("bad_frame", detail)


@dataclass(frozen=True, slots=True)
class Login:
    device: str
    sig: str


@dataclass(frozen=True, slots=True)
class Send:
    ref: int
    kid: str
    sealed: str


@dataclass(frozen=True, slots=True)
class Received:
    tag: int


@dataclass(frozen=True, slots=True)
class Ping:
    ref: int


Frame = Login | Send | Received | Ping
_FIELDS: Final[dict[str, tuple[type[Frame], dict[str, type]]]] = {
    "login": (Login, {"device": str, "sig": str}),
    "send": (Send, {"ref": int, "kid": str, "sealed": str}),
    "received": (Received, {"tag": int}),
    "ping": (Ping, {"ref": int}),
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise FrameError("a key appears twice")
    return result


def _no_constant(name: str) -> Any:
    raise FrameError(f"{name} is not JSON")


def parse(data: str | bytes) -> Frame:
    """The frame in one WebSocket message; FrameError unless it is exactly one of ours."""
    if not isinstance(data, str):
        raise FrameError("a binary frame")
    try:
        value = json.loads(data, object_pairs_hook=_no_duplicates,
                           parse_constant=_no_constant)
    except FrameError:
        raise
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer too long to read
        raise FrameError("not JSON") from None
    if not isinstance(value, dict):
        raise FrameError("not a JSON object")
    kind = value.pop("type", None)
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise FrameError("no such type")
    cls, fields = _FIELDS[kind]
    if value.keys() != fields.keys():
        raise FrameError(f"{kind} has exactly the fields {sorted(fields)}")
    for name, expected in fields.items():
        field = value[name]
        if type(field) is not expected:  # bool is an int to isinstance; not to us
            raise FrameError(f"{name} is not a {expected.__name__}")
        if isinstance(field, int) and not 0 <= field <= MAX_REF:
            raise FrameError(f"{name} is out of range")
    return cls(**value)


def challenge(edge: str, nonce: str) -> bytes:
    return orjson.dumps({"type": "challenge", "v": 1, "edge": edge, "nonce": nonce})


READY: Final = orjson.dumps({"type": "ready", "v": 1})
REFUSED: Final = orjson.dumps({"type": "refused", "code": "login_failed"})


def ack(ref: int) -> bytes:
    return orjson.dumps({"type": "ack", "ref": ref})


def nack(ref: int, code: str) -> bytes:
    return orjson.dumps({"type": "nack", "ref": ref, "code": code})


def pong(ref: int) -> bytes:
    return orjson.dumps({"type": "pong", "ref": ref})


def deliver(tag: int, sealed: str) -> bytes:
    return orjson.dumps({"type": "deliver", "tag": tag, "sealed": sealed})
