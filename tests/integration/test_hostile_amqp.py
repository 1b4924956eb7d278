"""Poison costs only itself: hostile AMQP messages at both doors, among valid traffic.

Devices' messages enter at relayd.ingress (published by the edge's broker user) and
businesses' replies at relayd.replies (published by a business's user, confined exactly as
`relayd business add` confines one). The hostile messages are written as raw frames
(tests/support/raw_amqp.py), as an attacker would, with properties from
tests/support/hostile.py: every field-table type, out-of-range values, invalid UTF-8 in
every string property and header, huge and deeply nested tables, bodies of every size.
After each one, a device of another user sends a numbered message to another business,
and that business replies with a numbered message.

Each example checks: every valid message arrives, each within FEW_SECONDS of the poison
before it; every poison the broker accepted ends in relayd.dead (with `bad_properties`
exactly when relayd.wire could not decode its properties) or, a decodable reply with a
business's user_id, as an error event in that business's inbox; nothing is left unacked;
relayd's worker connections were never dropped.

RELAYD_HOSTILE_EXAMPLES sets the number of hypothesis examples (default 10, each a batch
of up to 6 poisons); a long run uses, for example, 300.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from relayd import wire
from relayd.client import DeviceKeys, parse_event
from tests.integration.harness import (
    BROKER,
    Relay,
    add_amqp_user,
    confine_business,
    documented_permissions,
    rabbitmqctl,
    relay_in_vhost,
)
from tests.support import hostile
from tests.support.raw_amqp import RawPublisher, long, short, table

EXAMPLES = int(os.environ.get("RELAYD_HOSTILE_EXAMPLES", "10"))
FEW_SECONDS = 10.0  # how long after a poison the valid message behind it may take
HOST, PORT = BROKER.rsplit(":", 1)
USER = "bob@example.org"


@dataclass(frozen=True)
class Poison:
    """One hostile message: which door, its raw properties, its body; at the business door
    also its routing key and whether it carries the business's user_id."""

    door: str  # "device" or "business"
    properties: dict[str, hostile.Raw]
    body: bytes
    routing_key: bytes
    with_user: bool

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 32 else self.body[:32] + b"..."
        return (f"Poison({self.door!r}, {self.properties!r}, body={body!r} ({len(self.body)} "
                f"bytes), routing_key={self.routing_key!r}, with_user={self.with_user})")

    @property
    def decodable(self) -> bool:
        return all(r.decodable for r in self.properties.values())


def _no_early_expiry(properties: dict[str, hostile.Raw]) -> dict[str, hostile.Raw]:
    """A short expiration could let the broker expire a poison before relayd sees it:
    keep the ones the broker refuses and long ones."""
    raw = properties.get("expiration")
    if raw is not None and raw.data[1:].isdigit() and int(raw.data[1:]) < 10**9:
        properties = {**properties, "expiration": hostile.Raw(short(b"9999999999"), True)}
    return properties


poisons = st.builds(
    Poison,
    door=st.sampled_from(["device", "business"]),
    properties=hostile.properties().map(_no_early_expiry),
    body=hostile.bodies(),
    routing_key=st.sampled_from([b"acme", b"acme", b"acme", b"globex", b"\xff\xfe", b"#"]),
    with_user=st.booleans())


@dataclass(frozen=True)
class Delivered:
    headers: dict[str, Any]
    body: bytes


