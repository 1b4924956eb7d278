"""The conversation rules, written once: who opens, reopens, notes activity on and closes a
conversation, and which messages a conversation's state refuses.

Pure: plain values in, a decision out, no I/O. The handlers apply a Decision (inbound.py
for a user's message, outbound.py for a business's reply); the stores call opening()
on the row they hold locked, to compute what a (re)open writes, so that two hosts racing
on one conversation apply the rule to the same state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from relayd.store import Conversation

# A conversation's last activity (updated_ms, which retention reads in days) is written at
# most once a minute: the write it saves was a fifth of an inbound message's cost.
ACTIVITY_GRANULARITY_MS = 60_000
OPENING_TYPES = frozenset({"start", "message"})  # the user's types that open a conversation

Write = Literal["keep", "open", "close"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What a message does to its conversation: `keep` it as it is; `open` it (create,
    reopen, or note activity: Store.open_conversation); `close` it. A `refusal` (a reason
    code, with its `detail`) refuses the message and writes nothing."""

    write: Write = "keep"
    refusal: str | None = None
    detail: str = ""


KEEP = Decision()
OPEN = Decision("open")
CLOSE = Decision("close")


def up(current: Conversation | None, kind: str, retry: bool, now_ms: int) -> Decision:
    """A user's message of type `kind` to the business of `current` (None: they never
    talked). `retry`: this message was accepted before (a redelivery of our own)."""
    if kind in OPENING_TYPES:
        if current is not None and current.state == "closed" and retry:
            return KEEP  # closed since our first attempt: a retry reopens nothing
        if (current is not None and current.state == "open"
                and now_ms - current.updated_ms < ACTIVITY_GRANULARITY_MS):
            return KEEP  # open, and its activity time is fresh enough: no write
        return OPEN
    if current is None:
        return Decision(refusal="unknown_conversation",
                        detail="the user has no such conversation")
    if current.state == "open":
        return CLOSE if kind == "close" else KEEP
    if retry and kind == "close" and current.closed_by == "user":
        return KEEP  # our own earlier attempt closed it: deliver again
    return Decision(refusal="conversation_closed", detail="the conversation is closed")


def reply(current: Conversation | None, business: str, kind: str, retry: bool) -> Decision:
    """A reply of type `kind` from `business` into `current` (None: no such id)."""
    if current is None:
        return Decision(refusal="unknown_conversation", detail="no such conversation")
    if current.business != business:
        return Decision(refusal="not_your_conversation",
                        detail="this conversation is not yours")
    if current.state == "closed":
        if retry and kind == "close" and current.closed_by == "business":
            return KEEP  # our own earlier attempt closed it: deliver again
        return Decision(refusal="conversation_closed", detail="the conversation is closed")
    return CLOSE if kind == "close" else KEEP


@dataclass(frozen=True, slots=True)
class Opening:
    """The row an open writes: its epoch, its creation time, and whether its id is new
    (made from the epoch) or kept."""

    epoch: int
    created_ms: int
    new_id: bool


def opening(current: Conversation | None, rotate_on_reopen: bool, now_ms: int,
            fresh_epoch: int) -> Opening:
    """What opening the conversation `current` (None: no row) writes, under the id
    policy (`rotate_on_reopen`: conversations.opaque_id_policy rotate_on_delete).

    A conversation created afresh starts at epoch 0, or under the policy at
    `fresh_epoch` (random in [0, 2**62)): after its row expired or was erased, the user's
    next conversation cannot get an id the business saw before. One the user closed gets
    epoch + 1, a new id and a new creation time when it reopens under the policy; any
    other reopen, or activity on an open one, keeps them."""
    if current is None:
        return Opening(fresh_epoch if rotate_on_reopen else 0, now_ms, True)
    if current.state == "closed" and rotate_on_reopen and current.closed_by == "user":
        return Opening(current.epoch + 1, now_ms, True)
    return Opening(current.epoch, current.created_ms, False)
