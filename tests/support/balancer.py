"""A TCP load balancer for tests, as production puts one in front of the RabbitMQ nodes.

    python -m tests.support.balancer --listen HOST:0 UPSTREAM:PORT ...

prints the port it listens on, then joins each client connection to the first upstream,
in rotation, that accepts a connection within CONNECT_S; when either side closes, it
closes the other. A client whose every upstream fails is closed at once, so it retries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys

CONNECT_S = 1.0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def main(listen: str, upstreams: list[tuple[str, int]]) -> None:
    turn = itertools.cycle(range(len(upstreams)))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = next(turn)
        for host, port in upstreams[first:] + upstreams[:first]:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), CONNECT_S)
            except (OSError, TimeoutError):
                continue
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            return
        writer.close()

    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(serve, host, int(port))
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("upstreams", nargs="+")
    args = parser.parse_args()
    ups = [(u.rpartition(":")[0], int(u.rpartition(":")[2])) for u in args.upstreams]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.listen, ups))
    sys.exit(0)
