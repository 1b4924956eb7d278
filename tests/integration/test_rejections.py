"""Bad input of every kind is rejected with its reason while valid traffic flows on."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aio_pika
import orjson
import pytest
from structlog.testing import capture_logs

from relayd import envelope, topology
from relayd.client import DeviceKeys
from relayd.crypto import Kem, b64e
from relayd.errors import ExitCode
from relayd.store import Device
from tests.integration.harness import WAIT, Relay, add_amqp_user, amqp_url, relay_in_vhost

USER = "alice@example.org"


def reasons(messages: list[aio_pika.abc.AbstractIncomingMessage]) -> list[str]:
    return sorted(str(m.headers["x-relayd-reason"]) for m in messages)


class TestInboundRejections:
    async def test_every_bad_envelope_is_dead_lettered_with_its_reason(
            self, tmp_path: Path) -> None:
        """Replayed, tampered, garbage, oversized, unknown, forged, stale and misaddressed
        envelopes each land in relayd.dead with their reason; a valid one still arrives."""
        async with relay_in_vhost(tmp_path, limits={"max_envelope_bytes": 4096}) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device(USER, "phone")
            await relay.start()

            first = phone.seal(relay.public, phone.payload("acme", "start"))
            await relay.publish_up(first)
            [start] = await relay.events("acme", 1)
            await relay.publish_up(first)  # replayed
            tampered = bytearray(phone.seal(relay.public, phone.payload("acme", "message",
                                                                         {"text": "x"})))
            tampered[40] ^= 1
            await relay.publish_up(bytes(tampered))
            await relay.publish_up(os.urandom(300))  # garbage: fails to decrypt
            await relay.publish_up(b"short")  # garbage: shorter than the KEM's enc
            await relay.publish_up(os.urandom(5000))  # oversized
            ghost = DeviceKeys.generate("ghost")
            await relay.publish_up(ghost.seal(relay.public, ghost.payload("acme", "start")))
            forged = DeviceKeys.generate("phone")  # right id, wrong key
            await relay.publish_up(forged.seal(relay.public, forged.payload("acme", "start")))
            await relay.publish_up(phone.seal(relay.public, phone.payload(
                "acme", "message", {"text": "old"}, ts=int(time.time() * 1000) - 30 * 86400_000)))
            await relay.publish_up(phone.seal(relay.public, phone.payload("acme", "message",
                                                                          {"text": "?"})), kid="k9")
            await relay.publish_up(phone.seal(relay.public, phone.payload("acme", "message",
                                                                          {"text": "?"})), kid="")
            await relay.publish_up(phone.seal(relay.public, phone.payload("nobody", "start")))
            await relay.publish_up(phone.seal(relay.public, orjson.dumps(
                {"v": 1, "device": "phone", "seq": 99, "extra": True})))
            await relay.publish_up(phone.seal(relay.public, phone.payload("acme", "message",
                                                                          {"text": 5})))

            dead = await relay.dead(13)
            assert reasons(dead) == sorted([
                "replayed", "decrypt_failed", "decrypt_failed", "malformed", "too_large",
                "unknown_device", "bad_signature", "stale", "bad_kid", "bad_kid",
                "unknown_business", "malformed", "malformed"])
            assert all(m.headers["x-relayd-queue"] == "relayd.inbound" for m in dead)

            text_id = await relay.send(phone, "acme", "message", {"text": "still here"})
            [event] = await relay.events("acme", 1)
            assert (event["id"], event["conversation"]) == (text_id, start["conversation"])
            await relay.assert_empty(relay.inbox("acme"), relay.settings.topology.dead_queue)

    async def test_closed_or_missing_conversation(self, relay: Relay) -> None:
        """Typing into a conversation that does not exist, or a second close, is refused."""
        await relay.add_business("acme")
        phone = await relay.add_device(USER, "phone")
        await relay.start()
        await relay.send(phone, "acme", "typing_start")
        [dead] = await relay.dead(1)
        assert dead.headers["x-relayd-reason"] == "unknown_conversation"
        await relay.send(phone, "acme", "start")
        await relay.send(phone, "acme", "close")
        await relay.send(phone, "acme", "close")
        await relay.send(phone, "acme", "read")
        assert [e["type"] for e in await relay.events("acme", 2)] == ["start", "close"]
        assert reasons(await relay.dead(2)) == ["conversation_closed", "conversation_closed"]


class TestReplyRejections:
    async def test_each_bad_reply_gets_its_error_and_reaches_no_device(
            self, relay: Relay) -> None:
        """Unknown, closed, foreign, invalid, oversized and misrouted replies are answered
        with error events; replies without a trusted user_id are dead-lettered."""
        await relay.add_business("acme")
        password = add_amqp_user(relay.vhost, f"{relay.vhost}-globex")
        globex_user = f"{relay.vhost}-globex"
        phone = await relay.add_device(USER, "phone")
        laptop = await relay.add_device(USER, "laptop")
        await relay.start()
        await relay.send(phone, "acme", "start")
        await relay.send(phone, "acme", "start", {"text": "second"})  # keeps it open
        start, _ = await relay.events("acme", 2)
        conversation = start["conversation"]
        await relay.received(laptop, 2)
        globex = await aio_pika.connect(amqp_url(globex_user, password, relay.vhost))
        async with globex:
            as_globex = await globex.channel(publisher_confirms=True)
            # a broker user that maps to no business yet
            await relay.reply("globex", conversation, "message", {"text": "hi"},
                              user_id=globex_user, channel=as_globex)
            [dead] = await relay.dead(1)
            assert dead.headers["x-relayd-reason"] == "unknown_business"
            await relay.add_business("globex", amqp_user=globex_user)
            foreign = await relay.reply("globex", conversation, "message", {"text": "hi"},
                                        user_id=globex_user, channel=as_globex)
            [error] = await relay.events("globex", 1)
            assert (error["code"], error["ref"], error["conversation"]) == (
                "not_your_conversation", foreign, conversation)

        unknown = await relay.reply("acme", "a" * 32, "message", {"text": "x"})
        await relay.reply("acme", conversation, "message", raw=b"{not json")
        invalid = await relay.reply("acme", conversation, "message", {"text": 7})
        large = await relay.reply("acme", conversation, "message", {"text": "x" * 2_000_000})
        misrouted = await relay.reply("acme", conversation, "message", {"text": "x"},
                                      routing_key="globex")
        await relay.reply("acme", conversation, "message", {"text": "anonymous"}, user_id=None)
        errors = {e["ref"]: e for e in await relay.events("acme", 5)}
        assert errors[unknown]["code"] == "unknown_conversation"
        assert errors[None]["code"] == "invalid"
        assert errors[invalid]["code"] == "invalid"
        assert errors[large]["code"] == "too_large"
        assert errors[misrouted]["code"] == "invalid"
        [dead] = await relay.dead(1)
        assert dead.headers["x-relayd-reason"] == "unauthenticated"

        await relay.send(phone, "acme", "close")
        await relay.events("acme", 1)
        await relay.received(laptop, 1)
        closed = await relay.reply("acme", conversation, "message", {"text": "late"})
        [error] = await relay.events("acme", 1)
        assert (error["code"], error["ref"]) == ("conversation_closed", closed)
        await relay.assert_empty(relay.device_queue(phone), relay.device_queue(laptop),
                                 relay.settings.topology.dead_queue)


async def until_logged_held() -> None:
    """Until a worker logs that it holds a message (the log is the only sign of it)."""
    with capture_logs() as logs:
        async with asyncio.timeout(WAIT):
            while not any(line["event"] == "held" for line in logs):  # noqa: ASYNC110
                await asyncio.sleep(0.05)


class TestTransientFailures:
    async def test_unroutable_output_is_held_until_it_can_be_routed(
            self, relay: Relay) -> None:
        """A publish that nothing can route (the business's inbox is gone) is held in
        place, past workers.max_attempts, and delivered once the inbox is back."""
        await relay.add_business("acme")
        phone = await relay.add_device(USER, "phone")
        await relay.channel.queue_delete(relay.inbox("acme"))
        await relay.start()
        started = await relay.send(phone, "acme", "start")
        await until_logged_held()
        await topology.declare(relay.channel, topology.business(
            relay.settings.topology, "acme", relay.keyring.opaque_secret))
        [event] = await relay.events("acme", 1)
        assert event["id"] == started
        await relay.assert_empty(relay.settings.topology.inbound_queue,
                                 relay.settings.topology.dead_queue)

    async def test_held_beyond_the_device_ttl_is_dead_lettered(self, tmp_path: Path) -> None:
        """A message held longer than topology.device_message_ttl_days is given up:
        dead-lettered as retries_exhausted."""
        async with relay_in_vhost(tmp_path, topology={
                "device_message_ttl_days": 1 / 86400}) as relay:  # a second
            await relay.add_business("acme")
            phone = await relay.add_device(USER, "phone")
            await relay.channel.queue_delete(relay.inbox("acme"))
            await relay.start()
            await relay.send(phone, "acme", "start")
            [dead] = await relay.dead(1)
            assert dead.headers["x-relayd-reason"] == "retries_exhausted"
            await relay.assert_empty(relay.settings.topology.inbound_queue)

    async def test_refused_error_event_dead_letters_the_reply_at_once(
            self, relay: Relay) -> None:
        """When a business's inbox refuses its error event, the reply goes to relayd.dead
        under its error code, without retries holding a worker slot."""
        await relay.add_business("acme")
        await relay.channel.queue_delete(relay.inbox("acme"))
        await relay.start("outbound")
        await relay.reply("acme", "a" * 32, "message", {"text": "x"})
        [dead] = await relay.dead(1)
        assert dead.headers["x-relayd-reason"] == "unknown_conversation"
        assert dead.headers["x-relayd-queue"] == "relayd.outbound"


class TestWeakKeys:
    async def test_identity_point_forgery_no_longer_reaches_a_business(
            self, relay: Relay) -> None:
        """`device add` refuses the identity point as a signing key; a device that holds it
        in the store anyway (registered before keys were checked) cannot speak: a message
        made without any secret, signature (R = identity, S = 0), is dead-lettered as
        bad_signature, and a healthy device is heard as before."""
        await relay.add_business("acme")
        phone = await relay.add_device(USER, "phone")
        identity = (1).to_bytes(32, "little")
        mallory = DeviceKeys.generate("mallory")
        code, _ = await relay.cli("device", "add", "--user", USER, "--device", "mallory",
                                  f"--enc-key={b64e(mallory.enc_public)}",
                                  f"--sign-key={b64e(identity)}")
        assert code == ExitCode.USAGE
        assert await relay.store.device("mallory") is None

        await relay.store.add_device(Device("mallory", USER, Kem.X25519, mallory.enc_public,
                                            identity))
        await relay.start()
        forged = identity + bytes(32)
        for kind in ("start", "message"):
            payload = mallory.payload("acme", kind, {"text": "no secret"} if kind == "message"
                                      else {})
            body = relay.public.kem.suite.encrypt(
                forged + payload, relay.public.kem.public_key(relay.public.enc_public_key),
                info=envelope.info("up", relay.public.kid))
            await relay.publish_up(body)
        assert reasons(await relay.dead(2)) == ["bad_signature", "bad_signature"]

        start_id = await relay.send(phone, "acme", "start")
        [event] = await relay.events("acme", 1)
        assert event["id"] == start_id
        await relay.assert_empty(relay.inbox("acme"), relay.settings.topology.dead_queue)


class TestDeadLetterBounds:
    """What one party can put in relayd.dead is bounded (docs/reliability.md, "Dead
    letters")."""

    async def test_input_of_no_established_sender_keeps_no_body(
            self, tmp_path: Path) -> None:
        """Replies without user_id (2 MiB each, more than the business's rate allows),
        an envelope of an unknown device and one for an unknown business are
        dead-lettered with their reason and ids but without their bodies."""
        async with relay_in_vhost(tmp_path, limits={"business_rate": 1,
                                                     "business_burst": 1}) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device(USER, "phone")
            await relay.start()
            junk = orjson.dumps({"junk": "x" * (2 * 1024 * 1024 - 100)})
            for _ in range(3):
                await relay.reply("acme", "a" * 32, "message", raw=junk, user_id=None)
            ghost = DeviceKeys.generate("ghost")
            await relay.publish_up(ghost.seal(relay.public, ghost.payload("acme", "start")))
            await relay.publish_up(phone.seal(relay.public, phone.payload("nobody", "start")))
            dead = await relay.dead(5)
            assert reasons(dead) == ["unauthenticated"] * 3 + ["unknown_business",
                                                                 "unknown_device"]
            assert [m.body for m in dead] == [b""] * 5

    @pytest.mark.parametrize(("bound", "sizes", "kept"), [
        ({"dead_queue_max_length": 3}, [10] * 5, 3),
        ({"dead_queue_max_bytes": 1000}, [600] * 3, 1)])
    async def test_relayd_dead_drops_its_oldest_beyond_its_bounds(
            self, tmp_path: Path, bound: dict[str, int], sizes: list[int], kept: int) -> None:
        """Past topology.dead_queue_max_length or dead_queue_max_bytes, relayd.dead drops
        its oldest dead letters: it keeps the newest, and accepts every new one."""
        async with relay_in_vhost(tmp_path, topology=bound) as relay:
            t = relay.settings.topology
            dead = await relay.channel.get_exchange(t.dead_exchange)
            for i, size in enumerate(sizes):
                await dead.publish(aio_pika.Message(b"x" * size, message_id=str(i)),
                                   routing_key="test")  # confirmed: in the queue, or dropped
            assert await relay.depth(t.dead_queue) == kept
            newest = [str(i) for i in range(len(sizes) - kept, len(sizes))]
            assert [m.message_id for m in await relay.dead(kept)] == newest
