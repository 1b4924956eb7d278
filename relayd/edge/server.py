"""`relayd edge`: the WebSocket server device apps connect to (docs/protocol.md section 12).

One Door per process holds the connections, one Session each after login, and the Link
to the broker. A login reads the device from the store twice: to check its signature,
and again once its stream is attached (Door._recheck), so that a device removed in
between is refused and leaves no queue behind. A session runs two loops: the reader
(frames from the device: sends, acknowledgements, pings) and the writer (the device's
queue, one `deliver` at a time).
Whichever way a session ends, its stream is released first (everything unacknowledged
goes back to the queue, in order) and the socket is closed after: a takeover never waits
for a dead peer's closing handshake.

Bounds per connection: `edge.max_frame_bytes` per frame and 4 frames read ahead
(websockets' max_queue), `edge.max_inflight` sends awaiting the broker, `edge.max_unacked`
deliveries awaiting the device, and `edge.send_timeout` for any frame to leave (else
4429). Nothing grows with what a device does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any

from aio_pika.abc import AbstractConnection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from relayd import amqp, log, metrics, ratelimit
from relayd.config import Settings
from relayd.crypto import b64d, b64e
from relayd.edge import frames, login
from relayd.edge.frames import Close, FrameError
from relayd.edge.link import Ending, Link, RefusedError, Stream, UnavailableError
from relayd.errors import RelaydError
from relayd.keys import KeySource
from relayd.payload import DEVICE_ID
from relayd.store import Device, Store

_log = log.get("relayd.edge")
READ_AHEAD_FRAMES = 4  # frames websockets reads ahead of the reader loop
WRITE_LIMIT = 64 * 1024  # bytes buffered towards a device before a send waits


class _EndedError(Exception):
    """The session's end is decided (see Session.end); unwind."""


class KeyedLocks:
    """One asyncio.Lock per key, forgotten when no one holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = lock, users + 1
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = lock, users - 1


class Session:
    """One logged-in connection of one device."""

    def __init__(self, door: Door, ws: ServerConnection, device: str) -> None:
        self.door = door
        self.ws = ws
        self.device = device
        edge = door.settings.edge
        self.bucket = ratelimit.TokenBucket(edge.connection_rate, edge.connection_burst,
                                            time.monotonic())
        self.inflight = asyncio.Semaphore(edge.max_inflight)
        self.ending: asyncio.Future[Close | None] = asyncio.get_running_loop().create_future()
        self.released = asyncio.Event()
        self.stream: Stream | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def end(self, code: Close | None) -> None:
        """Decide how the session ends (None: the device went away) unless decided."""
        if not self.ending.done():
            self.ending.set_result(code)

    def stream_ended(self, why: Ending) -> None:
        self.end(Close.LOGIN_FAILED if why == "removed" else Close.TRY_AGAIN_LATER)

    async def hand_over(self) -> None:
        """A newer connection of the device takes the stream: end, and return once this
        one's stream is released."""
        self.end(Close.REPLACED)
        await self.released.wait()

    async def send(self, frame: bytes) -> None:
        """Send one frame; a device that does not read it in time ends the session."""
        try:
            async with asyncio.timeout(self.door.settings.edge.send_timeout):
                await self.ws.send(frame, text=True)
        except TimeoutError:
            self.end(Close.TOO_SLOW)
            raise _EndedError from None
        except ConnectionClosed:
            self.end(None)
            raise _EndedError from None

    async def run(self) -> Close | None:
        """Serve the device until the session ends; return the close code to send."""
        reader = asyncio.create_task(self._read())
        writer = asyncio.create_task(self._write())
        try:
            ending: asyncio.Future[Any] = self.ending
            await asyncio.wait({reader, writer, ending}, return_when=asyncio.FIRST_COMPLETED)
            for loop in (reader, writer):
                if loop.done() and not loop.cancelled():
                    error = loop.exception()
                    if isinstance(error, FrameError):
                        self.end(Close.BAD_FRAME)
                    elif error is not None and not isinstance(error, _EndedError
                                                              | ConnectionClosed):
                        _log.error("edge_session_failed", error=type(error).__name__)
                        self.end(Close.ERROR)
                    else:
                        self.end(None)
            return self.ending.result()
        finally:
            for task in (reader, writer, *self.tasks):
                task.cancel()
            await asyncio.gather(reader, writer, *self.tasks, return_exceptions=True)

    async def _read(self) -> None:
        assert self.stream is not None
        async for data in self.ws:
            frame = frames.parse(data)
            if isinstance(frame, frames.Send):
                code, sealed = self.door.judge(self, frame)  # on arrival, in real time
                await self.inflight.acquire()
                task = asyncio.create_task(self._send_up(frame, code, sealed))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(frame, frames.Received):
                if not await self.stream.acknowledge(frame.tag):
                    raise FrameError("no such delivery out")
            elif isinstance(frame, frames.Ping):
                await self.send(frames.pong(frame.ref))
            else:
                raise FrameError("logged in already")
        self.end(None)

    async def _send_up(self, frame: frames.Send, code: str | None, sealed: bytes) -> None:
        """Publish one up message that may go up (`code` None), and answer after the
        confirm; or answer the nack `code` at once.

        Started in arrival order; the publishes reach the broker in that order (aiormq
        takes its channel's lock first come, first served)."""
        try:
            if code is None:
                try:
                    await self.door.publish(self.device, frame.kid, sealed)
                except RefusedError as exc:
                    code = exc.code
            metrics.edge_send(code or "ack")
            await self.send(frames.ack(frame.ref) if code is None
                            else frames.nack(frame.ref, code))
        except _EndedError:
            pass
        finally:
            self.inflight.release()

    async def _write(self) -> None:
        assert self.stream is not None
        while True:
            tag, body = await self.stream.next()
            await self.send(frames.deliver(tag, b64e(body)))


