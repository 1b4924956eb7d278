"""A raw AMQP 0-9-1 publisher: what an attacker writes on the socket.

pamqp refuses to encode much of what the broker accepts (invalid UTF-8 in a short string,
a table value of any type the publisher likes, a timestamp beyond year 9999, tables nested
deeper than Python recurses). So the content header is built here, byte by byte, from
already-encoded property fields; the method frames around it (login, channel, confirms,
Basic.Publish) are pamqp's own, since they carry nothing hostile.

Also the few encoders a hostile test needs: `short` and `long` strings of arbitrary bytes,
and `table`, whose values are raw field values (a type byte and its encoding).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pamqp import commands, constants, encode, frame
from pamqp.exceptions import UnmarshalingException
from pamqp.header import ProtocolHeader

# Basic.Properties in wire order: (name, flag bit)
PROPERTIES = [(name, commands.Basic.Properties.flags[name])
              for name in commands.Basic.Properties.__slots__]
PROPERTY_KIND = {name: commands.Basic.Properties.amqp_type(name)
                 for name, _ in PROPERTIES}
FRAME_MAX = 131072


# --- encoders of raw values ------------------------------------------------------------

def short(value: bytes) -> bytes:
    """A short string of any bytes (at most 255)."""
    return struct.pack(">B", len(value)) + value


def long(value: bytes) -> bytes:
    """A long string of any bytes."""
    return struct.pack(">I", len(value)) + value


def table(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A field table from (key bytes, raw field value: type byte + encoding) pairs."""
    body = b"".join(short(key) + value for key, value in fields)
    return long(body)


def array(values: Iterable[bytes]) -> bytes:
    """A field array from raw field values."""
    return long(b"".join(values))


def header_payload(body_size: int, properties: Mapping[str, bytes]) -> bytes:
    """A content header's payload: class 60, weight 0, the size, the flags, and each
    property in `properties` (name -> its wire encoding) in the order AMQP fixes."""
    unknown = set(properties) - set(PROPERTY_KIND)
    if unknown:
        raise ValueError(f"no such property: {sorted(unknown)}")
    flags = 0
    parts = []
    for name, bit in PROPERTIES:
        if name in properties:
            flags |= bit
            parts.append(properties[name])
    return struct.pack(">HHQH", 60, 0, body_size, flags) + b"".join(parts)


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + bytes([
        constants.FRAME_END])


# --- the connection --------------------------------------------------------------------

class RefusedError(Exception):
    """The broker closed the channel or the connection instead of confirming."""

    def __init__(self, what: str, code: int, text: str) -> None:
        self.what, self.code, self.text = what, code, text
        super().__init__(f"{what} closed: {code} {text}")


@dataclass
class Outcome:
    """What the broker said to one publish: "ack" (routed and confirmed), "returned"
    (confirmed, but no queue took it), "nack", "channel"/"connection" with the reply code
    and text of the close it caused, or "timeout" (no answer: it may have been taken)."""

    result: str
    code: int = 0
    text: str = ""


