"""A device removed, revoked or erased while it logs in at the edge, forced into the one
window the edge's checks could miss: after the login's store lookup, before the edge
reads the store again with the stream attached.

The interleaving is made by hooks, not timing: the edge's `store.device` runs the
removal right after its first read (the login lookup), and `Link.attach` puts a message
in the device's queue (and, in the `after_attach` cases, runs the removal) once the
consumer is in place. The edge's queue declare in attach finds the queue of a removed
device missing and declares it again: the recheck is what must take it away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from relayd import admin, amqp, gdpr
from relayd.client import DeviceKeys
from relayd.edge.link import Link
from relayd.store import Device
from tests.integration.edge_harness import put_down, running
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


@pytest.mark.parametrize("when", ["before_attach", "after_attach"])
class TestRemovedWhileLoggingIn:
    async def test_a_device_removed_meanwhile_is_refused_and_its_queue_gone(
        self, relay: Relay, monkeypatch: pytest.MonkeyPatch, when: When
    ) -> None:
        """`relayd device remove` between the login lookup and the recheck: the login is
        refused (4401), nothing is delivered, and the queue the edge declared again is
        deleted."""
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
            assert not await relay.exists(relay.device_queue(phone))

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
        assert not await relay.exists(relay.device_queue(phone))


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
