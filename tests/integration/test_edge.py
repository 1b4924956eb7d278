"""`relayd edge` with real WebSocket clients, a real broker and a real store."""

from __future__ import annotations

import asyncio
import secrets
import ssl
from pathlib import Path

import aio_pika
import pytest
from prometheus_client import REGISTRY
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from relayd import admin, config
from relayd.client import DeviceKeys
from relayd.crypto import b64d, b64e
from relayd.edge.server import serve_edge
from tests.integration.edge_harness import (
    NAME,
    SUBPROTOCOL,
    Edge,
    closed,
    frame,
    put,
    put_down,
    running,
    send,
    up_queue,
)
from tests.integration.harness import (
    WAIT,
    Relay,
    add_amqp_user,
    amqp_url,
    documented_permissions,
    rabbitmqctl,
    relay_in_vhost,
)

REFUSED = {"type": "refused", "code": "login_failed"}
READY = {"type": "ready", "v": 1}
RACES = 20  # logins at two edge processes at once


@pytest.fixture
async def edge(relay: Relay) -> Edge:
    async with running(relay) as rig:
        yield rig  # type: ignore[misc]


class TestLogin:
    async def test_a_device_logs_in_with_its_own_key(self, relay: Relay, edge: Edge) -> None:
        """The challenge names the edge; the device's signature over it gets ready."""
        phone = await relay.add_device("alice", "phone")
        ws = await edge.login(phone)
        await ws.close()

    @pytest.mark.parametrize("case", ["wrong_key", "revoked", "unknown", "replayed",
                                      "malformed_id"])
    async def test_every_failed_login_looks_the_same(self, relay: Relay, edge: Edge,
                                                     case: str) -> None:
        """A wrong key, a removed device, an unknown one, a signature over an earlier
        challenge: one frame, byte for byte, and close 4401."""
        phone = await relay.add_device("alice", "phone")
        device, as_device, nonce = phone, None, None
        if case == "wrong_key":
            device = DeviceKeys.generate("phone")
        elif case == "revoked":
            assert await admin.remove_device(relay.settings, relay.store, "phone",
                                             relay.keyring.opaque_secret)
        elif case == "unknown":
            as_device = "nobody"
        elif case == "malformed_id":
            as_device = "no such\nid"
        elif case == "replayed":
            first = await edge.raw()
            nonce = (await frame(first)).get("nonce")
            await first.close()
            nonce = b64d(nonce)
        ws, answer = await edge.try_login(device, as_device=as_device, nonce=nonce)
        assert answer == REFUSED
        assert await closed(ws) == 4401

    async def test_a_late_login_closes_with_4408(self, relay: Relay) -> None:
        """No login within edge.login_timeout: close 4408, and no frame."""
        async with running(relay, login_timeout=0.3) as edge:
            ws = await edge.raw()
            assert (await frame(ws))["type"] == "challenge"
            assert await closed(ws) == 4408

    async def test_the_handshake_needs_the_path_and_the_subprotocol(self, edge: Edge) -> None:
        """Another path is a 404, no subprotocol a 400."""
        with pytest.raises(InvalidStatus) as wrong_path:
            await connect(edge.url.replace("/v1/device", "/v2/device"),
                          subprotocols=[SUBPROTOCOL])
        assert wrong_path.value.response.status_code == 404
        with pytest.raises(InvalidStatus) as no_protocol:
            await connect(edge.url)
        assert no_protocol.value.response.status_code == 400

    async def test_no_broker_means_503(self, tmp_path: Path) -> None:
        """While the broker cannot be reached the edge listens and answers 503."""
        async with relay_in_vhost(tmp_path) as relay:
            broken = relay.settings.amqp.model_copy(
                update={"url": "amqp://guest:guest@127.0.0.1:1/x"})
            edge = relay.settings.edge.model_copy(update={"name": NAME, "port": 0})
            settings = relay.settings.model_copy(update={"amqp": broken, "edge": edge})
            rig = Edge(relay, settings)
            listening = asyncio.get_running_loop().create_future()
            rig.task = asyncio.create_task(serve_edge(settings, relay.store,
                                                      lambda: relay.keyring, rig.stop, rig.ready,
                                                      listening=listening.set_result))
            rig.port = await asyncio.wait_for(listening, WAIT)
            with pytest.raises(InvalidStatus) as refused:
                await rig.raw()
            assert refused.value.response.status_code == 503
            await rig.halt()


