"""A device removed, revoked or erased while it logs in at the edge, forced into the one
window the edge's checks could miss: after the login's store lookup, before the edge
reads the store again with the stream attached.

The interleaving is made by hooks, not timing: the edge's `store.device` runs the
removal right after its first read (the login lookup), and `Link.attach` puts a message
in the device's queue (and, in the `after_attach` cases, runs the removal) once the
consumer is in place. The edge's queue declare in attach finds the queue of a removed
device missing and declares it again: the recheck is what must take it away (unless it
holds messages). The same hooks register the device again while the recheck deletes the
queue, and make the store fail at either read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from relayd import admin, amqp, gdpr
from relayd.client import DeviceKeys
from relayd.crypto import b64d, b64e
from relayd.edge import login
from relayd.edge.link import Link, Stream
from relayd.errors import RelaydError, StoreError, TransientError
from relayd.store import Device
from tests.integration.edge_harness import NAME, Edge, frame, put, put_down, running
from tests.integration.harness import WAIT, Relay

ALICE = "alice@example.org"
REFUSED = {"type": "refused", "code": "login_failed"}
When = Literal["before_attach", "after_attach"]


async def until_closed(ws: ClientConnection) -> tuple[list[dict[str, Any]], int | None]:
    """Every frame the edge sends until it closes, and its close code (None: none sent)."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT):
        with contextlib.suppress(ConnectionClosed):
            while True:
                frames.append(orjson.loads(await ws.recv()))
    received = ws.protocol.close_rcvd
    return frames, received.code if received is not None else None


def race(
    relay: Relay,
    monkeypatch: pytest.MonkeyPatch,
    phone: DeviceKeys,
    when: When,
    remove: Callable[[], Awaitable[None]],
) -> list[str]:
    """Run `remove` between the edge's login lookup of `phone` and its recheck: `when`
    before the edge attaches the stream, or with the consumer in place. Either way, once
    attached, a message goes into the device's queue (as relayd's down path would put
    it); the list returned fills in as each hook runs."""
    ran: list[str] = []
    lookup = relay.store.device

    async def device(device_id: str) -> Device | None:
        found = await lookup(device_id)
        if device_id == phone.device and "lookup" not in ran:
            ran.append("lookup")
            if when == "before_attach":
                await remove()
                ran.append("removed")
        return found  # as the login read it

    attach = Link.attach

    async def attached(self: Link, *args: Any) -> Any:
        stream = await attach(self, *args)
        await put_down(relay, phone, [b"for the device as it logged in"])
        ran.append("attached")
        if when == "after_attach":
            await remove()
            ran.append("removed")
        return stream

    monkeypatch.setattr(relay.store, "device", device)
    monkeypatch.setattr(Link, "attach", attached)
    return ran


async def assert_no_queue(relay: Relay, phone: DeviceKeys) -> None:
    """No queue of `phone` is left, not even one holding a message put there once the
    edge declared it again (before_attach): erasure and removal delete what waited."""
    assert not await relay.exists(relay.device_queue(phone))


@pytest.mark.parametrize("when", ["before_attach", "after_attach"])
class TestRemovedWhileLoggingIn:
    async def test_a_device_removed_meanwhile_is_refused_and_its_queue_gone(
        self, relay: Relay, monkeypatch: pytest.MonkeyPatch, when: When
    ) -> None:
        """`relayd device remove` between the login lookup and the recheck: the login is
        refused (4401), nothing is delivered, and the queue the edge declared again is
        deleted, with what was put in it."""
        phone = await relay.add_device(ALICE, "phone")

        async def remove() -> None:
            assert await admin.remove_device(
                relay.settings, relay.store, phone.device, relay.keyring.opaque_secret
            )

        ran = race(relay, monkeypatch, phone, when, remove)
        async with running(relay) as edge:
            ws, answer = await edge.try_login(phone)
            frames, code = await until_closed(ws)
            assert ran == (
                ["lookup", "removed", "attached"]
                if when == "before_attach"
                else ["lookup", "attached", "removed"]
            )
            assert [answer, *frames] == [REFUSED]
            assert code == 4401
            await assert_no_queue(relay, phone)

    async def test_a_user_erased_meanwhile_is_refused_and_no_queue_left(
        self, relay: Relay, monkeypatch: pytest.MonkeyPatch, when: When
    ) -> None:
        """The device's user erased (relayd.gdpr, every step) between the login lookup and
        the recheck: the login is refused (4401), nothing is delivered, and no queue of
        the device is left."""
        phone = await relay.add_device(ALICE, "phone")
        async with amqp.publisher(
            relay.settings, "relayd-gdpr", relay.keyring.opaque_secret
        ) as sink:

            async def erase() -> None:
                counts = await gdpr.erase(relay.store, relay.keyring, sink, ALICE, via="cli")
                assert counts["devices"] == 1

            ran = race(relay, monkeypatch, phone, when, erase)
            async with running(relay) as edge:
                ws, answer = await edge.try_login(phone)
                frames, code = await until_closed(ws)
        assert "removed" in ran
        assert [answer, *frames] == [REFUSED]
        assert code == 4401
        assert await relay.store.devices_of(ALICE) == []
        await assert_no_queue(relay, phone)


