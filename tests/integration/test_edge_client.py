"""relayd.client.EdgeDevice against a real edge and real relay workers: the whole path."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

from relayd.client import DeviceKeys, EdgeDevice
from relayd.client.edge import EdgeClosedError
from tests.integration.edge_harness import NAME, frame, running, send
from tests.integration.harness import WAIT, Relay


class TestEdgeDevice:
    async def test_a_round_trip_through_the_edge(self, relay: Relay) -> None:
        """The phone sends start over WebSocket, the business gets it, its reply comes
        back down the phone's WebSocket, and received() empties the queue."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        await relay.start()
        async with running(relay) as edge, \
                EdgeDevice(edge.url, NAME, phone, relay.public) as device:
            sent = await device.send("acme", "start", {"text": "Where is my order?"})
            [event] = await relay.events("acme", 1)
            assert event["type"] == "start"
            assert event["id"] == sent["id"]
            await relay.reply("acme", event["conversation"], "message", {"text": "Tomorrow."})
            message = await asyncio.wait_for(device.receive(), WAIT)
            assert message["body"] == {"text": "Tomorrow."}
            assert message["seq"] == 1
            await device.received(message)
            await device.close()
            await relay.assert_empty(relay.device_queue(phone))

    async def test_reconnect_and_resume(self, relay: Relay) -> None:
        """The connection drops with a message received but not acknowledged: the client
        logs in again by itself, the message comes again and is not returned twice,
        received() acknowledges it on the new connection, and sending works again."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        await relay.start()
        async with running(relay) as edge, \
                EdgeDevice(edge.url, NAME, phone, relay.public, max_backoff=0.2) as device:
            await device.send("acme", "start", {"text": "hi"})
            [event] = await relay.events("acme", 1)
            await relay.reply("acme", event["conversation"], "message", {"text": "one"})
            first = await asyncio.wait_for(device.receive(), WAIT)
            assert device._ws is not None
            device._ws.transport.abort()  # the network goes away
            await relay.reply("acme", event["conversation"], "message", {"text": "two"})
            second = await asyncio.wait_for(device.receive(), WAIT)
            assert (first["body"]["text"], second["body"]["text"]) == ("one", "two")
            assert device.connects == 2
            await device.received(first)
            await device.received(second)
            await device.send("acme", "message", {"text": "still here"})
            # and, since contract 1.4, the receipt of each reply the phone acknowledged
            events = await relay.events("acme", 3)
            [event] = [e for e in events if e["type"] == "message"]
            assert event["body"] == {"text": "still here"}
            assert sorted(e["ref"] for e in events if e["type"] == "delivered") == sorted(
                (first["id"], second["id"]))
            await device.close()
            await relay.assert_empty(relay.device_queue(phone))

    async def test_a_device_cannot_send_as_another(self, relay: Relay) -> None:
        """An envelope sealed by bob, sent on alice's connection, is acked by the edge
        (it cannot open it) and dead-lettered by the relay as wrong_device; bob's
        business sees nothing."""
        await relay.add_business("acme")
        phone = await relay.add_device("alice", "phone")
        bob = await relay.add_device("bob", "bob-phone")
        await relay.start()
        async with running(relay) as edge:
            ws = await edge.login(phone)
            forged = bob.seal(relay.public, bob.payload("acme", "start", {"text": "as bob"}))
            assert (await send(ws, 1, forged, relay.public.kid))["type"] == "ack"
            [dead] = await relay.dead(1)
            assert dead.headers["x-relayd-reason"] == "wrong_device"
            assert "x-relayd-device" not in dead.headers  # no device id kept in clear
            assert dead.body == b""  # sent by whom it must not be: no body kept
            await relay.assert_empty(relay.inbox("acme"))
            await ws.send('{"type":"ping","ref":1}')
            assert await frame(ws) == {"type": "pong", "ref": 1}


class TestReconnect:
    async def test_an_edge_that_dies_mid_handshake_is_tried_again(self, relay: Relay) -> None:
        """A connection closed before the HTTP answer (an edge process killed just after
        it accepted, as in the edge kill -9 fault row) is one more failed attempt: the
        client tries again, instead of ending its session task and leaving every send
        waiting for ever."""
        attempts = asyncio.Queue[None]()

        async def dies(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            attempts.put_nowait(None)
            writer.close()

        server = await asyncio.start_server(dies, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        edge = EdgeDevice(f"ws://127.0.0.1:{port}/v1/device", NAME,
                          DeviceKeys.generate("phone"), relay.public, max_backoff=0.05)
        connecting = asyncio.create_task(edge.connect())
        try:
            for _ in range(3):  # under the bug the task ended after the first
                await asyncio.wait_for(attempts.get(), WAIT)
            assert not connecting.done()
        finally:
            connecting.cancel()
            await edge.close()
            server.close()
            await server.wait_closed()

    @pytest.mark.parametrize("first", [
        b"\xff not json", b"[1, 2]",
        orjson.dumps({"type": "challenge", "edge": NAME}),
        orjson.dumps({"type": "challenge", "edge": NAME, "nonce": 7})])
    async def test_a_frame_off_the_contract_ends_the_session(self, relay: Relay,
                                                            first: bytes) -> None:
        """A peer whose frames are not the contract's (not JSON, a list, a field missing or
        of another type) ends the session with bad_frame: connect() raises, instead of the
        session task dying unseen and leaving connect() waiting for ever."""
        async def garbles(ws: ServerConnection) -> None:
            await ws.send(first)
            await ws.wait_closed()

        async with serve(garbles, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            edge = EdgeDevice(f"ws://127.0.0.1:{port}/v1/device", NAME,
                              DeviceKeys.generate("phone"), relay.public, max_backoff=0.05)
            try:
                with pytest.raises(EdgeClosedError) as ended:
                    await asyncio.wait_for(edge.connect(), WAIT)
                assert ended.value.reason == "bad_frame"
            finally:
                await edge.close()