@dataclass
class Inbox:
    """Everything one queue delivered, as it arrives, with the time it arrived; without
    their bodies unless `bodies` (a dead-lettered poison may be 1 MiB)."""

    bodies: bool = True
    messages: list[tuple[float, Delivered]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        self.messages.append((time.monotonic(), Delivered(
            dict(message.headers or {}), message.body if self.bodies else b"")))
        self.changed.set()

    async def wait(self, done: Callable[[], bool], within_s: float) -> None:
        async with asyncio.timeout(within_s):
            while not done():
                self.changed.clear()
                await self.changed.wait()


class World:
    """The relay and the parties around it, shared by the examples of one test (a plain
    class: hypothesis prints a failing example's arguments, and would print a dataclass's
    every field)."""

    def __init__(self, relay: Relay, phone: DeviceKeys, conversation: str, edge: RawPublisher,
                 acme: RawPublisher, acme_user: str, globex_user: str,
                 globex: aio_pika.abc.AbstractChannel, inboxes: dict[str, Inbox],
                 connections: set[str]) -> None:
        self.relay, self.phone, self.conversation = relay, phone, conversation
        self.edge, self.acme, self.acme_user = edge, acme, acme_user
        self.globex_user, self.globex, self.inboxes = globex_user, globex, inboxes
        self.connections = connections
        self.lags: list[float] = []
        self.counts: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"World(vhost={self.relay.vhost!r})"


def reconnects() -> float:
    return sum(REGISTRY.get_sample_value("relayd_reconnects_total", {"stage": s}) or 0.0
               for s in ("inbound", "outbound"))


def in_flight() -> float:
    return sum(REGISTRY.get_sample_value("relayd_in_flight_messages", {"stage": s}) or 0.0
               for s in ("inbound", "outbound"))


def connections_of(vhost: str, user: str) -> set[str]:
    """The broker's names of `user`'s connections in `vhost`."""
    lines = rabbitmqctl("list_connections", "-q", "--no-table-headers", "vhost", "user",
                        "name").splitlines()
    return {name for v, u, name in (line.split("\t") for line in lines if line)
            if (v, u) == (vhost, user)}


def unacked(vhost: str) -> dict[str, int]:
    lines = rabbitmqctl("list_queues", "-q", "--no-table-headers", "-p", vhost, "name",
                        "messages_unacknowledged").splitlines()
    return {name: int(count) for name, count in (line.split("\t") for line in lines if line)}


@pytest.fixture(params=[1, 2], ids=["one queue", "sharded"])
async def world(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    """A relay in its own vhost: acme (the hostile business) and globex, each with a broker
    user confined as `business add` confines one; an edge user with the permissions
    deploy/rabbitmq/README.md gives a gateway of one's own; bob's phone in a
    conversation with globex. Sharded, the poison meets the routers first, then the
    shards' consumers."""
    async with relay_in_vhost(tmp_path, topology={"shards": request.param}) as relay:
        users: list[str] = []
        try:
            acme_user, acme_password = confine_business(relay, "acme")
            globex_user, globex_password = confine_business(relay, "globex")
            edge_user = f"edge-{secrets.token_hex(4)}"
            edge_password = add_amqp_user(relay.vhost, edge_user)
            users += [acme_user, globex_user, edge_user]
            rights = documented_permissions()["gateway"]  # deploy/rabbitmq/README.md's
            rabbitmqctl("set_permissions", "-p", relay.vhost, edge_user, rights["configure"],
                        rights["write"], rights["read"])
            await relay.add_business("acme", amqp_user=acme_user)
            await relay.add_business("globex", amqp_user=globex_user)
            phone = await relay.add_device(USER, "phone")
            await relay.start()
            await relay.send(phone, "globex", "start", {"text": "hello"})
            [start] = await relay.events("globex", 1)

            inboxes = {name: Inbox(bodies=name != "dead")
                       for name in ("globex", "acme", "phone", "dead")}
            t = relay.settings.topology
            for name, queue in (("globex", relay.inbox("globex")), ("acme", relay.inbox("acme")),
                                ("phone", relay.device_queue(phone)), ("dead", t.dead_queue)):
                await (await relay.queue(queue)).consume(inboxes[name].on_message)
            connection = await aio_pika.connect(
                f"amqp://{globex_user}:{globex_password}@{BROKER}/{relay.vhost}")
            async with (connection,
                        RawPublisher(HOST, int(PORT), edge_user, edge_password,
                                     relay.vhost) as edge,
                        RawPublisher(HOST, int(PORT), acme_user, acme_password,
                                     relay.vhost) as acme):
                globex = await connection.channel(publisher_confirms=True)
                w = World(relay, phone, start["conversation"], edge, acme, acme_user,
                          globex_user, globex, inboxes, connections_of(relay.vhost, "guest"))
                yield w
                # after every example, from the broker's side: everything settled, and
                # relayd's connections are the very ones it opened (never dropped)
                deadline = time.monotonic() + FEW_SECONDS  # acks are not confirmed: the
                while True:  # broker may apply the last ones a moment after they are sent
                    left = {q: n for q, n in unacked(relay.vhost).items()
                            if q.startswith(("relayd.inbound", "relayd.outbound"))}
                    settled = len(left) >= 2 and not any(left.values())
                    if settled or time.monotonic() > deadline:
                        break
                assert settled, left
                assert connections_of(relay.vhost, "guest") == w.connections
                # the figures for docs/reliability.md (shown with pytest -s)
                print(f"\nhostile AMQP: {dict(sorted(w.counts.items()))}; valid "
                      f"messages {len(w.lags)}, slowest {max(w.lags, default=0):.2f} s after "
                      f"the poison before it")
        finally:
            for user in users:
                rabbitmqctl("delete_user", user)


async def publish(w: World, poison: Poison) -> str:
    """Publish one poison at its door; what the broker made of it."""
    if poison.door == "device":
        outcome = await w.edge.publish(w.relay.settings.topology.ingress_exchange, "inbound",
                                       poison.body, {n: r.data for n, r in
                                                     poison.properties.items()})
    else:
        raw = {n: r.data for n, r in poison.properties.items()}
        if poison.with_user:
            raw["user_id"] = short(w.acme_user.encode())
        outcome = await w.acme.publish(w.relay.settings.topology.replies_exchange,
                                       poison.routing_key, poison.body, raw)
    return outcome.result


def expected(poison: Poison) -> str:
    """Where an accepted poison ends: "dead:bad_properties", "dead" (another reason) or
    "error" (an error event in acme's inbox)."""
    if not poison.decodable:
        return "dead:bad_properties"
    if poison.door == "business" and poison.with_user:
        return "error"
    return "dead"


class TestPoisonCostsOnlyItself:
    # a failing example names the bytes it was built from; some are 60 kB long
    @pytest.mark.filterwarnings("ignore:Generating overly large repr")
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],  # shrinking a broker run takes ages
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=st.lists(poisons, min_size=1, max_size=6))
    @example(batch=[  # what issue 13 found, at both doors
        Poison(door, {name: hostile.Raw(value, False)}, b"x" * 40, b"acme", True)
        for door in ("device", "business") for name, value in (
            ("headers", table([(b"k", b"S" + long(b"\xff"))])),
            ("headers", table([(b"k", b"T" + b"\xff" * 8)])),
            ("content_type", short(b"\xc3")),
            ("timestamp", b"\xff" * 8),
        )])
    @example(batch=[  # relayd's own header names, written by a publisher
        Poison(door, {"headers": hostile.Raw(table([(name, b"S" + long(b"forged"))]), True)},
               b"x" * 40, b"acme", True)
        for door in ("device", "business") for name in (
            wire.BAD_PROPERTIES.encode(), b"x-relayd-amqp-user", b"x-relayd-reason")])
    async def test_hostile_messages_at_both_doors(self, world: World,
                                                  batch: list[Poison]) -> None:
        """Each poison ends where it should and costs nobody else anything."""
        w = world
        reconnects_before, in_flight_before = reconnects(), in_flight()
        seen = {name: len(inbox.messages) for name, inbox in w.inboxes.items()}
        sent_at: dict[str, float] = {}
        up_ids: list[str] = []
        reply_ids: list[str] = []
        ends: list[str] = []  # where each poison the broker took must end
        signed = 0  # of those, replies with bad properties and the business's user_id
        unknown: list[str] = []  # the same for those it did not answer: taken or not
        most_in_flight = 0.0
        for i, poison in enumerate(batch):
            result = await publish(w, poison)
            taken = f"{poison.door} door: {result}"
            w.counts[taken] = w.counts.get(taken, 0) + 1
            if result == "ack":
                ends.append(expected(poison))
                signed += (poison.door == "business" and poison.with_user
                           and not poison.decodable)
            elif result == "timeout":
                unknown.append(expected(poison))
            up = await w.relay.send(w.phone, "globex", "message", {"text": f"up {i}"})
            reply = await w.relay.reply("globex", w.conversation, "message",
                                        {"text": f"down {i}"}, user_id=w.globex_user,
                                        channel=w.globex)
            sent_at[up] = sent_at[reply] = time.monotonic()
            up_ids.append(up)
            reply_ids.append(reply)
            most_in_flight = max(most_in_flight, in_flight() - in_flight_before)

        def arrived(name: str) -> list[tuple[float, Delivered]]:
            return w.inboxes[name].messages[seen[name]:]

        # every valid message, both ways, each within a few seconds of the poison before it
        await w.inboxes["globex"].wait(lambda: len(arrived("globex")) >= len(up_ids),
                                       FEW_SECONDS * len(batch))
        await w.inboxes["phone"].wait(lambda: len(arrived("phone")) >= len(reply_ids),
                                      FEW_SECONDS * len(batch))
        events = [(at, parse_event(m.body)) for at, m in arrived("globex")]
        downs = [(at, w.phone.open(w.relay.public, m.body)) for at, m in arrived("phone")]
        assert [e["id"] for _, e in events] == up_ids
        assert [d["id"] for _, d in downs] == reply_ids
        lags = [at - sent_at[m["id"]] for at, m in events + downs]
        w.lags.extend(lags)
        assert max(lags) < FEW_SECONDS

        # every accepted poison where it belongs, and nothing else there
        dead_expected = sum(end.startswith("dead") for end in ends)
        errors_expected = ends.count("error")
        await w.inboxes["dead"].wait(lambda: len(arrived("dead")) >= dead_expected,
                                     FEW_SECONDS * 2)
        await w.inboxes["acme"].wait(lambda: len(arrived("acme")) >= errors_expected,
                                     FEW_SECONDS * 2)
        dead = [m for _, m in arrived("dead")]
        reasons = [str(m.headers.get("x-relayd-reason")) for m in dead]
        if not unknown:
            assert len(dead) == dead_expected
            assert reasons.count("bad_properties") == ends.count("dead:bad_properties")
        for message in dead:  # only what relayd set or checked, never a poison's own
            assert set(message.headers) <= {
                "x-relayd-reason", "x-relayd-queue", "x-relayd-amqp-user", "relayd-kid",
                wire.BAD_PROPERTIES}
        bad = [m.headers for m in dead if m.headers.get("x-relayd-reason") == "bad_properties"]
        assert all(wire.BAD_PROPERTIES in headers for headers in bad)
        assert all(wire.BAD_PROPERTIES not in m.headers  # nor a publisher's words under it
                   for m in dead if m.headers.get("x-relayd-reason") != "bad_properties")
        if not unknown:  # the broker-validated user_id of a bad reply reaches relayd
            assert [h.get("x-relayd-amqp-user") for h in bad].count(w.acme_user) == signed
        for outcome in [f"ended dead: {r}" for r in reasons] + ["ended as error event"] * len(
                arrived("acme")):
            w.counts[outcome] = w.counts.get(outcome, 0) + 1
        errors = [parse_event(m.body) for _, m in arrived("acme")]
        assert all(e["type"] == "error" for e in errors)
        if not unknown:
            assert len(errors) == errors_expected

        # settled, all of it, on the connections relayd started with
        # settled, on the connections relayd started with (the broker's own view of both
        # is checked once at the end, by the fixture: rabbitmqctl takes seconds)
        assert most_in_flight < w.relay.settings.workers.prefetch
        async with asyncio.timeout(FEW_SECONDS):  # a gauge in this process: no event to wait on
            while in_flight() > in_flight_before:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert reconnects() == reconnects_before
        assert w.relay.tasks
        assert not any(task.done() for task in w.relay.tasks)
