"""No input bytes in any log line: a real `relayd run` fed marked bytes at every door.

A random marker goes into every field relayd reads (and some it does not): bodies,
headers, AMQP properties, device and business ids, replies, erase requests, a header
that is not UTF-8, the broker's own close reason. Then the stdout and stderr of the
relayd processes (supervisor and workers) are scanned for the marker in every encoding
a log line could carry it in.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from relayd.client import DeviceKeys
from relayd.crypto import b64e
from tests.integration.harness import WAIT, Relay, rabbitmqctl, relay_in_vhost

USER = "alice@example.org"
MARK = "zqmark" + secrets.token_hex(8)  # lower-case alphanumerics: no encoding hides it
BURST = 5  # limits.device_burst: each device below sends at most 4 that count


class RawStr(str):
    """A header string whose bytes on the wire are `raw`, valid UTF-8 or not."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawStr:
        text = super().__new__(cls, raw.decode("latin-1"))
        text.raw = raw
        return text

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


def _stable(encode: Any, block: int, data: bytes) -> list[str]:
    """What encode(data) shows whatever the data's offset in a longer input: for each
    alignment, the part of the encoding that does not depend on the bytes around it."""
    forms = []
    for shift in range(block):
        text = encode(bytes(shift) + data + bytes(block)).decode()
        per_byte = len(encode(bytes(block))) / block
        start, end = int((shift + 1) * per_byte) + 1, int((shift + len(data)) * per_byte) - 1
        forms.append(text[start:end])
    return forms


def encodings(mark: str) -> list[str]:
    """The marker as it could appear in a line: raw, hex, base64 (both alphabets), base32,
    escaped UTF-16, at any alignment."""
    data = mark.encode()
    return [mark, data.hex(), *_stable(base64.b64encode, 3, data),
            *_stable(base64.urlsafe_b64encode, 3, data), *_stable(base64.b32encode, 5, data),
            repr(mark.encode("utf-16-le"))[2:-1]]


class TestEncodings:
    def test_forms_are_found_in_encoded_input(self) -> None:
        """Each stable form is found in the encoding of any input that holds the marker."""
        for prefix in (b"", b"a", b"ab", b"abc", b"abcd"):
            data = prefix + MARK.encode() + b"tail"
            encoded = [data.hex(), base64.b64encode(data).decode(),
                       base64.urlsafe_b64encode(data).decode(), base64.b32encode(data).decode()]
            assert all(any(form in text for form in encodings(MARK)) for text in encoded)


async def _consuming(relay: Relay, *queues: str) -> None:
    """Until every queue has a consumer: relayd is up (the broker offers no event)."""
    async def consumers(name: str) -> int:
        channel = await relay.connection.channel()
        declared = await channel.declare_queue(name, passive=True)
        await channel.close()
        return int(declared.declaration_result.consumer_count or 0)

    async with asyncio.timeout(WAIT * 2):
        while not all([await consumers(q) for q in queues]):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def _covered(relay: Relay, queue: str, expected: list[str],
                   key: Callable[[AbstractIncomingMessage], str]) -> None:
    """Take messages from `queue` until their keys include every one of `expected` (as a
    multiset); others, such as what the input that is not UTF-8 became, are let be."""
    missing = Counter(expected)
    async with asyncio.timeout(WAIT):
        while +missing:
            [message] = await relay.take(queue, 1)
            missing[key(message)] -= 1


def _spawn(relay: Relay) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = relay.root / "relayd.stdout", relay.root / "relayd.stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "relayd", "run", "--config", str(relay.config_path)],
            stdout=stdout, stderr=stderr, start_new_session=True)
    return process, out, err