class TestUp:
    async def test_ack_after_the_confirm_with_the_device_stamped(self, relay: Relay,
                                                                  edge: Edge) -> None:
        """The sealed bytes reach relayd.inbound (sharded: the device's shard) as sent,
        with relayd-kid and x-relayd-device, as relayd's own broker user (so that the
        workers believe the header: inbound.from_relayd), and the ack names the send's
        ref."""
        phone = await relay.add_device("alice", "phone")
        sealed = phone.seal(relay.public, phone.payload("acme", "start", {"text": "hi"}))
        ws = await edge.login(phone)
        assert await send(ws, 7, sealed, relay.public.kid) == {"type": "ack", "ref": 7}
        [message] = await relay.take(up_queue(relay, phone), 1)
        assert message.body == sealed
        assert message.headers == {"relayd-kid": relay.public.kid, "x-relayd-device": "phone"}
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.user_id == config.relay_user(relay.settings) == "guest"

    async def test_a_full_ingress_is_nacked_broker_full(self, tmp_path: Path) -> None:
        """relayd.inbound at its length limit: the broker nacks, the device gets
        nack broker_full, and the queue holds only what was acked. (Classic: a quorum
        queue enforces its length a message late.)"""
        async with relay_in_vhost(tmp_path, topology={"queue_max_length": 1,
                                                      "queue_type": "classic"}) as relay, \
                running(relay) as edge:
            phone = await relay.add_device("alice", "phone")
            ws = await edge.login(phone)
            sealed = b"x" * 100
            assert await send(ws, 1, sealed, relay.public.kid) == {"type": "ack", "ref": 1}
            assert await send(ws, 2, sealed, relay.public.kid) == {
                "type": "nack", "ref": 2, "code": "broker_full"}
            assert await relay.depth(up_queue(relay, phone)) == 1

    async def test_too_large_and_bad_kid_are_nacked(self, relay: Relay, edge: Edge) -> None:
        """Over limits.max_envelope_bytes: too_large; a kid the relay does not have:
        bad_kid; nothing published."""
        phone = await relay.add_device("alice", "phone")
        ws = await edge.login(phone)
        big = b"x" * (relay.settings.limits.max_envelope_bytes + 1)
        assert await send(ws, 1, big, relay.public.kid) == {
            "type": "nack", "ref": 1, "code": "too_large"}
        assert await send(ws, 2, b"x", "r1999-01") == {
            "type": "nack", "ref": 2, "code": "bad_kid"}
        await relay.assert_empty(up_queue(relay, phone))

    async def test_rate_limits_at_the_door(self, tmp_path: Path) -> None:
        """Per device across connections, and per connection: sends past the burst are
        nacked rate_limited at once; the accepted ones alone reach the broker."""
        async with relay_in_vhost(tmp_path, limits={"device_rate": 0.001,
                                                    "device_burst": 3}) as relay, \
                running(relay, connection_rate=0.001, connection_burst=2) as edge:
            phone = await relay.add_device("alice", "phone")
            ws = await edge.login(phone)
            answers = [await send(ws, ref, b"x", relay.public.kid) for ref in range(3)]
            assert [a["type"] for a in answers] == ["ack", "ack", "nack"]
            assert answers[2]["code"] == "rate_limited"
            await ws.close()
            again = await edge.login(phone)  # a new connection: its own bucket, same device
            answers = [await send(again, ref, b"x", relay.public.kid) for ref in range(2)]
            assert [a["type"] for a in answers] == ["ack", "nack"]
            assert await relay.depth(up_queue(relay, phone)) == 3


