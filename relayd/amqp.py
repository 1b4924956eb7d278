"""Connecting to the broker, staying connected, and publishing with confirms.

Every publish is mandatory on a confirming channel: it counts as done only when the
broker acks it, and an unroutable or nacked publish raises TransientError.

A long-running job (a worker, retention) runs in keep_connected(), which reconnects from
scratch whenever the connection is lost; a one-off job (a CLI command) uses one_off().
CONNECT_ERRORS are the failures that mean "the broker or the link", never the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Protocol, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import ChannelInvalidStateError, DeliveryError, PublishError
from pamqp.commands import Basic

from relayd import envelope, keys, log, metrics, topology, wire
from relayd.config import Settings
from relayd.errors import LoginRefusedError, PermanentError, TransientError, VhostRefusedError
from relayd.wake import Waker

JSON = "application/json"
PERSISTENT = 2  # delivery_mode
FORWARDED_USER_HEADER = "x-relayd-amqp-user"  # a reply's broker-validated user_id
RECEIPT_HEADER = "x-relayd-receipt"  # on a business message's copies: relayd.receipts
# Dead-letter reasons whose copy keeps no body (Publisher.dead_letter, protocol.md section 8)
UNPROVEN = frozenset({"unauthenticated", "unknown_business", "bad_kid", "decrypt_failed",
                      "bad_signature", "unknown_device", "wrong_device", "too_large",
                      "bad_receipt", "bad_properties"})
Properties = Basic.Properties
CONNECT_ERRORS = (ConnectionError, OSError, asyncio.TimeoutError, aiormq.exceptions.AMQPError)
RECONNECT_INITIAL_S = 0.5
WRITE_QUEUE_FRAMES = 1024  # frames queued for aiormq's writer (see connect)
_log = log.get("relayd.amqp")


class Delivery(Protocol):
    """An AMQP delivery as relayd reads and settles it (aio-pika's IncomingMessage is one;
    unit tests use fakes)."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any] | None: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def routing_key(self) -> str | None: ...
    @property
    def exchange(self) -> str | None: ...
    @property
    def redelivered(self) -> bool | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...

    def ack(self) -> Awaitable[None]: ...
    def nack(self, *, requeue: bool) -> Awaitable[None]: ...
    def reject(self, *, requeue: bool) -> Awaitable[None]: ...


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
    """One plain (non-robust) connection: a worker reconnects by itself, from scratch.
    Its deliveries are decoded by relayd.wire, whatever a publisher put in them."""
    wire.install()
    # aiormq queues at most 10 frames for its writer: past that, every publish and ack
    # waits for a slot (a future and a wake-up each), holding its channel's publish lock
    # meanwhile. What is in flight is bounded anyway, by the prefetch and the confirms.
    aiormq.Connection.FRAME_BUFFER_SIZE = max(aiormq.Connection.FRAME_BUFFER_SIZE,
                                              WRITE_QUEUE_FRAMES)
    context = ssl_context(settings)
    kwargs: dict[str, Any] = {"client_properties": {"connection_name": name},
                              "heartbeat": settings.amqp.heartbeat,
                              "timeout": settings.amqp.connect_timeout}
    if context is not None:
        kwargs["ssl_context"] = context
        kwargs["ssl"] = True
    try:
        connection: aio_pika.abc.AbstractConnection = await aio_pika.connect(
            settings.amqp.url, **kwargs)
    except (aiormq.exceptions.ProbableAuthenticationError,
            aiormq.exceptions.InvalidFrameError) as exc:
        raise refused(settings.amqp.url, exc) from None
    return connection