class TestRegisteredAgainWhileLoggingIn:
    async def test_new_keys_refuse_the_old_login_and_keep_the_new_queue(
        self, relay: Relay, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The device revoked and registered again with new keys between the login lookup
        and the recheck: the login under the old keys is refused (4401) and gets nothing,
        and the queue, now the new registration's, is left with its message."""
        phone = await relay.add_device(ALICE, "phone")

        async def register_again() -> None:
            await admin.remove_device(
                relay.settings, relay.store, phone.device, relay.keyring.opaque_secret
            )
            await relay.add_device(ALICE, phone.device)

        ran = race(relay, monkeypatch, phone, "before_attach", register_again)
        async with running(relay) as edge:
            ws, answer = await edge.try_login(phone)
            frames, code = await until_closed(ws)
            assert ran == ["lookup", "removed", "attached"]
            assert [answer, *frames] == [REFUSED]
            assert code == 4401
            assert await relay.depth(relay.device_queue(phone)) == 1


class TestRegisteredAgainDuringTheRecheck:
    async def test_the_same_keys_registered_again_get_their_queue_back(
        self, relay: Relay, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The device removed before the attach, then registered again with the same keys
        after the recheck read it gone and before the edge deletes the queue: the edge
        reads the store once more and declares the queue again."""
        phone = await relay.add_device(ALICE, "phone")
        ran: list[str] = []
        lookup = relay.store.device
        registered: list[Device] = []

        async def device(device_id: str) -> Device | None:
            found = await lookup(device_id)
            if device_id == phone.device and "lookup" not in ran:
                ran.append("lookup")
                assert found is not None
                registered.append(found)
                assert await admin.remove_device(
                    relay.settings, relay.store, phone.device, relay.keyring.opaque_secret
                )
            return found

        delete = Link.delete_queue

        async def delete_queue(self: Link, stream: Stream) -> None:
            assert await lookup(phone.device) is None  # as the recheck read it
            assert await admin.add_device(
                relay.settings, relay.store, registered[0], relay.keyring.opaque_secret
            )
            ran.append("registered again")
            await delete(self, stream)

        monkeypatch.setattr(relay.store, "device", device)
        monkeypatch.setattr(Link, "delete_queue", delete_queue)
        async with running(relay) as edge:
            ws, answer = await edge.try_login(phone)
            frames, code = await until_closed(ws)
            assert ran == ["lookup", "registered again"]
            assert [answer, *frames] == [REFUSED]
            assert code == 4401
            queue = relay.device_queue(phone)
            assert await relay.exists(queue)
            ws = await edge.login(phone)  # and it is the device's again
            await ws.close()


async def login_until_closed(
    edge: Edge, phone: DeviceKeys
) -> tuple[list[dict[str, Any]], int | None]:
    """Log in as `phone` and read until the edge closes (no answer expected first)."""
    ws = await edge.raw()
    challenge = await frame(ws)
    sig = login.sign(phone.sign_private, NAME, phone.device, b64d(challenge["nonce"]))
    await put(ws, {"type": "login", "device": phone.device, "sig": b64e(sig)})
    return await until_closed(ws)


class TestStoreFailingAtLogin:
    @pytest.mark.parametrize("read", ["lookup", "recheck"])
    @pytest.mark.parametrize(
        "error",
        [TransientError("store_busy"), StoreError("unreadable row")],
        ids=lambda e: type(e).__name__,
    )
    async def test_a_store_error_is_try_again_later(
        self,
        relay: Relay,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
        read: str,
        error: RelaydError,
    ) -> None:
        """A store error other than unavailable, at the login's lookup or at its recheck,
        closes the connection 1013 without an answer, and nothing fails with a traceback."""
        phone = await relay.add_device(ALICE, "phone")
        reads: list[str] = []
        lookup = relay.store.device

        async def device(device_id: str) -> Device | None:
            reads.append(device_id)
            if len(reads) == (1 if read == "lookup" else 2):
                raise error
            return await lookup(device_id)

        monkeypatch.setattr(relay.store, "device", device)
        async with running(relay) as edge:
            with caplog.at_level(logging.ERROR):
                frames, code = await login_until_closed(edge, phone)
                assert reads == [phone.device] * (1 if read == "lookup" else 2)
                assert frames == []
                assert code == 1013
            assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
            ws = await edge.login(phone)  # the edge let go of the device
            await ws.close()
