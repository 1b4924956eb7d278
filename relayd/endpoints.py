"""The supervisor's HTTP endpoints: /metrics, /healthz, /readyz and /status.

A deliberately tiny HTTP/1.1 server on asyncio: GET (or HEAD) only, one request per
connection, answered from memory. It needs no framework and no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

_REQUEST_LIMIT = 8192
_READ_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Routes = dict[str, Callable[[], Response]]


async def serve(host: str, port: int, routes: Routes) -> asyncio.Server:
    """Listen on host:port and answer each GET from `routes` (path -> response)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            route = routes.get(target.split("?", 1)[0])
            if method not in ("GET", "HEAD"):
                response = Response(HTTPStatus.METHOD_NOT_ALLOWED, b"GET only\n")
            elif route is None:
                response = Response(HTTPStatus.NOT_FOUND, b"not found\n")
            else:
                response = route()
            writer.write(
                f"HTTP/1.1 {response.status.value} {response.status.phrase}\r\n"
                f"Content-Type: {response.content_type}\r\n"
                f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n".encode()
                + (response.body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass  # a client that does not speak HTTP gets nothing
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(answer, host, port, limit=_REQUEST_LIMIT)
