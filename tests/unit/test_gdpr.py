"""Erase requests over AMQP (relayd.gdpr.Erasure.parse) and the ids of relay-made closes."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd import config, gdpr
from relayd.errors import PermanentError
from relayd.store import Conversation
from tests.unit.helpers import FAST

SETTINGS = config.parse({"amqp": {"url": "amqp://localhost"},
                         "store": {"url": "sqlite:///x.db"}, "keys": {"dir": "/k"},
                         "gdpr": {"identity_user": "identity"}}, environ={})
ERASURE = gdpr.Erasure(SETTINGS, store=None, keys=None, sink=None)  # type: ignore[arg-type]


REQUEST_ID = "0b3a4f6e-5c1d-4e2f-9a8b-7c6d5e4f3a2b"  # fixed: the parameters name tests


def request(**overrides: Any) -> bytes:
    data: dict[str, Any] = {"v": 1, "type": "erase", "user": "alice", "id": REQUEST_ID}
    data.update(overrides)
    return orjson.dumps({k: v for k, v in data.items() if v is not ...})


def conversation(updated_ms: int, cid: str = "a" * 32) -> Conversation:
    return Conversation(cid, "alice", "acme", "open", 0, None, 1, updated_ms)


class TestErasureRequests:
    def test_accepted_from_the_identity_service(self) -> None:
        """A well-formed request from gdpr.identity_user names the user to erase."""
        request_id = str(uuid.uuid4())
        parsed = ERASURE.parse(request(id=request_id), "identity")
        assert parsed == gdpr.EraseRequest("alice", request_id)

    @pytest.mark.parametrize("amqp_user", [None, "", "guest", "identity2", "IDENTITY"])
    def test_anyone_else_is_unauthenticated(self, amqp_user: str | None) -> None:
        """Without the identity service's broker-validated user_id, nothing is trusted."""
        with pytest.raises(PermanentError) as caught:
            ERASURE.parse(request(), amqp_user)
        assert caught.value.reason == "unauthenticated"

    def test_nobody_is_trusted_when_unconfigured(self) -> None:
        """With no gdpr.identity_user, every request is unauthenticated."""
        erasure = gdpr.Erasure(SETTINGS.model_copy(update={"gdpr": config.Gdpr()}),
                               None, None, None)  # type: ignore[arg-type]
        with pytest.raises(PermanentError) as caught:
            erasure.parse(request(), "identity")
        assert caught.value.reason == "unauthenticated"

    @pytest.mark.parametrize("body", [
        b"not json", b"[]", request(v=2), request(v=True), request(v=1.0), request(type="export"),
        request(user=""), request(user=7), request(user="x" * 1025), request(id="z" * 36),
        request(id=...), request(extra=True), request(user=...),
    ])
    def test_malformed(self, body: bytes) -> None:
        """Anything but exactly {v:1, type:erase, user, id} is dead-lettered as malformed."""
        with pytest.raises(PermanentError) as caught:
            ERASURE.parse(body, "identity")
        assert caught.value.reason == "malformed"


    @FAST
    @given(user=st.text(max_size=40) | st.sampled_from(["a\x00b", "\x00", "x" * 1024,
                                                         "x" * 1025]))
    def test_a_user_no_store_can_hold_is_malformed(self, user: str) -> None:
        """Any text as the user (JSON cannot carry a lone surrogate): either the request
        names a user id every store can hold, or it is malformed at once; never a
        StoreError retried until internal_error, as a NUL was on PostgreSQL."""
        storable = "\x00" not in user and 0 < len(user) <= 1024
        if storable:
            assert ERASURE.parse(request(user=user), "identity").user == user
        else:
            with pytest.raises(PermanentError) as caught:
                ERASURE.parse(request(user=user), "identity")
            assert caught.value.reason == "malformed"


class TestCloseIds:
    def test_same_close_same_id(self) -> None:
        """A re-run's close carries the id of the interrupted one; another close does not."""
        first = gdpr.close_id("erase", conversation(5))
        assert first == gdpr.close_id("erase", conversation(5))
        assert str(uuid.UUID(first)) == first
        assert len({first, gdpr.close_id("expire", conversation(5)),
                    gdpr.close_id("erase", conversation(6)),
                    gdpr.close_id("erase", conversation(5, "b" * 32))}) == 4