class TestDown:
    async def test_received_acks_the_amqp_delivery(self, relay: Relay, edge: Edge) -> None:
        """A delivery the device answered is gone from the queue for good, even after
        the connection ends."""
        phone = await relay.add_device("alice", "phone")
        await put_down(relay, phone, [b"one"])
        ws = await edge.login(phone)
        got = await frame(ws)
        assert got == {"type": "deliver", "tag": 1, "sealed": b64e(b"one")}
        await put(ws, {"type": "received", "tag": 1})
        await put(ws, {"type": "ping", "ref": 5})
        assert await frame(ws) == {"type": "pong", "ref": 5}  # the edge read the received
        await ws.close()
        again = await edge.login(phone)
        await put(again, {"type": "ping", "ref": 6})
        assert await frame(again) == {"type": "pong", "ref": 6}
        await relay.assert_empty(relay.device_queue(phone))

    async def test_a_disconnect_mid_stream_loses_nothing_and_keeps_order(
            self, relay: Relay, edge: Edge) -> None:
        """10 delivered, 3 answered, the socket dropped: the next connection gets the
        other 7, in order, then the queue is empty."""
        phone = await relay.add_device("alice", "phone")
        bodies = [f"m{i}".encode() for i in range(10)]
        await put_down(relay, phone, bodies)
        ws = await edge.login(phone)
        got = [await frame(ws) for _ in bodies]
        assert [g["sealed"] for g in got] == [b64e(b) for b in bodies]
        for tag in (1, 2, 3):
            await put(ws, {"type": "received", "tag": tag})
        await put(ws, {"type": "ping", "ref": 1})
        assert await frame(ws) == {"type": "pong", "ref": 1}
        ws.transport.abort()  # no closing handshake: as a phone losing its network
        again = await edge.login(phone)
        rest = [await frame(again) for _ in range(7)]
        assert [r["sealed"] for r in rest] == [b64e(b) for b in bodies[3:]]
        assert [r["tag"] for r in rest] == list(range(1, 8))
        for r in rest:
            await put(again, {"type": "received", "tag": r["tag"]})
        await put(again, {"type": "ping", "ref": 2})
        assert await frame(again) == {"type": "pong", "ref": 2}
        await again.close()
        await relay.assert_empty(relay.device_queue(phone))

    async def test_a_second_connection_replaces_the_first(self, relay: Relay,
                                                          edge: Edge) -> None:
        """The older connection is closed 4409; the newer one gets what the older had
        not answered, in order, and what comes after."""
        phone = await relay.add_device("alice", "phone")
        await put_down(relay, phone, [b"a", b"b", b"c"])
        first = await edge.login(phone)
        assert (await frame(first))["sealed"] == b64e(b"a")
        await put(first, {"type": "received", "tag": 1})
        assert [(await frame(first))["sealed"] for _ in range(2)] == [b64e(b"b"), b64e(b"c")]
        second = await edge.login(phone)
        assert await closed(first) == 4409
        assert [(await frame(second))["sealed"] for _ in range(2)] == [b64e(b"b"),
                                                                       b64e(b"c")]
        await put_down(relay, phone, [b"d"])
        assert (await frame(second))["sealed"] == b64e(b"d")

    async def test_a_takeover_across_edge_processes(self, relay: Relay, edge: Edge) -> None:
        """A login at another edge process closes the one here with 4409, and the other
        gets the unanswered messages in order: one stream, never two."""
        phone = await relay.add_device("alice", "phone")
        await put_down(relay, phone, [b"a", b"b"])
        first = await edge.login(phone)
        assert [(await frame(first))["sealed"] for _ in range(2)] == [b64e(b"a"), b64e(b"b")]
        async with running(relay) as other:
            second = await other.login(phone)
            assert await closed(first) == 4409
            assert [(await frame(second))["sealed"] for _ in range(2)] == [b64e(b"a"),
                                                                           b64e(b"b")]

    async def test_a_login_race_across_processes_cuts_no_one_else_off(
            self, relay: Relay) -> None:
        """The same device logging in at two edge processes at once, again and again:
        one of them gets its stream, and the bystanders on each one's only consumer
        channel keep their connections and are not sent their unanswered message again."""
        racer = await relay.add_device("mallory", "mallory-phone")
        async with running(relay, channels=1) as one, running(relay, channels=1) as two:
            bystanders = []
            for edge, user in ((one, "bob"), (two, "carol")):
                device = await relay.add_device(user, f"{user}-phone")
                await put_down(relay, device, [b"unanswered"])
                bystanders.append(ws := await edge.login(device))
                assert (await frame(ws))["tag"] == 1
            for ref in range(RACES):
                answers = await asyncio.gather(one.try_login(racer), two.try_login(racer),
                                               return_exceptions=True)
                logged_in = [a for a in answers if not isinstance(a, BaseException)]
                assert any(answer == READY for _, answer in logged_in), answers
                for ws, _ in logged_in:
                    await ws.close()
                for ws in bystanders:
                    await put(ws, {"type": "ping", "ref": ref})
                    assert await frame(ws) == {"type": "pong", "ref": ref}
            for ws in bystanders:
                await put(ws, {"type": "received", "tag": 1})
                await put(ws, {"type": "ping", "ref": RACES})
                assert await frame(ws) == {"type": "pong", "ref": RACES}

    async def test_a_removed_device_is_cut_off(self, relay: Relay, edge: Edge) -> None:
        """`device remove` deletes the queue: the connected device is closed with 4401."""
        phone = await relay.add_device("alice", "phone")
        ws = await edge.login(phone)
        assert await admin.remove_device(relay.settings, relay.store, "phone",
                                             relay.keyring.opaque_secret)
        assert await closed(ws) == 4401