class TestNoInputInLogs:
    async def test_marked_input_at_every_door_never_reaches_a_log_line(
            self, tmp_path: Path) -> None:
        """Bad envelopes of every reason, bad replies, bad erase requests, hostile AMQP
        properties, a header that is not UTF-8 and a broker close reason, all carrying
        the marker, go through a real `relayd run` at debug level; its stdout and stderr
        hold every reason and not one form of the marker."""
        async with relay_in_vhost(
                tmp_path, logging={"level": "debug"}, gdpr={"identity_user": "guest"},
                limits={"device_rate": 0.01, "device_burst": BURST, "max_envelope_bytes": 4096},
        ) as relay:
            await relay.add_business("acme")
            await relay.add_business("quiet", "quiet-user")
            phone = await relay.add_device(USER, "phone")
            laptop = await relay.add_device(USER, "laptop")
            tablet = await relay.add_device(USER, "tablet")
            flood = await relay.add_device("bob", "flood")
            process, out, err = _spawn(relay)
            try:
                t = relay.settings.topology
                await _consuming(relay, t.inbound_queue, t.outbound_queue, t.gdpr_queue)
                dead, errors = await _feed(relay, phone, laptop, tablet, flood)
                await _covered(relay, t.dead_queue, dead,
                               lambda m: str((m.headers or {}).get("x-relayd-reason")))
                await _covered(relay, relay.inbox("acme"), errors,
                               lambda m: str(orjson.loads(m.body).get("code")))

                rabbitmqctl("close_all_connections", "--vhost", relay.vhost, f"by {MARK}")
                await relay.reconnect()
                await _consuming(relay, t.inbound_queue, t.outbound_queue, t.gdpr_queue)
                sent = await relay.send(phone, "acme", "message", {"text": MARK})
                await _covered(relay, relay.inbox("acme"), [sent],
                               lambda m: str(orjson.loads(m.body).get("id")))
            finally:
                process.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(process.wait, WAIT * 2)
            assert code == 0
            logs = out.read_text(errors="replace") + err.read_text(errors="replace")
            lines = [orjson.loads(line) for line in out.read_text().splitlines()]
            handled = {(line.get("outcome"), line.get("reason")) for line in lines
                       if line.get("event") == "handled"}
            assert {("dead_lettered", reason) for reason in dead} <= handled
            assert any(line.get("event") == "erased" for line in lines)
            for form in encodings(MARK):
                assert form.lower() not in logs.lower(), f"{form!r} is in relayd's output"