async def open_channel(connection: AbstractConnection, prefetch: int = 0) -> AbstractChannel:
    """A confirming channel on which an unroutable publish fails; `prefetch` > 0 bounds
    what a consumer on it may hold unsettled."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    if prefetch:
        await channel.set_qos(prefetch_count=prefetch)
    return channel


@contextlib.asynccontextmanager
async def one_off(settings: Settings, name: str) -> AsyncIterator[AbstractChannel]:
    """A connection and a confirming channel for one job (a CLI command), closed after."""
    connection = await connect(settings, name)
    try:
        yield await open_channel(connection)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def publisher(settings: Settings, name: str, secret: bytes) -> AsyncIterator[Publisher]:
    """A Publisher on a one_off() channel (`secret`: as Publisher's)."""
    async with one_off(settings, name) as channel:
        yield Publisher(channel, settings, secret)


Session = Callable[[AbstractConnection, asyncio.Event], Awaitable[None]]


async def keep_connected(settings: Settings, name: str, stage: str, stop: asyncio.Event,
                         session: Session, on_down: Callable[[], None] | None = None) -> None:
    """Run `session(connection, lost)` until `stop` is set, on a fresh connection each
    time the last one was lost. `lost` is set when the connection closes; the session
    returns then (or raises one of CONNECT_ERRORS). A failed connect is tried again after
    an exponential backoff up to `amqp.reconnect_max_backoff`; `on_down` is called each
    time a session ends."""
    backoff, connected = RECONNECT_INITIAL_S, False
    while not stop.is_set():
        try:
            connection = await connect(settings, name)
        except CONNECT_ERRORS as exc:
            _log.warning("connect_failed", stage=stage, reason=type(exc).__name__,
                         retry_in_s=backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, settings.amqp.reconnect_max_backoff)
            continue
        if connected:
            metrics.RECONNECTS.labels(stage).inc()
        backoff, connected = RECONNECT_INITIAL_S, True
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_, lost=lost: lost.set())
        try:
            await session(connection, lost)
        except CONNECT_ERRORS as exc:
            _log.warning("connection_lost", stage=stage, reason=type(exc).__name__)
        finally:
            if on_down is not None:
                on_down()
            with contextlib.suppress(*CONNECT_ERRORS, RuntimeError):
                await connection.close()