class Door:
    """Every connection of this edge process, and what they share."""

    def __init__(self, settings: Settings, store: Store, keys: KeySource) -> None:
        assert settings.edge.name is not None
        self.settings = settings
        self.store = store
        self.keys = keys
        self.verifier = login.Verifier(settings.edge.name)
        self.device_rate = ratelimit.RateLimiter(settings.limits.device_rate,
                                                 settings.limits.device_burst)
        self.sessions: dict[str, Session] = {}
        self.locks = KeyedLocks()
        self.link: Link | None = None
        self.waiting: dict[ServerConnection, None] = {}  # no login frame yet, oldest first
        self.logging_in: set[ServerConnection] = set()  # sent one: logged in, or deciding
        self.handlers: set[asyncio.Task[Any]] = set()

    # --- the handshake and the login -------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path != frames.PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "no such path\n")
        if self.link is None or len(self.logging_in) >= self.settings.edge.max_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "try again later\n")
        return None

    def _make_room(self) -> None:
        """Beyond edge.max_connections, close the connections that have waited longest
        without logging in (1013): sockets that never log in cannot lock devices out,
        they only make each other wait."""
        while (len(self.waiting) + len(self.logging_in) > self.settings.edge.max_connections
               and self.waiting):
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            _hang_up(oldest, Close.TRY_AGAIN_LATER)

    async def handle(self, ws: ServerConnection) -> None:
        self.waiting[ws] = None
        self._make_room()
        metrics.edge_connections(1)
        task = asyncio.current_task()
        if task is not None:
            self.handlers.add(task)
        code: Close | None = None
        try:
            code = await self._handle(ws)
        except FrameError:
            code = Close.BAD_FRAME
        except (ConnectionClosed, _EndedError):
            code = None
        finally:
            self.waiting.pop(ws, None)
            self.logging_in.discard(ws)
            metrics.edge_connections(-1)
            if task is not None:
                self.handlers.discard(task)
            metrics.edge_closed(int(code) if code is not None else ws.close_code or 1006)
            if code is not None:
                await self._close(ws, code)

    async def _close(self, ws: ServerConnection, code: Close) -> None:
        """Send the close frame and end the TCP connection, without waiting for the
        device's answer: a device that sent frames ahead may have our reading paused
        (websockets' flow control), and would hold its connection until close_timeout.
        What the device does not read within edge.send_timeout is cut off."""
        _hang_up(ws, code)
        try:
            async with asyncio.timeout(self.settings.edge.send_timeout):
                await ws.wait_closed()
        except TimeoutError:
            ws.transport.abort()

    async def _handle(self, ws: ServerConnection) -> Close | None:
        edge = self.settings.edge
        assert edge.name is not None
        challenge = login.nonce()
        await ws.send(frames.challenge(edge.name, b64e(challenge)), text=True)
        try:
            async with asyncio.timeout(edge.login_timeout):
                data = await ws.recv()
        except TimeoutError:
            return Close.LOGIN_TIMEOUT
        if ws not in self.waiting:
            return None  # closed by _make_room meanwhile
        del self.waiting[ws]
        self.logging_in.add(ws)
        frame = frames.parse(data)
        if not isinstance(frame, frames.Login):
            raise FrameError("log in first")
        try:
            device = (await self.store.device(frame.device)
                      if DEVICE_ID.fullmatch(frame.device) else None)
        except RelaydError as exc:  # every store error: unavailable, busy, failed
            return _store_failed(exc)
        if not self.verifier.verify(device.sign_key if device else None, frame.device,
                                    frame.sig, challenge) or device is None:
            return await _refuse(ws)
        session = Session(self, ws, device.id)
        if not await self._admit(session):
            return Close.TRY_AGAIN_LATER
        try:
            if (code := await self._recheck(session, device)) is not None:
                return code
            if session.ending.done():  # ended meanwhile: channel lost, taken over
                return session.ending.result()
            _log.info("edge_login", outcome="ready")
            await session.send(frames.READY)
            return await session.run()
        finally:
            await self._leave(session)

    async def _admit(self, session: Session) -> bool:
        """Make `session` the device's only stream: replace an older connection here, or
        have another edge process let go of it. False if that cannot be done now."""
        async with self.locks.hold(session.device):
            older = self.sessions.get(session.device)
            if older is not None:
                await older.hand_over()
            link = self.link
            if link is None:
                return False
            try:
                session.stream = await link.attach(session.device, session.stream_ended,
                                                   session.hand_over)
            except UnavailableError:
                _log.info("edge_login", outcome="unavailable")
                return False
            self.sessions[session.device] = session
        return True

    async def _recheck(self, session: Session, device: Device) -> Close | None:
        """Read the device again, now that its stream is attached: None if it is still
        registered as it logged in; else release the stream and return the close code.
        This is one store read per login on top of the login's lookup (two more when the
        device is gone).

        A removal (`relayd device remove`, a revocation, an erasure) deletes the device
        from the store, then its queue, and may run between the lookup and the attach,
        whose _free declares the missing queue again. Read once the consumer is in place,
        the store settles it: a device still there is removed later, and the queue delete
        that follows cancels the consumer (4401 through Session.stream_ended); a device
        gone is refused as at the lookup (`refused`, 4401) and its queue deleted again,
        with whatever reached it (a removal and an erasure delete what waited), so that
        the edge leaves none behind. A device registered again with other keys keeps its
        queue, the new registration's: only this login is refused.

        A registration (relayd.identity register, relayd.admin add_device) declares the
        queue, then adds the device to the store, and may run between this read and the
        delete: after the delete the store is read once more, and a device back is given
        its queue again. Left open: a registration whose declare comes before the delete
        and whose store write after that last read finds its queue missing (a publish to
        it is unroutable, retried, until the device's next login declares it, Link._free);
        a copy published to it between its store write and the delete is lost. Both need
        the same device id registered again within the few milliseconds of a login."""
        assert session.stream is not None
        try:
            now = await self.store.device(device.id)
        except RelaydError as exc:  # every store error: unavailable, busy, failed
            return _store_failed(exc)  # the stream released by _leave
        if now == device:
            return None
        await session.stream.release()
        if now is None:
            link = session.stream.slot.link
            await link.delete_queue(session.stream)
            with contextlib.suppress(RelaydError):  # unknown: next login's attach declares it
                if await self.store.device(device.id) is not None:
                    await link.declare_queue(device.id)
        return await _refuse(session.ws)

    async def _leave(self, session: Session) -> None:
        """Release the session's stream, in order, before its socket closes."""
        try:
            if session.stream is not None:
                await session.stream.release()
                await session.stream.slot.link.detach(session.stream)
        finally:
            if self.sessions.get(session.device) is session:
                del self.sessions[session.device]
            session.released.set()

    # --- up --------------------------------------------------------------------------------

    def judge(self, session: Session, frame: frames.Send) -> tuple[str | None, bytes]:
        """Whether a send may go up (None) or its nack code; the sealed bytes."""
        if not (session.bucket.take(time.monotonic())
                and self.device_rate.allow(session.device)):
            return "rate_limited", b""
        try:
            sealed = b64d(frame.sealed)
        except ValueError:
            raise FrameError("sealed is not base64url") from None
        if len(sealed) > self.settings.limits.max_envelope_bytes:
            return "too_large", b""
        if frame.kid not in self.keys().hpke:
            return "bad_kid", b""
        return None, sealed

    async def publish(self, device: str, kid: str, sealed: bytes) -> None:
        if self.link is None:
            raise RefusedError("unavailable")
        await self.link.publish(device, kid, sealed)

    # --- the broker ------------------------------------------------------------------------

    def end_all(self, code: Close) -> None:
        for session in list(self.sessions.values()):
            session.end(code)