class RawPublisher:
    """One connection, one confirming channel; `publish` writes the frames it is given.

    After a refusal that closed the channel, the next publish opens a new channel; after
    one that closed the connection, call `connect` again (or use `publish_once`).
    """

    def __init__(self, host: str, port: int, user: str, password: str, vhost: str,
                 timeout: float = 30.0) -> None:
        self.host, self.port, self.user, self.password, self.vhost = (
            host, port, user, password, vhost)
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.channel = 0
        self.channel_open = False
        self.frame_max = FRAME_MAX
        self.tag = 0
        self.returned = False
        self._buffer = b""

    async def __aenter__(self) -> RawPublisher:
        await self.connect()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def connect(self) -> None:
        await self.close()
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.timeout)
        self._buffer, self.channel, self.channel_open = b"", 0, False
        self.writer.write(ProtocolHeader().marshal())
        await self._expect(commands.Connection.Start)
        response = b"\0" + self.user.encode() + b"\0" + self.password.encode()
        self._send(0, commands.Connection.StartOk(
            client_properties={"product": "relayd-tests raw publisher"}, mechanism="PLAIN",
            response=response.decode("latin-1"), locale="en_US"))
        tune = await self._expect(commands.Connection.Tune)
        self.frame_max = tune.frame_max or FRAME_MAX
        self._send(0, commands.Connection.TuneOk(channel_max=tune.channel_max,
                                                 frame_max=self.frame_max, heartbeat=0))
        self._send(0, commands.Connection.Open(virtual_host=self.vhost))
        await self._expect(commands.Connection.OpenOk)

    async def close(self) -> None:
        if self.writer is None:
            return
        writer, self.writer, self.reader = self.writer, None, None
        with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), self.timeout)

    async def _open_channel(self) -> None:
        self.channel += 1
        self._send(self.channel, commands.Channel.Open())
        await self._expect(commands.Channel.OpenOk)
        self._send(self.channel, commands.Confirm.Select())
        await self._expect(commands.Confirm.SelectOk)
        self.channel_open, self.tag = True, 0

    async def publish(self, exchange: str, routing_key: bytes | str, body: bytes,
                      properties: Mapping[str, bytes] | None = None,
                      header: bytes | None = None) -> Outcome:
        """Publish one message with a content header built from raw `properties` (or the
        exact `header` payload given); wait for the broker's verdict."""
        if self.writer is None:
            await self.connect()
        if not self.channel_open:
            await self._open_channel()
        key = routing_key.encode() if isinstance(routing_key, str) else routing_key
        # Basic.Publish: reserved short, exchange, routing key (raw bytes), mandatory bit
        method = (struct.pack(">IH", commands.Basic.Publish.index, 0) + short(exchange.encode())
                  + short(key) + b"\x01")
        frames = [_frame(constants.FRAME_METHOD, self.channel, method),
                  _frame(constants.FRAME_HEADER, self.channel,
                         header if header is not None else
                         header_payload(len(body), properties or {}))]
        step = self.frame_max - 8
        frames += [_frame(constants.FRAME_BODY, self.channel, body[i:i + step])
                   for i in range(0, len(body), step)]
        assert self.writer is not None
        self.writer.write(b"".join(frames))
        self.tag, self.returned = self.tag + 1, False
        try:
            reply = await self._expect(commands.Basic.Ack, commands.Basic.Nack)
        except RefusedError as refused:
            return Outcome(refused.what, refused.code, refused.text)
        except TimeoutError:  # the broker may or may not have taken it
            await self.close()
            return Outcome("timeout")
        except (ConnectionError, OSError) as exc:
            await self.close()
            return Outcome("connection", 0, type(exc).__name__)
        if isinstance(reply, commands.Basic.Nack):
            return Outcome("nack")
        return Outcome("returned" if self.returned else "ack")

    # --- frames ------------------------------------------------------------------------

    def _send(self, channel: int, method: Any) -> None:
        assert self.writer is not None
        self.writer.write(frame.marshal(method, channel))

    async def _read_frame(self) -> tuple[int, Any]:
        """The next method frame from the broker (its own, so pamqp decodes it). Content
        frames, such as those of a returned message, are skipped undecoded: they may be
        hostile."""
        assert self.reader is not None
        while True:
            if len(self._buffer) >= 7:
                kind, channel, size = struct.unpack_from(">BHI", self._buffer)
                if len(self._buffer) >= 8 + size:
                    whole, self._buffer = self._buffer[:8 + size], self._buffer[8 + size:]
                    if kind == constants.FRAME_METHOD:
                        return channel, _method(whole)
                    continue
            chunk = await asyncio.wait_for(self.reader.read(65536), self.timeout)
            if not chunk:
                raise RefusedError("connection", 0, "the broker closed the socket")
            self._buffer += chunk

    async def _expect(self, *kinds: type) -> Any:
        """The next method frame of one of `kinds`; RefusedError if the broker closes
        instead. A Basic.Return is noted (`returned`): the Ack that follows counts."""
        while True:
            channel, value = await self._read_frame()
            if isinstance(value, commands.Connection.Close):
                with contextlib.suppress(Exception):
                    self._send(0, commands.Connection.CloseOk())
                await self.close()
                raise RefusedError("connection", value.reply_code, value.reply_text)
            if isinstance(value, commands.Channel.Close):
                self._send(channel, commands.Channel.CloseOk())
                self.channel_open = False
                raise RefusedError("channel", value.reply_code, value.reply_text)
            if isinstance(value, commands.Basic.Return):
                self.returned = True
            if isinstance(value, kinds):
                return value


def _method(whole: bytes) -> Any:
    """A method frame from the broker. Its close reasons quote what we sent (a routing key
    that is not UTF-8, say), which pamqp cannot decode: those are read here."""
    try:
        return frame.unmarshal(whole)[2]
    except UnmarshalingException:
        index, code = struct.unpack_from(">IH", whole, 7)
        closes = {commands.Channel.Close.index: commands.Channel.Close,
                  commands.Connection.Close.index: commands.Connection.Close}
        if index not in closes:
            raise
        text = whole[14:14 + whole[13]].decode("utf-8", "replace")
        return closes[index](reply_code=code, reply_text=text)


async def publish_once(host: str, port: int, user: str, password: str, vhost: str,
                       exchange: str, routing_key: bytes | str, body: bytes,
                       properties: Mapping[str, bytes] | None = None) -> Outcome:
    """Connect, publish one message, close."""
    async with RawPublisher(host, port, user, password, vhost) as publisher:
        return await publisher.publish(exchange, routing_key, body, properties)


def encoded(properties: Mapping[str, Any]) -> dict[str, bytes]:
    """Well-formed properties, encoded by pamqp: for the valid parts of a hostile header."""
    return {name: encode.field_table(value) if PROPERTY_KIND[name] == "table"
            else encode.by_type(value, PROPERTY_KIND[name])
            for name, value in properties.items()}