async def wait_any(*events: asyncio.Event) -> None:
    """Until one of `events` is set."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def refused(url: str, exc: Exception) -> Exception:
    """What a connect failure means when the broker refused relayd rather than failed: a
    BrokerRefusedError on amqp.url that says what to fix, or `exc` itself. A login refused is
    ACCESS_REFUSED; a vhost that does not exist, or that the user may not use, gets a
    Connection.Close instead of Connection.OpenOk, which aiormq 7 reports only as an
    InvalidFrameError naming both."""
    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.unquote(parts.username or "") or "the certificate's CN"
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return LoginRefusedError({"amqp.url": f"the broker refused the login of {user}: check the "
                            "user name and password in amqp.url (or RELAYD_AMQP__URL), or "
                            "the client certificate for ?auth=external"})
    if "Connection.OpenOk" in str(exc) and "Connection.Close" in str(exc):
        vhost = urllib.parse.unquote(parts.path[1:]) or "/"
        return VhostRefusedError({"amqp.url": f"the broker refused vhost {vhost!r} to {user}: it "
                            "does not exist, or that user has no permissions on it. Create "
                            f"it and grant them (rabbitmqctl add_vhost {vhost}; rabbitmqctl "
                            f"set_permissions -p {vhost} USER '^relayd\\.' "
                            "'^(relayd\\..*|amq\\.default)$' '^relayd\\.'), or fix the vhost "
                            "in amqp.url"})
    return exc


class Publisher:
    """Publishes what the relay produces; each call returns once the broker confirmed it.

    The broker closes a channel that publishes to an exchange that is gone (a business
    removed while a message to it was in work): that publish raises TransientError, and
    the next one opens the channel again. So the channel must be the publisher's alone: a
    consumer sharing it would be cut off with it."""

    def __init__(self, channel: AbstractChannel, settings: Settings, secret: bytes,
                 waker: Waker | None = None) -> None:
        """`secret`: the relay's opaque secret, which names device queues (topology);
        `waker`: told of each message queued for a device (push wake, relayd.wake)."""
        self._channel = channel
        self._waker = waker
        self._t = settings.topology
        self._secret = secret
        self._reopening = asyncio.Lock()

    async def _live(self) -> AbstractChannel:
        """The channel, opened again if the broker closed it."""
        if self._channel.is_closed:
            async with self._reopening:
                if self._channel.is_closed:
                    await self._channel.reopen()
        return self._channel

    async def _publish(self, exchange: str, routing_key: str, body: bytes,
                       properties: Properties, mandatory: bool = True) -> None:
        started = time.monotonic()
        try:
            # aiormq directly: an aio_pika.Message per publish cost ~10 µs for nothing we
            # use. wait=False: no future for the socket's drain, as the broker's confirm,
            # awaited, comes after the frame was written.
            channel = self._channel
            if channel.is_closed:
                channel = await self._live()
            underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
            await underlay.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                         properties=properties, mandatory=mandatory,
                                         wait=False)
        except PublishError:
            raise TransientError("unroutable", f"nothing bound to {exchange}") from None
        except DeliveryError:
            raise TransientError("nacked", "the broker refused a publish") from None
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError,
                ChannelInvalidStateError) as exc:
            raise TransientError("publish_failed", type(exc).__name__) from None
        except (TypeError, ValueError) as exc:  # pamqp cannot encode a property or header
            raise PermanentError("unpublishable", type(exc).__name__) from None
        metrics.confirmed(self._target(exchange), time.monotonic() - started)

    def _target(self, exchange: str) -> str:
        if exchange == self._t.devices_exchange:
            return "device"
        if exchange == "":
            return "answer"
        return "dead" if exchange == self._t.dead_exchange else "business"

    def to_business(self, business: str, body: bytes, message_id: str,
                    kind: str) -> Awaitable[None]:
        return self._publish(topology.business_exchange(self._t, business), "", body, Properties(
            content_type=JSON, message_id=message_id, message_type=kind,
            delivery_mode=PERSISTENT))

    async def to_device(self, device: str, sealed: bytes, receipt: str | None = None) -> None:
        routing_key = topology.device_routing_key(device, self._secret)
        # No device id: the broker dead-letters an expired copy with its headers, and the
        # device knows its own (docs/privacy.md). The receipt token is sealed.
        headers: dict[str, Any] | None = {RECEIPT_HEADER: receipt} if receipt else None
        await self._publish(self._t.devices_exchange, routing_key, sealed, Properties(
            content_type=envelope.CONTENT_TYPE, headers=headers, delivery_mode=PERSISTENT))
        if self._waker is not None:
            self._waker.queued(await self._live(), device,
                               topology.device_queue(self._t, device, self._secret))

    async def delete_device_queue(self, device: str) -> None:
        """Delete a device's queue and the undelivered messages in it; gone already is fine."""
        try:
            await topology.delete_queue(await self._live(),
                                        topology.device_queue(self._t, device, self._secret))
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError,
                ChannelInvalidStateError) as exc:
            raise TransientError("delete_failed", type(exc).__name__) from None

    async def declare_device_queue(self, device: str) -> None:
        """Declare a device's queue and its binding (relayd.topology.device)."""
        try:
            await topology.declare(await self._live(),
                                   topology.device(self._t, device, self._secret))
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError,
                ChannelInvalidStateError) as exc:
            raise TransientError("declare_failed", type(exc).__name__) from None

    def answer(self, reply_to: str, correlation_id: str | None, body: bytes) -> Awaitable[None]:
        """An answer to the identity service, to its direct reply-to name (relayd.identity
        checked it) through the default exchange. Not mandatory: an asker that went away
        has no one to read it, and asks again."""
        return self._publish("", reply_to, body, Properties(
            content_type=JSON, correlation_id=correlation_id, message_type="answer"),
            mandatory=False)

    def to_shard(self, queue: str, body: bytes, headers: dict[str, Any],
                 content_type: str) -> Awaitable[None]:
        """A message forwarded, as it came, to one shard queue (see relayd.shard)."""
        return self._publish(self._t.shard_exchange, queue, body, Properties(
            content_type=content_type, headers=headers, delivery_mode=PERSISTENT))

    def dead_letter(self, incoming: Delivery, queue: str, reason: str) -> Awaitable[None]:
        """A copy of `incoming` in relayd.dead, its reason in header x-relayd-reason.

        The copy carries only what relayd set or checked: never a publisher's own headers,
        which may hold values pamqp cannot encode again. content_type, message_id and
        type were decoded as UTF-8 short strings by relayd.wire, so they encode again.
        A request of the identity service names an account in clear: its copy keeps the
        reason and ids, not the body (docs/privacy.md); nor does input refused before
        relayd knew its sender, or refused because what it names does not exist
        (UNPROVEN): anyone who may publish can make those, before any rate limit."""
        original = incoming.headers or {}
        headers: dict[str, Any] = {"x-relayd-reason": reason, "x-relayd-queue": queue}
        kid = original.get(envelope.KID_HEADER)
        if isinstance(kid, str) and keys.KID_PATTERN.fullmatch(kid):
            headers[envelope.KID_HEADER] = kid
        user = incoming.user_id  # the broker only lets a publisher set its own
        if incoming.exchange == self._t.shard_exchange:  # the router's copy: its headers
            forwarded = original.get(FORWARDED_USER_HEADER)
            user = forwarded if isinstance(forwarded, str) else None
        if user:
            headers[FORWARDED_USER_HEADER] = user
        bad = wire.marker(original)  # relayd.wire's, never a publisher's header
        if bad is not None:
            headers[wire.BAD_PROPERTIES] = str(bad)
        body = b"" if queue == self._t.gdpr_queue or reason in UNPROVEN else incoming.body
        return self._publish(self._t.dead_exchange, reason, body, Properties(
            content_type=incoming.content_type, headers=headers,
            message_id=incoming.message_id, message_type=incoming.type,
            delivery_mode=PERSISTENT))


