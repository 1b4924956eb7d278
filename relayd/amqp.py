"""Connecting to the broker, staying connected, and publishing with confirms.

Every publish is mandatory on a confirming channel: it counts as done only when the
broker acks it, and an unroutable or nacked publish raises TransientError.

A long-running job (a worker, retention) runs in keep_connected(), which reconnects from
scratch whenever the connection is lost; a one-off job (a CLI command) uses one_off().
CONNECT_ERRORS are the failures that mean "the broker or the link", never the input.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import ssl
import struct
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Protocol, cast
from uuid import UUID

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import ChannelInvalidStateError, DeliveryError, PublishError
from aiormq.abc import ChannelFrame
from aiormq.channel import Returning
from pamqp import encode
from pamqp.commands import Basic
from pamqp.header import ContentHeader

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
CONNECT_ERRORS = (ConnectionError, OSError, asyncio.TimeoutError, aiormq.exceptions.AMQPError)
RECONNECT_INITIAL_S = 0.5
WRITE_QUEUE_FRAMES = 1024  # frames queued for aiormq's writer (see connect)
_log = log.get("relayd.amqp")
_U16, _U32 = struct.Struct(">H"), struct.Struct(">I")


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


# --- publishing: a publish's frames handed straight to aiormq's writer ---------------------
#
# aiormq's Channel.basic_publish cost ~80 µs of CPU a publish in a worker (py-spy, issue
# #14): it builds pamqp objects for the method, the content header and the body, marshals
# them through a BytesIO, and takes the channel's lock, an asyncio.timeout, a context
# manager and a future in the channel's FutureStore (three done-callbacks) for each. The
# Outlet writes the same frames, with the same bookkeeping aiormq's channel reader uses
# to settle confirms, for a fraction of that. What it relies on in aiormq (7.2.4) is
# pinned by tests/unit/test_outlet.py and tests/integration/test_publisher.py:
# - Channel.delivery_tag counts the channel's publishes; the broker numbers its confirms
#   (basic.ack, basic.nack) in the order the publishes reach it, and the channel's reader
#   resolves Channel.confirmations[tag] with the Basic.Ack, or fails it with DeliveryError;
# - a basic.return is matched to its publish through
#   Channel.message_id_delivery_tag[message_id], and fails it with PublishError (or
#   resolves it with the returned message, on a channel that does not raise on returns);
# - Channel.write_queue is the connection's queue of aiormq.abc.ChannelFrame, whose
#   payload its writer writes as it is, in queue order;
# - Channel._close_exception is set when the broker's channel.close comes in, as aiormq
#   queues its close-ok (Outlet.closed).

_FRAME = struct.Struct(">BHI")  # frame type, channel, payload size
_METHOD, _HEADER, _BODY = 1, 2, 3  # frame types
_FRAME_END = b"\xce"
_CONTENT_HEADER = struct.Struct(">HxxQ")  # class (Basic), weight (0), body size
_FLAGS = Basic.Properties.flags
_METHODS: dict[tuple[str, str, bool], bytes] = {}
# What pamqp's encoders raise for a value they cannot encode (a float beyond a 32-bit
# one's range raises OverflowError, an integer beyond its type's struct.error).
UNENCODABLE = (TypeError, ValueError, OverflowError, struct.error)
_CLOSE_EVENT = "_Channel__close_event"  # aiormq.Channel's: set once a close began
DRAIN_POLL_S = 0.002  # how often a backlog waiting for room in the write queue looks
_METHODS_MAX = 10_000  # (exchange, routing key) pairs kept; device routing keys are many


def publish_method(exchange: str, routing_key: str, mandatory: bool) -> bytes:
    """The payload of a basic.publish method frame, as pamqp marshals it (and checks it:
    one of UNENCODABLE for a name it refuses), cached."""
    key = (exchange, routing_key, mandatory)
    method = _METHODS.get(key)
    if method is None:
        if len(routing_key) > 255:  # aiormq's own check, before pamqp's
            raise ValueError("routing key too long")
        frame = Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
        method = _U32.pack(frame.index) + frame.marshal()
        if len(_METHODS) >= _METHODS_MAX:
            _METHODS.clear()
        _METHODS[key] = method
    return method


def encode_properties(*, content_type: str | None, headers: Mapping[str, Any] | None,
                      delivery_mode: int | None, correlation_id: str | None,
                      message_id: str, message_type: str | None) -> bytes:
    """The properties relayd publishes with, encoded as pamqp's Basic.Properties.marshal()
    encodes them (an absent or empty value is left out), by pamqp's own encoders, which
    raise one of UNENCODABLE for what they cannot encode."""
    flags, parts = 0, []
    if content_type is not None and content_type != "":
        flags |= _FLAGS["content_type"]
        parts.append(encode.short_string(content_type))
    if headers is not None:
        flags |= _FLAGS["headers"]
        parts.append(encode.field_table(dict(headers)))
    if delivery_mode is not None:
        if delivery_mode not in (1, 2):
            raise ValueError("delivery_mode must be 1 or 2")
        flags |= _FLAGS["delivery_mode"]
        parts.append(encode.octet(delivery_mode))
    if correlation_id is not None and correlation_id != "":
        flags |= _FLAGS["correlation_id"]
        parts.append(encode.short_string(correlation_id))
    flags |= _FLAGS["message_id"]
    parts.append(encode.short_string(message_id))
    if message_type is not None and message_type != "":
        flags |= _FLAGS["message_type"]
        parts.append(encode.short_string(message_type))
    return _U16.pack(flags) + b"".join(parts)


class Outlet:
    """Publishes on one aiormq channel with confirms; nothing else may publish on it.

    A publish's frames are appended to the outlet's pending bytes in the same step as
    its delivery tag is counted and its confirmation registered, and the publishes of
    one turn of the event loop go into the connection's write queue together, as one
    ChannelFrame (one socket write instead of one a publish). So the tags count the
    publishes in the order the broker sees them, with no lock and no wait. When the
    write queue is full (a connection blocked by the broker), the outlet's batches wait
    in order in `_backlog`, and the publishes wait for their confirms as ever. When the
    channel closes, every confirmation still open fails with the reason, and what was
    not queued yet is dropped: no frame may follow the channel's close."""

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self._number = channel.number
        self._queue = channel.write_queue
        self._confirmations = channel.confirmations
        self._returns = channel.message_id_delivery_tag
        self._max_body = channel.max_content_size
        self._pending: list[bytes] = []  # this turn's publishes, not in the write queue yet
        self._backlog: collections.deque[ChannelFrame] = collections.deque()
        self._backlogger: asyncio.Task[None] | None = None
        channel.closing.add_done_callback(self._closed)

    @property
    def closed(self) -> bool:
        """The channel is closed, or closing: once the broker's channel.close came in,
        aiormq answers it at once (close-ok) and sets Channel._close_exception, but the
        channel counts as closed only a few turns later. A publish written after that
        close-ok would be a frame on a channel the broker no longer has, which closes
        the whole connection (CHANNEL_ERROR). The same holds once relayd's side sent
        channel.close (aiormq closes a channel whose RPC was cancelled): aiormq sets its
        private close event then, in both cases."""
        channel = self.channel
        return (channel.is_closed or channel._close_exception is not None
                or getattr(channel, _CLOSE_EVENT).is_set())

    def publish(self, method: bytes, properties: bytes, body: bytes,
                message_id: str | None) -> Awaitable[object]:
        """Write one publish (`method` from publish_method, `properties` from
        encode_properties) and return what its confirm resolves with: the Basic.Ack, or
        the returned message. It raises PublishError (returned), DeliveryError (nacked),
        or the reason the channel closed. `message_id`: to match a basic.return to this
        publish (None when it is not mandatory). Only when not `closed`, where it
        would fail only once the channel has closed."""
        if not self._pending:
            self.channel.loop.call_soon(self._flush)
        number = self._number
        header = _CONTENT_HEADER.pack(Basic.frame_id, len(body)) + properties
        pending = self._pending
        pending += (_FRAME.pack(_METHOD, number, len(method)), method, _FRAME_END,
                    _FRAME.pack(_HEADER, number, len(header)), header, _FRAME_END)
        for at in range(0, len(body), self._max_body):  # no body frame for an empty body
            chunk = body[at:at + self._max_body]
            pending += (_FRAME.pack(_BODY, number, len(chunk)), chunk, _FRAME_END)
        return self._track(message_id)

    def returnable(self, message_id: str) -> bool:
        """Whether a mandatory publish with `message_id` waits for its confirm."""
        return message_id in self._returns

    def _track(self, message_id: str | None) -> Awaitable[object]:
        """Count the publish just written, register its confirmation, and return it."""
        channel = self.channel
        channel.delivery_tag += 1
        tag = channel.delivery_tag
        confirmation: asyncio.Future[object] = channel.loop.create_future()
        self._confirmations[tag] = confirmation
        if message_id is None:
            return confirmation
        self._returns[message_id] = tag
        return self._confirmed(confirmation, tag, message_id)

    async def _confirmed(self, confirmation: asyncio.Future[object], tag: int,
                         message_id: str) -> object:
        try:
            return await confirmation
        finally:  # as aiormq forgets it
            if self._returns.get(message_id) == tag:
                del self._returns[message_id]

    def _flush(self) -> None:
        frame = ChannelFrame(payload=b"".join(self._pending), should_close=False)
        self._pending.clear()
        if self.closed:  # their confirmations fail with the channel (_closed)
            return
        if not self._backlog:
            try:
                self._queue.put_nowait(frame)
            except asyncio.QueueFull:
                pass
            else:
                return
        self._backlog.append(frame)
        if self._backlogger is None:
            self._backlogger = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        """Hand the backlog to the write queue as it makes room. Never by an awaited
        put(): the channel may close while it waits, and the batch would then follow the
        close-ok; `closed` is checked with no await between it and each write."""
        try:
            while self._backlog and not self.closed:
                if self._queue.full():
                    await asyncio.sleep(DRAIN_POLL_S)
                    continue
                self._queue.put_nowait(self._backlog.popleft())
        finally:
            self._backlog.clear()
            self._backlogger = None

    def _closed(self, closing: asyncio.Future[object]) -> None:
        if self._backlogger is not None:
            self._backlogger.cancel()
        reason = None if closing.cancelled() else closing.exception()
        if not isinstance(reason, Exception):
            reason = ChannelInvalidStateError("the channel closed")
        for confirmation in list(self._confirmations.values()):
            if not confirmation.done() and not isinstance(confirmation, Returning):
                confirmation.set_exception(reason)


