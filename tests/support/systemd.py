"""systemd's side of the notify protocol, played by a test (relayd.sdnotify speaks to it)."""

from __future__ import annotations

import asyncio
import secrets
import socket

WAIT = 30.0


class FakeSystemd:
    """The service manager's side of the notify protocol, on an abstract socket."""

    def __init__(self) -> None:
        self.name = f"@relayd-test-{secrets.token_hex(6)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.sock.bind("\0" + self.name[1:])
        self.received: list[dict[str, str]] = []

    def environment(self, watchdog_usec: int = 300_000) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.name, "WATCHDOG_USEC": str(watchdog_usec)}

    async def until(self, key: str, wait: float = WAIT) -> dict[str, str]:
        """The next datagram that sets `key`."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(wait):
                while True:
                    data = await loop.sock_recv(self.sock, 65536)
                    message = dict(line.split("=", 1) for line in data.decode().splitlines())
                    self.received.append(message)
                    if key in message:
                        return message
        except TimeoutError:
            raise AssertionError(f"no {key} in {wait} s; the last messages: "
                                 f"{self.received[-5:]}") from None

    def pending(self) -> list[dict[str, str]]:
        """What arrived and was not read yet."""
        messages = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return messages
            messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> FakeSystemd:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