# --- consuming: deliveries as aiormq hands them, acks coalesced ---------------------------

class AckWindow:
    """Which acks to send for one channel's deliveries (pure: relayd.amqp.Acks sends them).

    Delivery tags are told in delivery order (received); a tag is then either acked
    (acked: its ack waits for take()) or settled otherwise (settling, then settled:
    a nack or a reject, sent at once). take() returns the frames to send, as
    (tag, multiple): one ack with multiple=True up to the last tag of the longest run of
    acked tags from the oldest one still open, and a single ack for each other acked tag.
    An ack with multiple=True covers only tags that were acked, or whose other settle
    was sent before it; a single ack's tag is never covered by an earlier frame.
    """

    OPEN, ACKED, SETTLING = 0, 1, 2

    def __init__(self) -> None:
        self._open: dict[int, int] = {}  # tag -> state, in delivery order
        self._acked = 0  # how many of _open are ACKED

    def received(self, tag: int) -> None:
        self._open[tag] = self.OPEN

    def acked(self, tag: int) -> None:
        if self._open.get(tag) == self.OPEN:
            self._open[tag] = self.ACKED
            self._acked += 1

    def settling(self, tag: int) -> None:
        """A nack or reject of `tag` is about to be sent: no ack covers it until settled."""
        if self._open.get(tag) == self.OPEN:
            self._open[tag] = self.SETTLING

    def settled(self, tag: int) -> None:
        """The nack or reject of `tag` is in the write queue, ahead of any later ack."""
        if self._open.get(tag) == self.SETTLING:
            del self._open[tag]

    def take(self) -> list[tuple[int, bool]]:
        if not self._acked:
            return []
        frames: list[tuple[int, bool]] = []
        run: list[int] = []
        for tag, state in self._open.items():
            if state != self.ACKED:
                break
            run.append(tag)
        if run:
            frames.append((run[-1], len(run) > 1))
            for tag in run:
                del self._open[tag]
            self._acked -= len(run)
        if self._acked:
            single = [tag for tag, state in self._open.items() if state == self.ACKED]
            for tag in single:
                del self._open[tag]
                frames.append((tag, False))
            self._acked = 0
        return frames


