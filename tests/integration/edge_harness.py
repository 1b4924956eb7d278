"""A real `relayd edge` in the test's process, on a free port, and real WebSocket clients.

The edge is the code `relayd edge` runs (relayd.edge.server.serve_edge), on the test's
own vhost of the machine's RabbitMQ; devices talk to it with the `websockets` client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from relayd import shard, topology
from relayd.client import DeviceKeys
from relayd.config import Settings
from relayd.crypto import b64d, b64e
from relayd.edge import login
from relayd.edge.server import serve_edge
from tests.integration.harness import WAIT, Relay

NAME = "edge-test.example"
SUBPROTOCOL = Subprotocol("relayd.v1")


@dataclass
class Edge:
    """One running edge process (an asyncio task here) and its address."""

    relay: Relay
    settings: Settings
    port: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/device"

    async def start(self) -> None:
        listening = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(serve_edge(
            self.settings, self.relay.store, lambda: self.relay.keyring, self.stop, self.ready,
            listening=listening.set_result))
        self.port = await asyncio.wait_for(listening, WAIT)
        await asyncio.wait_for(self.ready.wait(), WAIT)

    async def halt(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, WAIT * 2)

    async def raw(self, **options: Any) -> ClientConnection:
        """A connected WebSocket client that has read nothing yet."""
        options.setdefault("subprotocols", [SUBPROTOCOL])
        options.setdefault("compression", None)
        options.setdefault("max_size", 2**24)
        return await connect(self.url, **options)

    async def login(self, device: DeviceKeys, *, as_device: str | None = None,
                    **options: Any) -> ClientConnection:
        """A client logged in as `device`; fails the test unless the edge says ready."""
        ws, answer = await self.try_login(device, as_device=as_device, **options)
        assert answer == {"type": "ready", "v": 1}, answer
        return ws

    async def try_login(self, device: DeviceKeys, *, as_device: str | None = None,
                        nonce: bytes | None = None, **options: Any
                        ) -> tuple[ClientConnection, dict[str, Any]]:
        """Read the challenge, sign it (or `nonce` instead) and return the answer."""
        ws = await self.raw(**options)
        challenge = await frame(ws)
        assert challenge["type"] == "challenge"
        assert challenge["edge"] == NAME
        signed = nonce if nonce is not None else b64d(challenge["nonce"])
        device_id = as_device or device.device
        sig = login.sign(device.sign_private, NAME, device_id, signed)
        await put(ws, {"type": "login", "device": device_id, "sig": b64e(sig)})
        return ws, await frame(ws)


def up_queue(relay: Relay, device: DeviceKeys) -> str:
    """Where the edge puts `device`'s up messages: relayd.inbound, or with
    topology.shards > 1 (RELAYD_TEST_SHARDS) the device's shard queue."""
    t = relay.settings.topology
    return shard.device_shard(t, device.device) if t.shards > 1 else t.inbound_queue


async def put(ws: ClientConnection, value: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(value).decode())


async def frame(ws: ClientConnection, wait: float = WAIT) -> dict[str, Any]:
    """The next frame from the edge, as JSON."""
    data = await asyncio.wait_for(ws.recv(), wait)
    value: dict[str, Any] = orjson.loads(data)
    return value


async def closed(ws: ClientConnection, wait: float = WAIT) -> int | None:
    """Read until the edge closes; the close code it sent (None: no close frame)."""
    async with asyncio.timeout(wait):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()
    received = ws.protocol.close_rcvd
    return received.code if received is not None else None


async def send(ws: ClientConnection, ref: int, sealed: bytes, kid: str) -> dict[str, Any]:
    """One up message; the edge's answer to it."""
    await put(ws, {"type": "send", "ref": ref, "kid": kid, "sealed": b64e(sealed)})
    return await frame(ws)


async def put_down(relay: Relay, device: DeviceKeys, bodies: list[bytes]) -> None:
    """Put `bodies` in the device's queue, in order, as relayd would (the edge does not
    open them)."""
    exchange = await relay.channel.get_exchange(relay.settings.topology.devices_exchange)
    for body in bodies:
        await exchange.publish(aio_pika.Message(body, delivery_mode=2),
                               routing_key=topology.device_routing_key(
                                   device.device, relay.keyring.opaque_secret))


@contextlib.asynccontextmanager
async def running(relay: Relay, **edge: Any) -> AsyncIterator[Edge]:
    """An edge over `relay`, with `edge` config values over the test defaults."""
    values = {"name": NAME, "port": 0, **edge}
    settings = relay.settings.model_copy(update={
        "edge": relay.settings.edge.model_copy(update=values)})
    rig = Edge(relay, settings)
    await rig.start()
    try:
        yield rig
    finally:
        await rig.halt()