class Publisher:
    """Publishes what the relay produces; each call returns once the broker confirmed it.

    The broker closes a channel that publishes to an exchange that is gone (a business
    removed while a message to it was in work): that publish raises TransientError, and
    the next one opens the channel again. So the channel must be the publisher's alone: a
    consumer sharing it would be cut off with it, and nothing else may publish on it (see
    Outlet)."""

    def __init__(self, channel: AbstractChannel, settings: Settings, secret: bytes,
                 waker: Waker | None = None) -> None:
        """`secret`: the relay's opaque secret, which names device queues (topology);
        `waker`: told of each message queued for a device (push wake, relayd.wake)."""
        self._channel = channel
        self._waker = waker
        self._t = settings.topology
        self._secret = secret
        self._reopening = asyncio.Lock()
        self._outlet: Outlet | None = None

    async def _live(self) -> AbstractChannel:
        """The channel, opened again if the broker closed it."""
        if self._channel.is_closed:
            async with self._reopening:
                if self._channel.is_closed:
                    await self._channel.reopen()
        return self._channel

    async def _live_outlet(self) -> Outlet:
        """The Outlet of the live channel (a new one after a reopen)."""
        if (outlet := self._outlet) is not None and outlet.closed:
            with contextlib.suppress(Exception):  # closing: until it has closed
                await outlet.channel.closing
        channel = await self._live()
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        if self._outlet is None or self._outlet.channel is not underlay:
            self._outlet = Outlet(underlay)
        return self._outlet

    async def _publish(self, exchange: str, routing_key: str, body: bytes, *,
                       content_type: str | None = None,
                       headers: Mapping[str, Any] | None = None,
                       delivery_mode: int | None = PERSISTENT,
                       correlation_id: str | None = None, message_id: str | None = None,
                       message_type: str | None = None, mandatory: bool = True) -> None:
        started = time.monotonic()
        # As aiormq does: a message without an id gets a random one, which also tells
        # which publish a basic.return gives back.
        message_id = message_id or UUID(int=random.getrandbits(128), version=4).hex
        try:
            method = publish_method(exchange, routing_key, mandatory)
            properties = encode_properties(
                content_type=content_type, headers=headers, delivery_mode=delivery_mode,
                correlation_id=correlation_id, message_id=message_id,
                message_type=message_type)
        except UNENCODABLE as exc:  # pamqp cannot encode a property or header
            raise PermanentError("unpublishable", type(exc).__name__) from None
        try:
            outlet = self._outlet
            if outlet is None or outlet.closed:
                outlet = await self._live_outlet()
            while mandatory and outlet.returnable(message_id):
                # a basic.return names its publish by message_id alone (a device picks
                # its messages' ids): with two in flight it would fail the wrong one, and
                # the unroutable one would count as confirmed. So one at a time.
                await asyncio.sleep(DRAIN_POLL_S)
                if outlet.closed:
                    outlet = await self._live_outlet()
            confirmed = await outlet.publish(method, properties, body,
                                             message_id if mandatory else None)
        except PublishError:
            raise TransientError("unroutable", f"nothing bound to {exchange}") from None
        except DeliveryError:
            raise TransientError("nacked", "the broker refused a publish") from None
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError,
                ChannelInvalidStateError) as exc:
            raise TransientError("publish_failed", type(exc).__name__) from None
        if not isinstance(confirmed, Basic.Ack):  # returned, on a channel that does not raise
            raise TransientError("unroutable", f"nothing bound to {exchange}")
        metrics.confirmed(self._target(exchange), time.monotonic() - started)

    def _target(self, exchange: str) -> str:
        if exchange == self._t.devices_exchange:
            return "device"
        if exchange == "":
            return "answer"
        return "dead" if exchange == self._t.dead_exchange else "business"

    def to_business(self, business: str, body: bytes, message_id: str,
                    kind: str) -> Awaitable[None]:
        return self._publish(topology.business_exchange(self._t, business), "", body,
                             content_type=JSON, message_id=message_id, message_type=kind)

    async def to_device(self, device: str, sealed: bytes, receipt: str | None = None) -> None:
        routing_key = topology.device_routing_key(device, self._secret)
        # No device id: the broker dead-letters an expired copy with its headers, and the
        # device knows its own (docs/privacy.md). The receipt token is sealed.
        headers: dict[str, Any] | None = {RECEIPT_HEADER: receipt} if receipt else None
        await self._publish(self._t.devices_exchange, routing_key, sealed,
                            content_type=envelope.CONTENT_TYPE, headers=headers)
        if self._waker is not None:
            self._waker.queued(self.notice, device,
                               topology.device_queue(self._t, device, self._secret))

    def notice(self, queue: str, body: bytes) -> Awaitable[None]:
        """A transient message to `queue` through the default exchange, not mandatory (a
        push wake's notice, relayd.wake)."""
        return self._publish("", queue, body, delivery_mode=1, mandatory=False)

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
        return self._publish("", reply_to, body, content_type=JSON, delivery_mode=None,
                             correlation_id=correlation_id, message_type="answer",
                             mandatory=False)

    def to_shard(self, queue: str, body: bytes, headers: dict[str, Any],
                 content_type: str) -> Awaitable[None]:
        """A message forwarded, as it came, to one shard queue (see relayd.shard)."""
        return self._publish(self._t.shard_exchange, queue, body, content_type=content_type,
                             headers=headers)

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
        return self._publish(self._t.dead_exchange, reason, body,
                             content_type=incoming.content_type, headers=headers,
                             message_id=incoming.message_id, message_type=incoming.type)


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

    def reopen(self, tag: int) -> None:
        """The nack or reject of `tag` was not sent after all: it is open again."""
        if self._open.get(tag) == self.SETTLING:
            self._open[tag] = self.OPEN

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
        await self._settle(tag, lambda: self.channel.basic_nack(tag, requeue=requeue,
                                                                wait=False))

    async def reject(self, tag: int, requeue: bool) -> None:
        await self._settle(tag, lambda: self.channel.basic_reject(tag, requeue=requeue,
                                                                  wait=False))

    async def _settle(self, tag: int, send: Callable[[], Awaitable[object]]) -> None:
        """Send a nack or reject of `tag`. Should the send fail or be cancelled (waiting
        for room in a full write queue), nothing was queued: the tag is open again, so no
        multiple ack covers it as if it had been settled."""
        self._check()
        self.window.settling(tag)
        try:
            await send()
        except BaseException:
            self.window.reopen(tag)
            raise
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
                  on_message: Callable[[Delivery], None]) -> Consuming:
    """Consume `queue` on `channel`, which must carry no other consumer (see Acks): each
    delivery, a Received, to `on_message`, in delivery order. `on_message` must not block:
    it runs in the channel's frame reader (relayd.consume.Consumer.accept queues the work).

    aiormq hands each delivery to a consumer in a task of its own, registered in the
    channel's FutureStore (~20 µs a delivery, issue #14). Here the channel's reader calls
    `on_message` itself: consume() puts its own reader of deliveries in place of the
    channel's Channel._on_deliver_frame (aiormq 7.2.4; tests/integration/test_publisher.py
    fails if aiormq stops calling it). Should it stop, the consumer registered with
    aiormq as usual still gets every delivery, through aiormq's task."""
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    acks = Acks(underlay)
    window = acks.window
    tag = f"relayd.{UUID(int=random.getrandbits(128), version=4).hex}"

    def deliver(message: aiormq.abc.DeliveredMessage) -> None:
        delivery = Received(message, acks)
        window.received(delivery.delivery_tag)
        on_message(delivery)

    async def read(frame: Basic.Deliver) -> None:
        """aiormq's Channel._on_deliver_frame, with `deliver` called in place of a task."""
        header = await underlay._get_frame()  # the delivery's content header comes next
        if not isinstance(header, ContentHeader):
            raise aiormq.exceptions.InvalidFrameError(header)
        message = await underlay._read_content(frame, header)
        if frame.consumer_tag != tag:  # not this consumer's: leave it to aiormq's way
            if (other := underlay.consumers.get(frame.consumer_tag or "")) is not None:
                underlay.create_task(other(message))
            return
        try:
            deliver(message)
        except Exception as exc:  # a bug below: log it, hand the delivery back, read on
            _log.error("consumer_failed", error=type(exc).__name__)
            assert isinstance(frame.delivery_tag, int)
            underlay.create_task(acks.nack(frame.delivery_tag, requeue=True))

    async def fallback(message: aiormq.abc.DeliveredMessage) -> None:
        deliver(message)

    underlay._on_deliver_frame = read  # type: ignore[method-assign]
    ok = await underlay.basic_consume(queue, fallback, consumer_tag=tag)
    assert ok.consumer_tag == tag
    return Consuming(underlay, tag, acks)