class Acks:
    """Sends one channel's settles. Acks are coalesced: the acks asked for in one turn of
    the event loop go out together, by one task, as AckWindow.take() says. The channel
    must carry no consumer but the one consume() gives these deliveries to."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self.window = AckWindow()
        self._flusher: asyncio.Task[None] | None = None

    def _check(self) -> None:
        if self.channel.is_closed:  # the broker delivers it again
            raise ConnectionError("the delivery's channel is closed")

    async def ack(self, tag: int) -> None:
        self._check()
        self.window.acked(tag)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        """One flusher at a time: a single ack sent after a multiple one covering its tag
        would close the channel. The last frame of each batch waits until the
        connection's writer has taken it (and so every frame before it)."""
        try:
            while frames := self.window.take():
                last = len(frames) - 1
                for i, (tag, multiple) in enumerate(frames):
                    await self.channel.basic_ack(tag, multiple=multiple, wait=i == last)
        except (*CONNECT_ERRORS, RuntimeError):  # ChannelInvalidStateError is one
            pass  # the channel is gone: the broker delivers what it held again
        finally:
            self._flusher = None

    async def flushed(self, deadline_s: float) -> None:
        """Until every ack asked for so far is written, or `deadline_s` passed (a blocked
        connection writes nothing): before the connection closes, so that a delivery
        settled before a clean stop is not delivered again after it."""
        until = time.monotonic() + deadline_s
        while (flusher := self._flusher) is not None and (left := until - time.monotonic()) > 0:
            await asyncio.wait([flusher], timeout=left)

    async def nack(self, tag: int, requeue: bool) -> None:
        self._check()
        self.window.settling(tag)
        try:
            await self.channel.basic_nack(tag, requeue=requeue, wait=False)
        finally:
            self.window.settled(tag)

    async def reject(self, tag: int, requeue: bool) -> None:
        self._check()
        self.window.settling(tag)
        try:
            await self.channel.basic_reject(tag, requeue=requeue, wait=False)
        finally:
            self.window.settled(tag)


class Received:
    """A delivery as aiormq hands it (a relayd.amqp.Delivery), settled through Acks:
    none of aio-pika's per-delivery message object and task."""

    __slots__ = ("_acks", "_properties", "body", "delivery_tag", "exchange", "headers",
                 "redelivered", "routing_key")

    def __init__(self, message: aiormq.abc.DeliveredMessage, acks: Acks) -> None:
        delivery = message.delivery
        assert isinstance(delivery, Basic.Deliver)
        self.body: bytes = message.body
        assert delivery.delivery_tag is not None  # a consumer's delivery has one
        self.delivery_tag: int = delivery.delivery_tag
        self.redelivered: bool | None = delivery.redelivered
        self.exchange: str | None = delivery.exchange
        self.routing_key: str | None = delivery.routing_key
        self._properties = message.header.properties
        self.headers: Mapping[str, Any] | None = self._properties.headers or {}
        self._acks = acks

    @property
    def user_id(self) -> str | None:
        return self._properties.user_id

    @property
    def timestamp(self) -> datetime | None:
        return self._properties.timestamp

    @property
    def content_type(self) -> str | None:
        return self._properties.content_type

    @property
    def message_id(self) -> str | None:
        return self._properties.message_id

    @property
    def type(self) -> str | None:
        return self._properties.message_type

    @property
    def reply_to(self) -> str | None:
        return self._properties.reply_to

    @property
    def correlation_id(self) -> str | None:
        return self._properties.correlation_id

    def ack(self) -> Awaitable[None]:
        return self._acks.ack(self.delivery_tag)

    def nack(self, *, requeue: bool) -> Awaitable[None]:
        return self._acks.nack(self.delivery_tag, requeue)

    def reject(self, *, requeue: bool) -> Awaitable[None]:
        return self._acks.reject(self.delivery_tag, requeue)


class Consuming:
    """A consumer that consume() started: cancel() stops the deliveries, flushed() waits
    until the acks asked for are written."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, tag: str, acks: Acks) -> None:
        self._channel, self._tag, self._acks = channel, tag, acks

    async def cancel(self) -> None:
        await self._channel.basic_cancel(self._tag)

    async def flushed(self, deadline_s: float) -> None:
        await self._acks.flushed(deadline_s)


async def consume(channel: AbstractChannel, queue: str,
                  on_message: Callable[[Delivery], Awaitable[None]]) -> Consuming:
    """Consume `queue` on `channel`, which must carry no other consumer (see Acks): each
    delivery, a Received, to `on_message`, in delivery order."""
    underlay = await channel.get_underlay_channel()
    acks = Acks(underlay)
    window = acks.window

    async def deliver(message: aiormq.abc.DeliveredMessage) -> None:
        delivery = Received(message, acks)
        window.received(delivery.delivery_tag)
        await on_message(delivery)

    ok = await underlay.basic_consume(queue, deliver)
    assert ok.consumer_tag is not None
    return Consuming(underlay, ok.consumer_tag, acks)
