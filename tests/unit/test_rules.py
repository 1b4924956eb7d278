"""The conversation rules (relayd.rules): every state x type x retry x id policy, by table."""

from __future__ import annotations

import pytest

from relayd import payload, rules
from relayd.store import Conversation

NOW = 10_000_000
FRESH_EPOCH = 123_456
CREATED = 1_000

STATES: dict[str, Conversation | None] = {
    "none": None,
    "open_fresh": Conversation("c" * 32, "u1", "acme", "open", 5, None, CREATED,
                               NOW - rules.ACTIVITY_GRANULARITY_MS + 1),
    "open_stale": Conversation("c" * 32, "u1", "acme", "open", 5, None, CREATED,
                               NOW - rules.ACTIVITY_GRANULARITY_MS),
    "closed_by_user": Conversation("c" * 32, "u1", "acme", "closed", 5, "user", CREATED, 2_000),
    "closed_by_business": Conversation("c" * 32, "u1", "acme", "closed", 5, "business",
                                       CREATED, 2_000),
}
UP_TYPES = ("start", "message", "typing_start", "typing_end", "read", "close", "response",
            "reaction")
UNKNOWN, CLOSED = "unknown_conversation", "conversation_closed"

# (state, retry): what each up type does, in UP_TYPES order.
UP_TABLE: dict[tuple[str, bool], tuple[str, ...]] = {
    ("none", False): ("open", "open", *(UNKNOWN,) * 6),
    ("none", True): ("open", "open", *(UNKNOWN,) * 6),
    ("open_fresh", False): ("keep", "keep", "keep", "keep", "keep", "close", "keep", "keep"),
    ("open_fresh", True): ("keep", "keep", "keep", "keep", "keep", "close", "keep", "keep"),
    ("open_stale", False): ("open", "open", "keep", "keep", "keep", "close", "keep", "keep"),
    ("open_stale", True): ("open", "open", "keep", "keep", "keep", "close", "keep", "keep"),
    ("closed_by_user", False): ("open", "open", *(CLOSED,) * 6),
    ("closed_by_user", True): ("keep", "keep", CLOSED, CLOSED, CLOSED, "keep", CLOSED, CLOSED),
    ("closed_by_business", False): ("open", "open", *(CLOSED,) * 6),
    ("closed_by_business", True): ("keep", "keep", *(CLOSED,) * 6),
}

# (state, rotate_on_reopen): what an open writes, as (epoch, created_ms, new id).
OPENING_TABLE: dict[tuple[str, bool], tuple[int, int, bool]] = {
    ("none", False): (0, NOW, True),
    ("none", True): (FRESH_EPOCH, NOW, True),
    ("open_fresh", False): (5, CREATED, False),
    ("open_fresh", True): (5, CREATED, False),
    ("open_stale", False): (5, CREATED, False),
    ("open_stale", True): (5, CREATED, False),
    ("closed_by_user", False): (5, CREATED, False),
    ("closed_by_user", True): (6, NOW, True),
    ("closed_by_business", False): (5, CREATED, False),
    ("closed_by_business", True): (5, CREATED, False),
}

REPLY_TYPES = ("message", "typing_start", "typing_end", "read", "close", "reaction")
NOT_YOURS = "not_your_conversation"
REPLY_STATES = {**STATES, "someone_elses": Conversation("c" * 32, "u1", "globex", "open", 5,
                                                        None, CREATED, NOW)}
# (state, retry): what each reply type from acme does, in REPLY_TYPES order.
REPLY_TABLE: dict[tuple[str, bool], tuple[str, ...]] = {
    ("none", False): (UNKNOWN,) * 6,
    ("none", True): (UNKNOWN,) * 6,
    ("someone_elses", False): (NOT_YOURS,) * 6,
    ("someone_elses", True): (NOT_YOURS,) * 6,
    ("open_fresh", False): ("keep", "keep", "keep", "keep", "close", "keep"),
    ("open_fresh", True): ("keep", "keep", "keep", "keep", "close", "keep"),
    ("open_stale", False): ("keep", "keep", "keep", "keep", "close", "keep"),
    ("open_stale", True): ("keep", "keep", "keep", "keep", "close", "keep"),
    ("closed_by_user", False): (CLOSED,) * 6,
    ("closed_by_user", True): (CLOSED,) * 6,
    ("closed_by_business", False): (CLOSED,) * 6,
    ("closed_by_business", True): (CLOSED, CLOSED, CLOSED, CLOSED, "keep", CLOSED),
}


def outcome(decision: rules.Decision) -> str:
    return decision.refusal if decision.refusal is not None else decision.write


class TestUp:
    def test_the_table_covers_every_case(self) -> None:
        """Every state, with and without retry, has a row naming every up type."""
        assert set(UP_TYPES) == payload.UP_TYPES
        assert all(len(row) == len(UP_TYPES) for row in UP_TABLE.values())
        assert set(UP_TABLE) == {(s, r) for s in STATES for r in (False, True)}
        assert set(OPENING_TABLE) == {(s, p) for s in STATES for p in (False, True)}

    @pytest.mark.parametrize("policy", [False, True], ids=["stable", "rotate_on_delete"])
    @pytest.mark.parametrize("retry", [False, True], ids=["first", "retry"])
    @pytest.mark.parametrize("kind", UP_TYPES)
    @pytest.mark.parametrize("state", list(STATES))
    def test_every_case(self, state: str, kind: str, retry: bool, policy: bool) -> None:
        """Only the user's start or message opens; other types need it open; a retry
        reopens nothing and re-delivers its own close; a refusal writes nothing; what an
        open writes follows the id policy."""
        current = STATES[state]
        decision = rules.up(current, kind, retry, NOW)
        assert outcome(decision) == UP_TABLE[state, retry][UP_TYPES.index(kind)]
        if decision.refusal is not None:
            assert (decision.write, decision.detail != "") == ("keep", True)
        if decision.write == "open":
            opened = rules.opening(current, policy, NOW, FRESH_EPOCH)
            assert (opened.epoch, opened.created_ms, opened.new_id) == OPENING_TABLE[
                state, policy]


class TestReply:
    def test_the_table_covers_every_case(self) -> None:
        """Every state, with and without retry, has a row naming every reply type."""
        assert set(REPLY_TYPES) == payload.REPLY_TYPES
        assert all(len(row) == len(REPLY_TYPES) for row in REPLY_TABLE.values())
        assert set(REPLY_TABLE) == {(s, r) for s in REPLY_STATES for r in (False, True)}

    @pytest.mark.parametrize("retry", [False, True], ids=["first", "retry"])
    @pytest.mark.parametrize("kind", REPLY_TYPES)
    @pytest.mark.parametrize("state", list(REPLY_STATES))
    def test_every_case(self, state: str, kind: str, retry: bool) -> None:
        """A business writes only into its own open conversation and closes it with
        close; a retry re-delivers its own close; nothing reopens."""
        decision = rules.reply(REPLY_STATES[state], "acme", kind, retry)
        assert outcome(decision) == REPLY_TABLE[state, retry][REPLY_TYPES.index(kind)]
        assert decision.write != "open"