class TestIsolation:
    async def test_a_device_reads_only_its_own_queue(self, relay: Relay, edge: Edge) -> None:
        """Logging in under another device's id with one's own key fails; one's own
        connection carries only one's own queue."""
        phone = await relay.add_device("alice", "phone")
        other = await relay.add_device("bob", "bob-phone")
        await put_down(relay, other, [b"for bob"])
        await put_down(relay, phone, [b"for alice"])
        _, answer = await edge.try_login(phone, as_device="bob-phone")
        assert answer == REFUSED
        mine = await edge.login(phone)
        assert (await frame(mine))["sealed"] == b64e(b"for alice")
        await put(mine, {"type": "ping", "ref": 1})
        assert await frame(mine) == {"type": "pong", "ref": 1}
        assert await relay.depth(relay.device_queue(other)) == 1

    async def test_an_unknown_tag_is_a_bad_frame(self, relay: Relay, edge: Edge) -> None:
        """received for a tag never sent, or twice: close 4400."""
        phone = await relay.add_device("alice", "phone")
        await put_down(relay, phone, [b"a"])
        ws = await edge.login(phone)
        assert (await frame(ws))["tag"] == 1
        await put(ws, {"type": "received", "tag": 1})
        await put(ws, {"type": "received", "tag": 1})
        assert await closed(ws) == 4400
        await relay.assert_empty(relay.device_queue(phone))


