"""Requests answered over RabbitMQ's direct reply-to: what the identity service and the key
vault (relayd.vault) share, on both sides.

The asker consumes the pseudo-queue `amq.rabbitmq.reply-to` on its channel and names it
as `reply_to`; the broker rewrites that to a name only this channel receives on
(`amq.rabbitmq.reply-to.…`), never stored in any queue. The server answers there through
the default exchange, and only there (reply_to()), so an answer reaches nothing but the
asker's own channel.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from relayd import payload
from relayd.errors import PermanentError

if TYPE_CHECKING:  # relayd.client imports this module: it stays light
    from relayd.amqp import Delivery

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
ANSWER_PREFIX = DIRECT_REPLY_TO + "."  # what the broker expands the name to


class Answerer(Protocol):
    """What answers a request (amqp.Publisher is one): to a direct reply-to name, through
    the default exchange, not mandatory (an asker gone away asks again)."""

    def answer(self, reply_to: str, correlation_id: str | None, body: bytes) -> Awaitable[None]:
        ...


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where a request's answer goes, and what it is matched by."""

    queue: str
    correlation_id: str | None


def reply_to(delivery: Delivery) -> ReplyTo | None:
    """Where to answer `delivery`; None if it asks for no answer. PermanentError
    `bad_reply_to` unless it names a direct reply-to consumer."""
    queue = delivery.reply_to
    if queue is None:
        return None
    if not queue.startswith(ANSWER_PREFIX) or len(queue) == len(ANSWER_PREFIX):
        raise PermanentError("bad_reply_to", "answers go to direct reply-to only")
    return ReplyTo(queue, delivery.correlation_id)


def request_object(body: bytes, max_bytes: int) -> dict[str, Any]:
    """A request body as a JSON object; PermanentError `too_large` over `max_bytes`, or
    `malformed` (not JSON, a key twice, not an object)."""
    if len(body) > max_bytes:
        raise PermanentError("too_large", f"a request is at most {max_bytes} bytes")
    try:
        data = payload.loads(body)
    except ValueError as exc:
        raise PermanentError("malformed", str(exc)) from None
    if not isinstance(data, dict):
        raise PermanentError("malformed", "a request is a JSON object")
    return data


class Asker:
    """The asking side on one channel: publish a request, wait for its answer's body.

    Requests may run concurrently; each is matched to its answer by a fresh correlation
    id. An answer that comes after its asker gave up is dropped."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self._waiting: dict[str, asyncio.Future[bytes]] = {}

    async def listen(self) -> None:
        """Consume direct reply-to on the channel (before the first ask)."""
        replies = await self.channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await replies.consume(self._on_answer, no_ack=True)

    async def _on_answer(self, message: AbstractIncomingMessage) -> None:
        waiter = self._waiting.pop(message.correlation_id or "", None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message.body)

    async def ask(self, exchange: str, routing_key: str, message: aio_pika.Message,
                  wait_s: float, *, mandatory: bool = False) -> bytes:
        """Publish `message` (its reply_to and correlation_id set here) and return the
        answer's body. TimeoutError when none came within `wait_s`; whatever the
        publish raises (aio-pika's errors) is the caller's to map."""
        correlation = str(uuid.uuid4())
        message.reply_to, message.correlation_id = DIRECT_REPLY_TO, correlation
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = waiter
        try:
            target = (self.channel.default_exchange if exchange == "" else
                      await self.channel.get_exchange(exchange, ensure=False))
            async with asyncio.timeout(wait_s):
                await target.publish(message, routing_key=routing_key, mandatory=mandatory)
                return await waiter
        finally:
            self._waiting.pop(correlation, None)
