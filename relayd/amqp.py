"""Connecting to the broker and publishing with confirms.

Every publish is mandatory on a confirming channel: it counts as done only when the
broker acks it, and an unroutable or nacked publish raises TransientError.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import DeliveryError, PublishError
from pamqp.commands import Basic

from relayd import envelope, metrics, topology
from relayd.config import Settings
from relayd.errors import TransientError

JSON = "application/json"
PERSISTENT = 2  # delivery_mode
Properties = Basic.Properties


class _Named(ssl.SSLContext):
    """Checks the broker's certificate against `server_name` (and sends it as SNI) instead
    of the URL's host: aio-pika has no way to pass asyncio a server_hostname."""

    server_name: str | None = None

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return super().wrap_bio(incoming, outgoing, server_side,
                                self.server_name or server_hostname, session)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for amqps:// URLs, from `amqp.tls`."""
    if not settings.amqp.url.startswith("amqps://"):
        return None
    tls = settings.amqp.tls
    context = _Named(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.server_name = tls.server_hostname
    if tls.ca_file:
        context.load_verify_locations(cafile=str(tls.ca_file))
    else:
        context.load_default_certs()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.verify_hostname
    if tls.cert_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    return context


async def connect(settings: Settings, name: str) -> aio_pika.abc.AbstractConnection:
    """One plain (non-robust) connection: a worker reconnects by itself, from scratch."""
    context = ssl_context(settings)
    kwargs: dict[str, Any] = {"client_properties": {"connection_name": name},
                              "heartbeat": settings.amqp.heartbeat,
                              "timeout": settings.amqp.connect_timeout}
    if context is not None:
        kwargs["ssl_context"] = context
        kwargs["ssl"] = True
    connection: aio_pika.abc.AbstractConnection = await aio_pika.connect(
        settings.amqp.url, **kwargs)
    return connection


class Publisher:
    """Publishes what the relay produces; each call returns once the broker confirmed it."""

    def __init__(self, channel: AbstractChannel, settings: Settings, secret: bytes) -> None:
        """`secret`: the relay's opaque secret, which names device queues (topology)."""
        self._channel = channel
        self._t = settings.topology
        self._secret = secret

    async def _publish(self, exchange: str, routing_key: str, body: bytes,
                       properties: Properties) -> None:
        # aiormq directly: an aio_pika.Message per publish cost ~10 µs for nothing we use
        underlay = await self._channel.get_underlay_channel()
        started = time.monotonic()
        try:
            await underlay.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                         properties=properties, mandatory=True)
        except PublishError:
            raise TransientError("unroutable", f"nothing bound to {exchange}") from None
        except DeliveryError:
            raise TransientError("nacked", "the broker refused a publish") from None
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise TransientError("publish_failed", type(exc).__name__) from None
        metrics.confirmed(self._target(exchange), time.monotonic() - started)

    def _target(self, exchange: str) -> str:
        if exchange == self._t.devices_exchange:
            return "device"
        return "dead" if exchange == self._t.dead_exchange else "business"

    def to_business(self, business: str, body: bytes, message_id: str,
                    kind: str) -> Awaitable[None]:
        return self._publish(topology.business_exchange(self._t, business), "", body, Properties(
            content_type=JSON, message_id=message_id, message_type=kind,
            delivery_mode=PERSISTENT))

    def to_device(self, device: str, sealed: bytes) -> Awaitable[None]:
        routing_key = topology.device_routing_key(device, self._secret)
        return self._publish(self._t.devices_exchange, routing_key, sealed, Properties(
            content_type=envelope.CONTENT_TYPE, headers={envelope.KID_HEADER: device},
            delivery_mode=PERSISTENT))

    async def delete_device_queue(self, device: str) -> None:
        """Delete a device's queue and the undelivered messages in it; gone already is fine."""
        try:
            await topology.delete_queue(self._channel,
                                        topology.device_queue(self._t, device, self._secret))
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise TransientError("delete_failed", type(exc).__name__) from None

    def to_shard(self, queue: str, body: bytes, headers: dict[str, Any],
                 content_type: str) -> Awaitable[None]:
        """A message forwarded, as it came, to one shard queue (see relayd.shard)."""
        return self._publish(self._t.shard_exchange, queue, body, Properties(
            content_type=content_type, headers=headers, delivery_mode=PERSISTENT))

    def dead_letter(self, incoming: aio_pika.abc.AbstractIncomingMessage, queue: str,
                    reason: str) -> Awaitable[None]:
        """A copy of `incoming` in relayd.dead, its reason in header x-relayd-reason."""
        headers = dict(incoming.headers or {})
        headers.update({"x-relayd-reason": reason, "x-relayd-queue": queue})
        if incoming.user_id:  # the broker only lets us publish our own user_id
            headers["x-relayd-amqp-user"] = incoming.user_id
        return self._publish(self._t.dead_exchange, reason, incoming.body, Properties(
            content_type=incoming.content_type, headers=headers,
            message_id=incoming.message_id, message_type=incoming.type,
            delivery_mode=PERSISTENT))