class TestBounds:
    async def test_an_oversized_frame_closes_1009(self, relay: Relay) -> None:
        """A frame over edge.max_frame_bytes: close 1009, before it is read whole."""
        async with running(relay) as edge:
            phone = await relay.add_device("alice", "phone")
            ws = await edge.login(phone)
            await ws.send("x" * (relay.settings.edge.max_frame_bytes + 1))
            assert await closed(ws) == 1009

    async def test_sockets_that_never_log_in_do_not_lock_devices_out(
            self, relay: Relay) -> None:
        """At edge.max_connections, a new connection closes the one that has waited
        longest without logging in (1013); only logged-in connections fill the edge up,
        and then a handshake gets 503."""
        async with running(relay, max_connections=3) as edge:
            idle = [await edge.raw() for _ in range(3)]
            for ws in idle:  # each one's handler runs: it sent the challenge
                assert (await frame(ws))["type"] == "challenge"
            for i, ws in enumerate(idle):
                await edge.login(await relay.add_device(f"user{i}", f"phone{i}"))
                assert await closed(ws) == 1013
            with pytest.raises(InvalidStatus) as full:
                await edge.raw()
            assert full.value.response.status_code == 503

    async def test_a_slow_reader_is_dropped_and_its_messages_kept(self, relay: Relay) -> None:
        """A device that reads nothing while its queue pours out is dropped (4429) after
        edge.send_timeout, not buffered for; everything it was sent goes back to the
        queue; another device is served meanwhile."""
        async with running(relay, send_timeout=1.0) as edge:
            phone = await relay.add_device("alice", "phone")
            laptop = await relay.add_device("alice", "laptop")
            big = [bytes([i]) * 400_000 for i in range(40)]  # 16 MB: more than any buffer
            before = REGISTRY.get_sample_value("relayd_edge_closes_total",
                                               {"code": "4429"}) or 0
            ws = await edge.login(phone, max_queue=1)
            ws.transport.pause_reading()  # from now on it reads nothing
            await put_down(relay, phone, big)
            other = await edge.login(laptop)
            await put_down(relay, laptop, [b"hi"])
            assert (await frame(other))["sealed"] == b64e(b"hi")
            await relay.wait_depth(relay.device_queue(phone), len(big), wait=WAIT * 2)
            async with asyncio.timeout(WAIT):  # counted once the session gave its queue back
                while REGISTRY.get_sample_value(  # noqa: ASYNC110 - a counter has no event
                        "relayd_edge_closes_total", {"code": "4429"}) != before + 1:
                    await asyncio.sleep(0.02)
            ws.transport.abort()


class TestPermissions:
    async def test_the_edge_runs_with_relayds_documented_rights(self, relay: Relay) -> None:
        """`relayd edge` logs in as relayd: with exactly the rights deploy/rabbitmq/README.md
        gives relayd's user, it gets ready, declares a device queue that is missing, takes
        a send up, delivers down and takes a device over from another edge process."""
        user = f"relayd-{secrets.token_hex(4)}"
        password = add_amqp_user(relay.vhost, user)
        own = relay.settings
        try:
            rights = documented_permissions()["relayd"]
            rabbitmqctl("set_permissions", "-p", relay.vhost, user, rights["configure"],
                        rights["write"], rights["read"])
            relay.settings = own.model_copy(update={"amqp": own.amqp.model_copy(
                update={"url": amqp_url(user, password, relay.vhost)})})
            phone = await relay.add_device("alice", "phone")
            await relay.channel.queue_delete(relay.device_queue(phone))
            async with running(relay) as one, running(relay) as two:
                first = await one.login(phone)
                sealed = phone.seal(relay.public, phone.payload("acme", "start", {}))
                assert await send(first, 1, sealed, relay.public.kid) == {"type": "ack",
                                                                           "ref": 1}
                await put_down(relay, phone, [b"down"])
                assert (await frame(first))["sealed"] == b64e(b"down")
                second = await two.login(phone)
                assert await closed(first) == 4409
                assert (await frame(second))["sealed"] == b64e(b"down")
        finally:
            relay.settings = own
            rabbitmqctl("delete_user", user)


class TestTls:
    async def test_the_edge_speaks_tls_itself(self, relay: Relay, tmp_path: Path) -> None:
        """With edge.cert_file and key_file, the edge serves wss:// and a device that
        trusts the CA logs in."""
        from tests.support.broker import _issue, _save
        ca = _issue("test-ca", None, "ca")
        cert, key = _save(_issue("localhost", ca, "server"), tmp_path / "edge.pem",
                          tmp_path / "edge.key")
        ca_file, _ = _save(ca, tmp_path / "ca.pem", tmp_path / "ca.key")
        async with running(relay, cert_file=cert, key_file=key) as edge:
            url = edge.url.replace("ws://127.0.0.1", "wss://localhost")
            context = ssl.create_default_context(cafile=str(ca_file))
            ws = await connect(url, subprotocols=[SUBPROTOCOL], ssl=context)
            assert (await frame(ws))["edge"] == NAME
            await ws.close()
            with pytest.raises(ssl.SSLError):  # not trusted: the default CAs
                await connect(url, subprotocols=[SUBPROTOCOL],
                              ssl=ssl.create_default_context())
