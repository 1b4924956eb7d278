"""A device app's connection to the relay through `relayd edge` (docs/protocol.md §12).

    async with EdgeDevice(url, edge_name, keys, relay) as edge:
        await edge.send("acme", "start", {"text": "Hello"})   # returns on the edge's ack
        message = await edge.receive()                        # opened and verified
        await edge.received(message)                          # the edge may forget it now

It logs in with the device's Ed25519 key, after checking that the edge is the one
expected. A lost connection is made again with backoff and jitter; the send awaiting its
answer is sent again, with the same sealed bytes (the relay drops a second copy as
`replayed`), and messages not acknowledged come again: they are returned once, by `seq`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import ssl
from collections import OrderedDict
from types import TracebackType
from typing import Any, Self

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from relayd.client.device import DeviceKeys, RelayPublic
from relayd.crypto import b64d, b64e
from relayd.edge import login
from relayd.errors import EnvelopeError

SUBPROTOCOL = Subprotocol("relayd.v1")
FINAL_CLOSES = {4400: "bad_frame", 4401: "login_failed", 4409: "replaced"}
MAX_FRAME = 1536 * 1024
SEEN = 4096  # down seqs remembered, to return a redelivered message once


class EdgeRefusedError(Exception):
    """The edge nacked a send; `code` is the contract's nack code."""

    def __init__(self, code: str) -> None:
        self.code = code
        super().__init__(code)


