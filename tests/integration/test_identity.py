"""The identity service's door (relayd.identity): devices registered and revoked over AMQP,
answered on direct reply-to, by a broker user with exactly the rights
deploy/rabbitmq/README.md gives the identity service; hostile requests refused with a
typed reason, at no one else's cost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from relayd.client import DeviceKeys, IdentityService, enrol
from relayd.crypto import b64e
from relayd.identity import MAX_REQUEST_BYTES
from tests.integration.edge_harness import closed, running
from tests.integration.harness import (
    BROKER,
    Relay,
    add_amqp_user,
    amqp_url,
    documented_permissions,
    rabbitmqctl,
    relay_in_vhost,
)
from tests.integration.test_hostile_amqp import _no_early_expiry, unacked
from tests.support import hostile
from tests.support.raw_amqp import RawPublisher, short
from tests.unit.test_weak_keys import LIBSODIUM_ED25519_BLOCKLIST, LIBSODIUM_X25519_BLOCKLIST

EXAMPLES = int(os.environ.get("RELAYD_HOSTILE_EXAMPLES", "10"))  # as test_hostile_amqp
FEW_SECONDS = 10.0
HOST, PORT = BROKER.rsplit(":", 1)
ALICE = "alice@example.org"
ACCEPTED = {"v": 1, "type": "answer", "accepted": True}


def confine(vhost: str, user: str) -> str:
    """A broker user with the identity service's rights in the deploy README."""
    password = add_amqp_user(vhost, user)
    rights = documented_permissions()["identity"]
    rabbitmqctl("set_permissions", "-p", vhost, user, rights["configure"], rights["write"],
                rights["read"])
    return password


@dataclass
class Door:
    relay: Relay
    identity: str  # the identity service's broker user
    password: str
    url: str  # its AMQP URL
    mallory: str  # another broker user with the very same rights
    mallory_url: str


@contextlib.asynccontextmanager
async def door(tmp_path: Path, **sections: dict[str, Any]) -> AsyncIterator[Door]:
    """A relay whose gdpr role runs, trusting a confined identity service."""
    identity, mallory = (f"{n}-{secrets.token_hex(4)}" for n in ("identity", "mallory"))
    async with relay_in_vhost(tmp_path, gdpr={"identity_user": identity}, **sections) as relay:
        try:
            password, other = confine(relay.vhost, identity), confine(relay.vhost, mallory)
            await relay.start("gdpr")
            yield Door(relay, identity, password, amqp_url(identity, password, relay.vhost),
                       mallory,
                       amqp_url(mallory, other, relay.vhost))
        finally:
            for user in (identity, mallory):
                rabbitmqctl("delete_user", user)


class TestEnrolment:
    async def test_register_login_revoke(self, tmp_path: Path) -> None:
        """A device registered by the identity service logs in at the edge; revoked while
        connected, it is closed with 4401 at once, and its next login is refused."""
        async with door(tmp_path) as d, running(d.relay) as edge:
            phone = DeviceKeys.generate("alice-phone")
            async with IdentityService(d.url, d.identity) as identity:
                assert await identity.register(ALICE, phone) == {**ACCEPTED,
                                                                 "outcome": "registered"}
                assert await identity.register(ALICE, phone) == {**ACCEPTED,
                                                                 "outcome": "unchanged"}
                ws = await edge.login(phone)
                assert await identity.revoke(ALICE, "alice-phone") == {**ACCEPTED,
                                                                       "outcome": "revoked"}
                assert await closed(ws) == 4401
                again, answer = await edge.try_login(phone)
                assert answer == {"type": "refused", "code": "login_failed"}
                assert await closed(again) == 4401
                assert await identity.revoke(ALICE, "alice-phone") == {**ACCEPTED,
                                                                       "outcome": "unchanged"}
            assert await d.relay.store.device("alice-phone") is None
            assert not await d.relay.exists(d.relay.device_queue(phone))

    async def test_a_registered_device_converses(self, tmp_path: Path) -> None:
        """A registration (by relayd.client.enrol) carries everything the relay needs: the
        device's messages are opened and verified, and the business's answer is sealed
        to it."""
        async with door(tmp_path) as d:
            await d.relay.add_business("acme")
            await d.relay.start("inbound", "outbound")
            phone = DeviceKeys.generate("alice-phone")
            # the one call scripts/demo makes
            assert await enrol(d.url, d.identity, ALICE, phone) == {**ACCEPTED,
                                                                    "outcome": "registered"}
            await d.relay.send(phone, "acme", "start", {"text": "hello"})
            [start] = await d.relay.events("acme", 1)
            await d.relay.reply("acme", start["conversation"], "message", {"text": "hi"})
            [down] = await d.relay.received(phone, 1)
            assert down["body"] == {"text": "hi"}


# --- hostile requests -------------------------------------------------------------------

