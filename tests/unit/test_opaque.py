"""Opaque conversation ids and log references (relayd.opaque)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd import opaque, payload, topology
from relayd.config import Topology
from tests.unit.helpers import FAST

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))


class TestConversationId:
    def test_deterministic(self) -> None:
        """The same secret, user, business and epoch always give the same id."""
        first = opaque.conversation_id(SECRET, "alice@example.com", "acme", 0)
        assert first == opaque.conversation_id(SECRET, "alice@example.com", "acme", 0)

    def test_differs_per_business(self) -> None:
        """One user gets a different id at each business."""
        assert (opaque.conversation_id(SECRET, "alice", "acme", 0)
                != opaque.conversation_id(SECRET, "alice", "globex", 0))

    def test_differs_per_user(self) -> None:
        """Two users at one business get different ids."""
        assert (opaque.conversation_id(SECRET, "alice", "acme", 0)
                != opaque.conversation_id(SECRET, "bob", "acme", 0))

    def test_differs_per_epoch(self) -> None:
        """A new epoch gives the same (user, business) a new id."""
        ids = {opaque.conversation_id(SECRET, "alice", "acme", epoch) for epoch in range(5)}
        assert len(ids) == 5

    def test_differs_per_secret(self) -> None:
        """Another relay secret gives another id for the same inputs."""
        assert (opaque.conversation_id(SECRET, "alice", "acme", 0)
                != opaque.conversation_id(OTHER_SECRET, "alice", "acme", 0))

    def test_field_boundaries_do_not_collide(self) -> None:
        """Moving characters between user and business changes the id."""
        assert (opaque.conversation_id(SECRET, "alice1", "acme", 0)
                != opaque.conversation_id(SECRET, "alice", "1acme", 0))

    @FAST
    @given(user=st.text(min_size=1, max_size=40),
           business=st.from_regex(payload.BUSINESS_ID, fullmatch=True),
           epoch=st.integers(0, 10**6))
    def test_shape_reveals_nothing(self, user: str, business: str, epoch: int) -> None:
        """The id matches CONVERSATION_ID and holds neither the user nor the business."""
        cid = opaque.conversation_id(SECRET, user, business, epoch)
        assert payload.CONVERSATION_ID.fullmatch(cid)
        if len(user) >= 6:  # a shorter string may occur by chance
            assert user.lower() not in cid
        if len(business) >= 6:
            assert business.lower() not in cid

    def test_readable_inputs_absent(self) -> None:
        """A realistic user and business id do not appear in the conversation id."""
        cid = opaque.conversation_id(SECRET, "alice", "acme", 0)
        assert payload.CONVERSATION_ID.fullmatch(cid)
        assert "alice" not in cid
        assert "acme" not in cid


class TestReference:
    def test_deterministic_and_unreadable(self) -> None:
        """A log reference is stable for one value and does not contain it."""
        ref = opaque.reference(SECRET, "device", "phone-1")
        assert ref == opaque.reference(SECRET, "device", "phone-1")
        assert "phone" not in ref

    def test_differs_by_kind_value_and_secret(self) -> None:
        """The kind, the value and the secret each change the reference."""
        base = opaque.reference(SECRET, "device", "x1")
        assert base != opaque.reference(SECRET, "user", "x1")
        assert base != opaque.reference(SECRET, "device", "x2")
        assert base != opaque.reference(OTHER_SECRET, "device", "x1")

    def test_differs_from_conversation_id(self) -> None:
        """A user's log reference is not their conversation id."""
        assert opaque.reference(SECRET, "user", "alice") not in opaque.conversation_id(
            SECRET, "alice", "acme", 0)


class TestDeviceToken:
    @FAST
    @given(device=st.from_regex(payload.DEVICE_ID, fullmatch=True))
    def test_names_a_queue_without_the_device_id(self, device: str) -> None:
        """A device's queue and binding key are its token: 32 base32 characters, stable,
        keyed by the secret, never the id, and unlike any other kind of opaque value."""
        token = opaque.device_token(SECRET, device)
        assert re.fullmatch(r"[a-z2-7]{32}", token)
        assert token == opaque.device_token(SECRET, device)
        assert token != opaque.device_token(OTHER_SECRET, device)
        assert device not in token or len(device) < 4
        assert token != opaque.conversation_id(SECRET, device, "", 0)
        t = Topology()
        queue, binding = topology.device(t, device, SECRET)
        assert isinstance(queue, topology.Queue)
        assert isinstance(binding, topology.Binding)
        assert queue.name == topology.device_queue(t, device, SECRET) == f"relayd.device.{token}"
        assert binding.routing_key == token
        assert binding.queue == queue.name

    def test_distinct_devices_distinct_tokens(self) -> None:
        """Ids that differ get tokens that differ (and an id is never its own token)."""
        ids = ["phone", "Phone", "phone-", "phone_1", "a" * 128]
        assert len({opaque.device_token(SECRET, d) for d in ids}) == len(ids)


class TestInboxToken:
    @FAST
    @given(business=st.from_regex(payload.BUSINESS_ID, fullmatch=True))
    def test_names_an_inbox_without_the_business_id(self, business: str) -> None:
        """A business's inbox is named by its token: 32 base32 characters, stable, keyed
        by the secret, never the id, and unlike a device's token for the same text."""
        token = opaque.inbox_token(SECRET, business)
        assert re.fullmatch(r"[a-z2-7]{32}", token)
        assert token == opaque.inbox_token(SECRET, business)
        assert token != opaque.inbox_token(OTHER_SECRET, business)
        assert business not in token or len(business) < 4
        assert token != opaque.device_token(SECRET, business)
        t = Topology()
        exchange, queue, binding = topology.business(t, business, SECRET)
        assert isinstance(exchange, topology.Exchange)
        assert isinstance(queue, topology.Queue)
        assert isinstance(binding, topology.Binding)
        assert exchange.name == f"relayd.biz.{business}"
        assert queue.name == topology.business_inbox(t, business, SECRET) == \
            f"relayd.biz.{token}.inbox"
        assert (binding.queue, binding.exchange) == (queue.name, exchange.name)

    def test_device_tokens_are_unchanged(self) -> None:
        """Sharing the token code with inboxes left device queue names as they were."""
        digest = hmac.new(SECRET, b"relayd/v1 device queue\0phone", hashlib.sha256).digest()
        assert opaque.device_token(SECRET, "phone") == \
            base64.b32encode(digest[:20]).decode().lower()


class TestForgetful:
    def test_a_cache_of_ids_is_emptied_once_held_long_enough(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A forgetful cache answers from memory, then, once it has been held
        FORGET_SECONDS, computes again: the ids it was keyed by are gone from it."""
        computed: list[str] = []

        @opaque.forgetful(maxsize=16)
        def name(value: str) -> str:
            computed.append(value)
            return value.upper()

        assert name("alice") == name("alice") == "ALICE"
        assert computed == ["alice"]
        monkeypatch.setattr(opaque, "FORGET_SECONDS", 0.0)
        assert name("alice") == "ALICE"
        assert computed == ["alice", "alice"]

    def test_the_names_of_people_are_forgetful_and_sources_are_not_kept(self) -> None:
        """pseudonym() is not cached: a message's source is new each time, and a cache of
        them grew a worker by 20 MB over a soak. The names of people are cached (bounded)
        through person_pseudonym, with the same answer."""
        secret = b"k" * 32
        assert opaque.person_pseudonym(secret, "user", "u") == opaque.pseudonym(
            secret, "user", "u")
        assert not hasattr(opaque.pseudonym, "cache_info")
