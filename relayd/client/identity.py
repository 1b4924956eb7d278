"""The operator's identity service, as relayd sees it: register a device, revoke one, erase
a user, over AMQP, each answered (docs/protocol.md, "Requests from the identity service").

    async with IdentityService("amqps://identity:…@broker/relayd", "identity") as identity:
        answer = await identity.register("alice@example.org", phone_keys)
        # {"v": 1, "type": "answer", "accepted": True, "outcome": "registered"}

It connects as the identity service's own broker user (`gdpr.identity_user` in relayd's
config), stamps that name as `user_id` (the broker checks it), and reads the answers on
RabbitMQ's direct reply-to, so it needs no queue of its own: write permission on
`relayd.gdpr` is all. Every request is idempotent: after a TimeoutError (relayd busy or
not running), ask again.
"""

from __future__ import annotations

import ssl
import uuid
from types import TracebackType
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection

from relayd.client.device import DeviceKeys
from relayd.rpc import Asker


class IdentityService:
    """One connection of the identity service; requests may run concurrently."""

    def __init__(self, amqp_url: str, user_id: str, *, exchange: str = "relayd.gdpr",
                 timeout: float = 15.0, ssl_context: ssl.SSLContext | None = None) -> None:
        """`ssl_context`: for an amqps:// URL, the TLS context (the broker's CA, and a
        client certificate if the broker asks for one)."""
        self.amqp_url = amqp_url
        self.ssl_context = ssl_context
        self.user_id = user_id
        self.exchange_name = exchange
        self.timeout = timeout
        self._connection: AbstractConnection | None = None
        self._asker: Asker | None = None

    async def __aenter__(self) -> IdentityService:
        self._connection = await aio_pika.connect(self.amqp_url, ssl_context=self.ssl_context)
        self._asker = Asker(await self._connection.channel(publisher_confirms=True))
        await self._asker.listen()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request (its `v` and `id` are added); return relayd's answer. Raises
        TimeoutError if none came within `timeout` s."""
        assert self._asker is not None, "use IdentityService in `async with`"
        body = await self._asker.ask(self.exchange_name, "", aio_pika.Message(
            orjson.dumps({"v": 1, "id": str(uuid.uuid4()), **request}),
            content_type="application/json", user_id=self.user_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT), self.timeout)
        answer: dict[str, Any] = orjson.loads(body)
        return answer

    async def register(self, user: str, device: DeviceKeys) -> dict[str, Any]:
        """Register `device` (its public keys) for `user`."""
        return await self.ask({"type": "register", **device.registration(user)})

    async def revoke(self, user: str, device: str) -> dict[str, Any]:
        """Revoke `user`'s device `device`: its queue and what waits there are deleted, a
        connection of it at the edge is closed (4401), and it can no longer log in."""
        return await self.ask({"type": "revoke", "user": user, "device": device})

    async def erase(self, user: str) -> dict[str, Any]:
        """Erase everything held about `user` (GDPR Art. 17)."""
        return await self.ask({"type": "erase", "user": user})


async def enrol(amqp_url: str, identity_user: str, user: str,
                device: DeviceKeys) -> dict[str, Any]:
    """Register one device as the identity service would, in one call (for demos and
    scripts); the answer, e.g. {"v": 1, "type": "answer", "accepted": True,
    "outcome": "registered"}. TimeoutError after 15 s without one."""
    async with IdentityService(amqp_url, identity_user) as identity:
        return await identity.register(user, device)