@dataclass(frozen=True)
class Hostile:
    """One hostile request: who publishes it (the identity service, another user with
    its rights, or the identity service without user_id), where it asks for its answer,
    and its body."""

    author: str  # identity, mallory, anonymous
    reply: str  # direct, none, relayd.inbound
    body: bytes

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 60 else self.body[:60] + b"..."
        return f"Hostile({self.author}, {self.reply}, {body!r} ({len(self.body)} bytes))"

    def expected(self) -> tuple[str, bool]:
        """The reason it is dead-lettered with, and whether it is answered."""
        if self.author != "identity":
            return "unauthenticated", False
        if self.reply == "relayd.inbound":
            return "bad_reply_to", False
        answered = self.reply == "direct"
        if len(self.body) > MAX_REQUEST_BYTES:
            return "too_large", answered
        data = orjson.loads(self.body) if self.body[:1] == b"{" else None
        weak = isinstance(data, dict) and "weak" not in data and "enc_key" in data and (
            data["enc_key"] in WEAK_X25519 or data["sign_key"] in WEAK_ED25519)
        return ("weak_key" if weak else "malformed"), answered


WEAK_X25519 = [b64e(k) for k in LIBSODIUM_X25519_BLOCKLIST[:5]]
WEAK_ED25519 = [b64e(k) for k in LIBSODIUM_ED25519_BLOCKLIST[:5]]
GOOD = DeviceKeys.generate("mallory-phone").registration("mallory@example.org")


def registration(**fields: Any) -> bytes:
    return orjson.dumps({"v": 1, "type": "register", "id": str(uuid.uuid4()), **GOOD,
                         **fields})


weak_registrations = st.one_of(
    st.sampled_from(WEAK_X25519).map(lambda k: registration(enc_key=k)),
    st.sampled_from(WEAK_ED25519).map(lambda k: registration(sign_key=k)))
malformed = st.one_of(
    st.binary(max_size=200).filter(lambda b: b[:1] != b"{"),
    st.dictionaries(st.sampled_from(sorted({"v", "type", "id", *GOOD, "extra"})),
                    st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20),
                    max_size=8).map(
        lambda d: orjson.dumps({**d, "weak": None})),  # never a request: an extra field
    st.sampled_from([registration(kem="X448"), registration(v=True), registration(id="x"),
                     registration(user=""), registration(device="a b"),
                     registration(enc_key=GOOD["sign_key"] + "A"),
                     b'{"type":"register","type":"revoke"}']))
oversized = st.sampled_from([MAX_REQUEST_BYTES + 1, 65_536, 1_048_577]).map(
    lambda n: registration(user="u" * n))
hostile_requests = st.builds(
    Hostile, author=st.sampled_from(["identity", "identity", "mallory", "anonymous"]),
    reply=st.sampled_from(["direct", "direct", "none", "relayd.inbound"]),
    body=st.one_of(weak_registrations, malformed, oversized))


@dataclass(frozen=True)
class RawPoison:
    """Hostile AMQP properties and body, written as raw frames by the identity
    service's user, with or without its user_id."""

    properties: dict[str, hostile.Raw]
    body: bytes
    with_user: bool

    def expected(self) -> str:
        if not all(r.decodable for r in self.properties.values()):
            return "bad_properties"
        if not self.with_user:
            return "unauthenticated"
        if "reply_to" in self.properties:
            return "bad_reply_to"
        return "too_large" if len(self.body) > MAX_REQUEST_BYTES else "malformed"


raw_poisons = st.builds(RawPoison, properties=hostile.properties().map(_no_early_expiry).map(
    lambda p: {k: v for k, v in p.items() if k != "correlation_id"}),
    body=hostile.bodies().filter(lambda b: b[:1] != b"{"), with_user=st.booleans())


class Answers:
    """What arrives on one connection's direct reply-to, by correlation id."""

    def __init__(self) -> None:
        self.got: dict[str, dict[str, Any]] = {}
        self.changed = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.got[message.correlation_id or ""] = orjson.loads(message.body)
        self.changed.set()

    async def wait(self, correlation: str, within_s: float) -> dict[str, Any]:
        async with asyncio.timeout(within_s):
            while correlation not in self.got:
                self.changed.clear()
                await self.changed.wait()
        return self.got[correlation]


def reconnects() -> float:
    return REGISTRY.get_sample_value("relayd_reconnects_total", {"stage": "gdpr"}) or 0.0


