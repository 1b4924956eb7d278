"""Issue 17: each side learns what it may know of its messages, and nothing more.

A device is told, in a sealed `error`, that a message it signed was refused; through the
edge, with real WebSocket clients, a real broker and real workers.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from relayd.client import DeviceKeys
from relayd.crypto import b64d
from tests.integration.edge_harness import Edge, frame, put, running, send
from tests.integration.harness import Relay, relay_in_vhost


@pytest.fixture
async def edge(relay: Relay) -> Edge:
    async with running(relay) as rig:
        yield rig  # type: ignore[misc]


async def delivered(ws: Any, device: DeviceKeys, relay: Relay) -> dict[str, Any]:
    """The next down message through the edge, opened and verified, and acknowledged."""
    got = await frame(ws)
    assert got["type"] == "deliver", got
    message = device.open(relay.public, b64d(got["sealed"]))
    await put(ws, {"type": "received", "tag": got["tag"]})
    return message


def raw_payload(device: DeviceKeys, **fields: Any) -> bytes:
    """An up payload with `fields` over valid ones (None: the field left out)."""
    claims: dict[str, Any] = {"v": 1, "device": device.device, "seq": 1, "ts": 0,
                              "id": str(uuid.uuid4()), "to": "acme", "type": "message",
                              "body": {"text": "hi"}}
    claims.update(fields)
    return orjson.dumps({k: v for k, v in claims.items() if v is not None})


class TestDeviceErrors:
    @pytest.mark.parametrize("case", ["malformed", "malformed_id", "stale", "unknown_business",
                                      "unknown_conversation", "conversation_closed"])
    async def test_each_refusal_reaches_the_sender_alone(self, relay: Relay, edge: Edge,
                                                         case: str) -> None:
        """A verified message refused: the sending device, and no other device and no
        business, gets a sealed, signed `error` with the message's id and the code; the
        message is dead-lettered with that code as before."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        laptop = await relay.add_device("alice", "laptop")
        await relay.start()
        ws = await edge.login(phone)
        kid, ref = relay.public.kid, 0
        if case == "conversation_closed":  # opened and closed by the user first
            for kind in ("start", "close"):
                ref += 1
                assert (await send(ws, ref, phone.seal(relay.public, phone.payload(
                    "acme", kind)), kid))["type"] == "ack"
            await relay.events("acme", 2)
            assert [m["type"] for m in await relay.received(laptop, 2)] == ["echo", "close"]
        message_id = str(uuid.uuid4())
        claims: dict[str, Any] = {
            "malformed": {"extra": 1},
            "malformed_id": {"id": "not-a-uuid"},
            "stale": {"ts": 1},
            "unknown_business": {"to": "nobody"},
            "unknown_conversation": {"type": "typing_start", "body": {}},
            "conversation_closed": {"type": "typing_start", "body": {}},
        }[case]
        now = phone.payload("acme", "message")  # a fresh ts and the next seq
        fields = {"id": message_id, "seq": orjson.loads(now)["seq"],
                  "ts": orjson.loads(now)["ts"], **claims}
        sealed = phone.seal(relay.public, raw_payload(phone, **fields))
        assert await send(ws, ref + 1, sealed, kid) == {"type": "ack", "ref": ref + 1}
        [dead] = await relay.dead(1)
        code = case.removesuffix("_id")
        assert dead.headers["x-relayd-reason"] == code
        error = await delivered(ws, phone, relay)
        assert error["type"] == "error"
        assert error["body"] == {"ref": None if case == "malformed_id" else message_id,
                                 "code": code}
        assert error["from"] == ("nobody" if case == "unknown_business" else "acme")
        assert set(error) == {"v", "device", "seq", "ts", "id", "from", "type", "body"}
        await relay.assert_empty(relay.device_queue(laptop), relay.inbox("acme"),
                                 relay.device_queue(phone))

    @pytest.mark.parametrize("case", ["bad_signature", "wrong_device", "unknown_device"])
    async def test_unverifiable_input_gets_no_answer(self, relay: Relay, edge: Edge,
                                                     case: str) -> None:
        """A message whose signature does not verify, or that is sealed as another device
        (of the same user, or one never registered): dead-lettered, and no device hears of
        it."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        laptop = await relay.add_device("alice", "laptop")
        await relay.start()
        ws = await edge.login(phone)
        signer = {"bad_signature": DeviceKeys.generate("phone"), "wrong_device": laptop,
                  "unknown_device": DeviceKeys.generate("ghost")}[case]
        sealed = signer.seal(relay.public, signer.payload("nobody", "message", {"text": "x"}))
        if case == "unknown_device":  # through the edge it would be wrong_device
            await relay.publish_up(sealed)
        else:
            assert (await send(ws, 1, sealed, relay.public.kid))["type"] == "ack"
        [dead] = await relay.dead(1)
        assert dead.headers["x-relayd-reason"] == case
        await relay.assert_empty(relay.device_queue(laptop), relay.device_queue(phone),
                                 relay.inbox("acme"))

    async def test_a_replay_gets_no_error(self, relay: Relay, edge: Edge) -> None:
        """The same sealed message twice: the first is passed on, the copy dead-lettered as
        replayed, and the device gets nothing for it."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        await relay.start()
        ws = await edge.login(phone)
        sealed = phone.seal(relay.public, phone.payload("acme", "start"))
        for ref in (1, 2):
            assert (await send(ws, ref, sealed, relay.public.kid))["type"] == "ack"
        [dead] = await relay.dead(1)
        assert dead.headers["x-relayd-reason"] == "replayed"
        assert [e["type"] for e in await relay.events("acme", 1)] == ["start"]
        await relay.assert_empty(relay.device_queue(phone))

    async def test_rate_limited_straight_to_ingress(self, tmp_path: Path) -> None:
        """A message that reached relayd.ingress without the edge is judged by its ts:
        over the rate, its device is told rate_limited."""
        async with relay_in_vhost(tmp_path, limits={"device_rate": 0.001,
                                                    "device_burst": 1}) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device("alice", "phone")
            await relay.start()
            await relay.send(phone, "acme", "start")
            late = await relay.send(phone, "acme", "message", {"text": "again"})
            [dead] = await relay.dead(1)
            assert dead.headers["x-relayd-reason"] == "rate_limited"
            [error] = await relay.received(phone, 1)
            assert (error["type"], error["body"]) == ("error", {"ref": late,
                                                               "code": "rate_limited"})