async def _feed(relay: Relay, phone: DeviceKeys, laptop: DeviceKeys, tablet: DeviceKeys,
                flood: DeviceKeys) -> tuple[list[str], list[str]]:
    """Publish every kind of bad input with the marker in it; return the dead-letter
    reasons to expect, and the codes of the error events acme must get."""
    t, mark = relay.settings.topology, MARK.encode()
    ingress = await relay.channel.get_exchange(t.ingress_exchange)
    replies = await relay.channel.get_exchange(t.replies_exchange)
    erasures = await relay.channel.get_exchange(t.gdpr_exchange)
    hostile = {"message_id": MARK, "type": MARK, "app_id": MARK, "correlation_id": MARK,
               "headers": {f"x-{MARK}": MARK, "nested": {"k": [MARK, 1]}}}
    # Headers the AMQP client reads back as bytes (not UTF-8, a byte array): what they
    # become is the concern of the property guard; here, only that no line quotes them.
    poison = [{"x-raw": RawStr(mark + b"\xff\xfe" + mark)}, {"x-raw": RawStr(b"\xc3" + mark)},
              {"x-bytes": bytearray(mark)}, {"nested": {"k": [bytearray(mark)]}}]

    async def up(body: bytes, kid: str | None = None, **properties: Any) -> None:
        headers = {"relayd-kid": kid or relay.public.kid, **properties.pop("headers", {})}
        await ingress.publish(aio_pika.Message(body, headers=headers, **properties), "inbound")

    async def answer(body: bytes, routing_key: str = "acme", user_id: str | None = "guest",
                     **properties: Any) -> None:
        await replies.publish(aio_pika.Message(body, user_id=user_id, **properties), routing_key)

    async def erase(body: bytes) -> None:
        await erasures.publish(aio_pika.Message(body, user_id="guest"), "")

    def sealed(device: DeviceKeys, payload: bytes) -> bytes:
        return device.seal(relay.public, payload)

    def claims(**fields: Any) -> bytes:
        base = {"v": 1, "device": "phone", "seq": 900, "ts": int(time.time() * 1000),
                "id": str(uuid.uuid4()), "to": "acme", "type": "message",
                "body": {"text": MARK}}
        return orjson.dumps({**base, **fields})

    # First, so that they are long done by the time what follows is settled.
    for headers in poison:
        await up(b"x" * 40 + mark, headers=headers)
        await answer(mark, headers=headers)
    dead = []
    await up(b"x" * 40 + mark, kid=MARK, **hostile)
    dead.append("bad_kid")
    await up(secrets.token_bytes(40) + mark + secrets.token_bytes(40))
    dead.append("decrypt_failed")
    await up(mark[:20])
    dead.append("malformed")
    await up(mark * 400)
    dead.append("too_large")
    await up(sealed(phone, b"not json " + mark))
    dead.append("malformed")
    await up(sealed(phone, claims()[:-1] + b',"device":"' + mark + b'"}'))
    dead.append("malformed")
    await up(sealed(phone, claims(**{MARK: MARK})))
    dead.append("malformed")
    stranger = DeviceKeys.generate(MARK)
    await up(sealed(stranger, stranger.payload("acme", "start", {"text": MARK})))
    dead.append("unknown_device")
    forger = DeviceKeys.generate("phone")
    await up(sealed(forger, forger.payload("acme", "start", {"text": MARK})), **hostile)
    dead.append("bad_signature")
    await up(sealed(phone, claims(ts=int(time.time() * 1000) - 30 * 86_400_000, seq=901)))
    dead.append("stale")
    await up(sealed(phone, claims(to=MARK, type="start", seq=902)))
    dead.append("unknown_business")
    start = sealed(laptop, laptop.payload("acme", "start", {"text": MARK}))
    await up(start)
    await relay.events("acme", 1)
    await up(start)
    dead.append("replayed")
    await up(sealed(flood, flood.payload("acme", "typing_start")))  # bob never wrote acme
    dead.append("unknown_conversation")
    await up(sealed(tablet, tablet.payload("quiet", "start", {"text": MARK})))
    await up(sealed(tablet, tablet.payload("quiet", "close")))
    await relay.events("quiet", 2)
    await up(sealed(tablet, tablet.payload("quiet", "typing_start")))
    dead.append("conversation_closed")
    for _ in range(BURST + 1):  # after its typing_start: two over the burst
        await up(sealed(flood, flood.payload("quiet", "start", {"text": MARK})))
    await relay.events("quiet", BURST - 1)
    dead += ["rate_limited", "rate_limited"]

    conversation = await relay.store.conversation_of(USER, "acme")
    assert conversation is not None
    valid = {"v": 1, "type": "message", "conversation": conversation.id,
             "id": str(uuid.uuid4()), "body": {"text": MARK}}
    await answer(b"{" + mark, **hostile)
    await answer(orjson.dumps(valid)[:-1] + b',"type":"' + mark + b'"}')
    await answer(orjson.dumps({**valid, "type": MARK}))
    await answer(orjson.dumps(valid), routing_key=MARK)
    await answer(orjson.dumps({**valid, "conversation": MARK}))
    await answer(orjson.dumps({**valid, "body": {"text": MARK * 400}}))
    errors = ["invalid", "invalid", "invalid", "invalid", "unknown_conversation", "too_large"]
    await answer(orjson.dumps(valid), user_id=None)
    dead.append("unauthenticated")
    await answer(orjson.dumps({**valid, "id": str(uuid.uuid4())}))  # delivered

    await erase(b"not json " + mark)
    await erase(b'{"v":1,"type":"erase","user":"' + mark + b'","user":"x","id":"'
                + str(uuid.uuid4()).encode() + b'"}')
    await erase(orjson.dumps({"v": 1, "type": "erase", "user": 5, "id": MARK}))
    dead += ["malformed", "malformed", "malformed"]
    await erase(orjson.dumps({"v": 1, "type": "erase", "user": MARK, "id": str(uuid.uuid4())}))

    def enrol(kind: str, **fields: Any) -> Awaitable[None]:
        return erase(orjson.dumps({"v": 1, "type": kind, "id": str(uuid.uuid4()), **fields}))

    marked = DeviceKeys.generate(MARK).registration(MARK)
    await enrol("register", **marked)  # registered, then in the same lane: other keys
    await enrol("register", **DeviceKeys.generate(MARK).registration(MARK))
    await enrol("register", **{**marked, "sign_key": b64e(bytes(32))})
    await enrol("revoke", user=MARK, device="phone")  # alice's
    dead += ["device_exists", "weak_key", "wrong_user"]
    return dead, errors