class EdgeClosedError(Exception):
    """The edge ended the session for good: `reason` is bad_frame, login_failed,
    replaced, wrong_edge, or closed (by this side)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class EdgeDevice:
    """One device's session with the edge, made again whenever it is lost."""

    def __init__(self, url: str, edge_name: str, keys: DeviceKeys, relay: RelayPublic, *,
                 ssl_context: ssl.SSLContext | None = None, max_backoff: float = 30.0,
                 ping_interval: float = 20.0) -> None:
        self.url, self.edge_name, self.keys, self.relay = url, edge_name, keys, relay
        self.ssl_context = ssl_context
        self.max_backoff = max_backoff
        self.ping_interval = ping_interval
        self.connects = 0  # sessions logged in so far
        self.dropped = 0  # deliveries that did not open: acknowledged and dropped
        self._refs = itertools.count(1)
        self._answers: dict[int, asyncio.Future[str | None]] = {}
        self._unanswered: dict[int, bytes] = {}  # ref -> frame, sent again on a new session
        self._send_lock = asyncio.Lock()
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._tags: dict[int, tuple[ClientConnection, int]] = {}  # seq -> (session, tag)
        self._done: OrderedDict[int, None] = OrderedDict()  # seqs the app acknowledged
        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()
        self._over = asyncio.Event()
        self._final: EdgeClosedError | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        """Start the session and return once logged in; EdgeClosedError if refused."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        await self._wait_ready()

    async def close(self) -> None:
        self._end(EdgeClosedError("closed"))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._ws is not None:
            await self._ws.close()

    # --- up ------------------------------------------------------------------------------

    async def send(self, to: str, kind: str, body: dict[str, Any] | None = None,
                   **fields: Any) -> dict[str, Any]:
        """Seal and send one up message; return its payload once the edge acked it.
        EdgeRefusedError with the nack's code otherwise."""
        payload = self.keys.payload(to, kind, body, **fields)
        await self.send_sealed(self.keys.seal(self.relay, payload))
        message: dict[str, Any] = orjson.loads(payload)
        return message

    async def send_sealed(self, sealed: bytes, kid: str | None = None) -> None:
        """Send sealed bytes as they are; one at a time, so the relay gets them in order."""
        async with self._send_lock:
            ref = next(self._refs)
            frame = orjson.dumps({"type": "send", "ref": ref, "kid": kid or self.relay.kid,
                                  "sealed": b64e(sealed)})
            answer = asyncio.get_running_loop().create_future()
            self._answers[ref], self._unanswered[ref] = answer, frame
            try:
                ws = await self._wait_ready()
                with contextlib.suppress(ConnectionClosed):  # sent again on the next session
                    await ws.send(frame, text=True)
                code = await answer
            finally:
                self._answers.pop(ref, None)
                self._unanswered.pop(ref, None)
        if code is not None:
            raise EdgeRefusedError(code)

    # --- down ----------------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        """The next down message, opened and verified; acknowledge it with received()."""
        getter = asyncio.ensure_future(self._inbox.get())
        ended = asyncio.ensure_future(self._over.wait())
        try:
            await asyncio.wait({getter, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if getter.done():
            return getter.result()
        getter.cancel()
        assert self._final is not None
        raise self._final

    async def received(self, message: dict[str, Any]) -> None:
        """The app has stored `message`: the edge removes it from the device's queue."""
        ws, tag = self._tags.pop(message["seq"], (None, 0))
        self._done[message["seq"]] = None
        while len(self._done) > SEEN:
            self._done.popitem(last=False)
        if ws is not None and ws is self._ws:  # else it comes again, and is acked then
            with contextlib.suppress(ConnectionClosed):
                await ws.send(orjson.dumps({"type": "received", "tag": tag}), text=True)

    # --- the session ---------------------------------------------------------------------

    async def _wait_ready(self) -> ClientConnection:
        while True:
            if self._final is not None:
                raise self._final
            if self._ready.is_set() and self._ws is not None:
                return self._ws
            waiters = {asyncio.ensure_future(self._ready.wait()),
                       asyncio.ensure_future(self._over.wait())}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    def _end(self, error: EdgeClosedError) -> None:
        if self._final is None:
            self._final = error
            self._over.set()
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(error)

    async def _run(self) -> None:
        failures = 0
        while self._final is None:
            try:
                async with connect(self.url, subprotocols=[SUBPROTOCOL], ssl=self.ssl_context,
                                   compression=None, max_size=MAX_FRAME,
                                   ping_interval=self.ping_interval) as ws:
                    await self._session(ws)
                    failures = 0
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else 1006
                if code in FINAL_CLOSES:
                    self._end(EdgeClosedError(FINAL_CLOSES[code]))
                    return
            except (OSError, TimeoutError, InvalidHandshake):
                pass  # InvalidMessage among them: an edge that died mid-handshake
            except EdgeClosedError as error:
                self._end(error)
                return
            except (ValueError, LookupError, TypeError, AttributeError):
                # a frame that is not the contract's (not JSON, a field missing or of
                # another type): the peer speaks something else, and trying again would
                # only read it again. End, as the edge's own 4400 would, rather than
                # leave the task dead and every send and receive waiting for ever.
                self._end(EdgeClosedError("bad_frame"))
                return
            finally:
                self._ready.clear()
            failures += 1
            await asyncio.sleep(random.uniform(0, min(self.max_backoff,  # noqa: S311
                                                      0.5 * 2 ** min(failures, 16))))

    async def _session(self, ws: ClientConnection) -> None:
        challenge = orjson.loads(await ws.recv())
        if challenge.get("type") != "challenge" or challenge.get("edge") != self.edge_name:
            await ws.close()
            raise EdgeClosedError("wrong_edge")
        sig = login.sign(self.keys.sign_private, self.edge_name, self.keys.device,
                         b64d(challenge["nonce"]))
        await ws.send(orjson.dumps({"type": "login", "device": self.keys.device,
                                    "sig": b64e(sig)}), text=True)
        async for data in ws:
            frame = orjson.loads(data)
            kind = frame.get("type")
            if kind == "ready":
                self._ws = ws
                self.connects += 1
                for resend in list(self._unanswered.values()):
                    await ws.send(resend, text=True)
                self._ready.set()
            elif kind in ("ack", "nack"):
                answer = self._answers.get(frame["ref"])
                if answer is not None and not answer.done():
                    answer.set_result(frame.get("code") if kind == "nack" else None)
            elif kind == "deliver":
                await self._deliver(ws, frame["tag"], b64d(frame["sealed"]))

    async def _deliver(self, ws: ClientConnection, tag: int, sealed: bytes) -> None:
        try:
            message = self.keys.open(self.relay, sealed)
        except EnvelopeError:
            self.dropped += 1
            await ws.send(orjson.dumps({"type": "received", "tag": tag}), text=True)
            return
        seq = message.get("seq")
        if not isinstance(seq, int):
            self.dropped += 1
            await ws.send(orjson.dumps({"type": "received", "tag": tag}), text=True)
            return
        if seq in self._done:  # the app has it stored: acknowledge the redelivery at once
            await ws.send(orjson.dumps({"type": "received", "tag": tag}), text=True)
            return
        returned = seq in self._tags
        self._tags[seq] = ws, tag  # received() acknowledges the newest delivery of it
        if not returned:
            self._inbox.put_nowait(message)