def _store_failed(error: RelaydError) -> Close:
    """A login the store could not answer (unavailable, busy, failed): try again later."""
    _log.warning("edge_login", outcome="store_failed", error=type(error).__name__)
    return Close.TRY_AGAIN_LATER


async def _refuse(ws: ServerConnection) -> Close:
    """The one answer to every failed login (docs/protocol.md section 12)."""
    _log.info("edge_login", outcome="refused")
    await ws.send(frames.REFUSED, text=True)
    return Close.LOGIN_FAILED


def _hang_up(ws: ServerConnection, code: Close) -> None:
    """Send the close frame and close the transport, without waiting for an answer."""
    with contextlib.suppress(Exception):  # the library's state error: closing already
        ws.protocol.send_close(code)
        ws.send_data()
    ws.transport.close()


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS by relayd itself, from edge.cert_file and edge.key_file; None: plain WebSocket
    (on loopback, or behind a TLS proxy)."""
    edge = settings.edge
    if edge.cert_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(edge.cert_file), str(edge.key_file))
    return context


async def listen(door: Door, settings: Settings, reuse_port: bool = False) -> Server:
    edge = settings.edge
    return await serve(
        door.handle, edge.host, edge.port, subprotocols=[Subprotocol(frames.SUBPROTOCOL)],
        process_request=door.process_request, compression=None, server_header=None,
        max_size=edge.max_frame_bytes, max_queue=READ_AHEAD_FRAMES, write_limit=WRITE_LIMIT,
        ping_interval=edge.ping_interval, ping_timeout=edge.ping_timeout,
        close_timeout=edge.send_timeout, open_timeout=edge.login_timeout,
        ssl=ssl_context(settings), reuse_port=reuse_port or None)


async def serve_edge(settings: Settings, store: Store, keys: KeySource, stop: asyncio.Event,
                     ready: asyncio.Event | None = None,
                     listening: Callable[[int], None] | None = None,
                     reuse_port: bool = False) -> None:
    """Serve device apps until `stop` is set: listen at once, answer 503 while the broker
    is unreachable, reconnect whenever it is lost (amqp.keep_connected). `ready` is set
    while the edge takes logins; `listening` is told the port (useful with edge.port 0).
    `reuse_port`: several processes listen on one port, the kernel shares the
    connections out (`relayd run` with workers.edge > 1)."""
    door = Door(settings, store, keys)
    server = await listen(door, settings, reuse_port)
    port = next(iter(server.sockets)).getsockname()[1]
    _log.info("edge_listening", port=port)
    if listening is not None:
        listening(port)

    async def session(connection: AbstractConnection, lost: asyncio.Event) -> None:
        link = Link(settings, connection, keys)
        await link.open()
        door.link = link
        if ready is not None:
            ready.set()
        try:
            await amqp.wait_any(stop, lost)
        finally:
            door.link = None
            if ready is not None:
                ready.clear()
        if lost.is_set():
            _log.warning("connection_lost", stage="edge")
            door.end_all(Close.TRY_AGAIN_LATER)
            return
        await _drain(door, server, settings)
        await link.close()

    try:
        await amqp.keep_connected(settings, "relayd-edge", "edge", stop, session)
    finally:
        server.close()
        await server.wait_closed()


async def _drain(door: Door, server: Server, settings: Settings) -> None:
    """Stop: take no one new, end every session (1012), each giving its stream back."""
    server.close(close_connections=False)
    door.end_all(Close.RESTARTING)
    handlers = set(door.handlers)
    if handlers:
        _, pending = await asyncio.wait(handlers, timeout=settings.workers.shutdown_timeout)
        for task in pending:
            task.cancel()
    _log.info("drained", stage="edge", abandoned=len(door.handlers))