class TestHostileRequests:
    @pytest.fixture
    async def world(self, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
        async with door(tmp_path) as d, contextlib.AsyncExitStack() as stack:
            channels, answers = {}, {}
            for who, url in (("identity", d.url), ("mallory", d.mallory_url)):
                connection = await stack.enter_async_context(await aio_pika.connect(url))
                channels[who] = await connection.channel(publisher_confirms=True)
                answers[who] = Answers()
                replies = await channels[who].get_queue("amq.rabbitmq.reply-to", ensure=False)
                await replies.consume(answers[who].on_message, no_ack=True)
            dead: list[AbstractIncomingMessage] = []
            dead_changed = asyncio.Event()

            async def on_dead(message: AbstractIncomingMessage) -> None:
                await message.ack()
                dead.append(message)
                dead_changed.set()

            await (await d.relay.queue(d.relay.settings.topology.dead_queue)).consume(on_dead)
            raw = await stack.enter_async_context(RawPublisher(
                HOST, int(PORT), d.identity, d.password, d.relay.vhost))
            yield {"door": d, "channels": channels, "answers": answers, "dead": dead,
                   "dead_changed": dead_changed, "raw": raw, "valid": []}
            # from the broker's side: every request settled (acks are not confirmed: the
            # broker may apply the last one a moment after it was sent)
            deadline = time.monotonic() + FEW_SECONDS
            while unacked(d.relay.vhost).get("relayd.gdpr") and time.monotonic() < deadline:  # noqa: ASYNC110 - the broker offers no event
                await asyncio.sleep(0.1)
            assert unacked(d.relay.vhost).get("relayd.gdpr") == 0

    @pytest.mark.filterwarnings("ignore:Generating overly large repr")
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=st.lists(hostile_requests | raw_poisons, min_size=1, max_size=5))
    @example(batch=[Hostile("identity", "direct", registration(enc_key=WEAK_X25519[0])),
                    Hostile("identity", "direct", registration(sign_key=WEAK_ED25519[2])),
                    Hostile("mallory", "direct", registration()),
                    Hostile("anonymous", "direct", registration()),
                    Hostile("identity", "relayd.inbound", registration()),
                    Hostile("identity", "direct", registration(user="u" * 1_048_577)),
                    Hostile("identity", "direct", b"\xff{")])
    async def test_each_refused_with_its_reason(self, world: dict[str, Any],
                                                batch: list[Hostile | RawPoison]) -> None:
        """Each hostile request ends in relayd.dead with its typed reason, answered with
        it exactly when it came from the identity service to a direct reply-to; the
        registration sent after each one is answered within seconds; the gdpr worker
        never reconnects, and nothing it holds is left unsettled."""
        d: Door = world["door"]
        dead: list[AbstractIncomingMessage] = world["dead"]
        seen, before = len(dead), reconnects()
        expected_dead: list[str] = []
        expected_answers: list[tuple[str, str, str]] = []  # who, correlation, reason
        unanswered: list[str] = []  # correlations that must get no answer
        exchange = {who: await ch.get_exchange("relayd.gdpr", ensure=False)
                    for who, ch in world["channels"].items()}
        for poison in batch:
            if isinstance(poison, RawPoison):
                properties = {n: r.data for n, r in poison.properties.items()}
                if poison.with_user:
                    properties["user_id"] = short(d.identity.encode())
                outcome = await world["raw"].publish("relayd.gdpr", "", poison.body, properties)
                if outcome.result == "ack":
                    expected_dead.append(poison.expected())
            else:
                who = "mallory" if poison.author == "mallory" else "identity"
                correlation = str(uuid.uuid4())
                reply_to = {"direct": "amq.rabbitmq.reply-to", "none": None,
                            "relayd.inbound": "relayd.inbound"}[poison.reply]
                await exchange[who].publish(aio_pika.Message(
                    poison.body, reply_to=reply_to, correlation_id=correlation,
                    user_id=None if poison.author == "anonymous" else
                    (d.mallory if who == "mallory" else d.identity)), routing_key="")
                reason, answered = poison.expected()
                expected_dead.append(reason)
                if answered:
                    expected_answers.append((who, correlation, reason))
                else:
                    unanswered.append(correlation)
            # valid traffic behind it: a registration, answered within seconds
            valid = DeviceKeys.generate(f"valid-{len(world['valid'])}")
            world["valid"].append(valid.device)
            correlation = str(uuid.uuid4())
            await exchange["identity"].publish(aio_pika.Message(
                orjson.dumps({"v": 1, "type": "register", "id": str(uuid.uuid4()),
                              **valid.registration(ALICE)}),
                reply_to="amq.rabbitmq.reply-to", correlation_id=correlation,
                user_id=d.identity), routing_key="")
            assert await world["answers"]["identity"].wait(correlation, FEW_SECONDS) == {
                **ACCEPTED, "outcome": "registered"}
        for who, correlation, reason in expected_answers:
            assert await world["answers"][who].wait(correlation, FEW_SECONDS) == {
                "v": 1, "type": "answer", "accepted": False, "reason": reason}
        async with asyncio.timeout(FEW_SECONDS * 2):
            while len(dead) - seen < len(expected_dead):
                world["dead_changed"].clear()
                await world["dead_changed"].wait()
        reasons = [str(m.headers["x-relayd-reason"]) for m in dead[seen:]]
        assert sorted(reasons) == sorted(expected_dead)
        # each refusal is answered before it is dead-lettered: the others never will be
        assert not set(unanswered) & set(world["answers"]["identity"].got)
        assert world["answers"]["mallory"].got == {}  # relayd answers the identity service only
        assert reconnects() == before
        assert {device.id for device in await d.relay.store.devices()} == set(world["valid"])
