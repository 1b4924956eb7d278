"""The systemd notify protocol, spoken directly: one datagram per message to $NOTIFY_SOCKET.

A path socket, or an abstract one written `@name`. Outside systemd (no NOTIFY_SOCKET)
every call is a no-op. See sd_notify(3).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Tells the service manager READY, STATUS, STOPPING and WATCHDOG."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s = self._watchdog(env)

    @staticmethod
    def _watchdog(env: Mapping[str, str]) -> float | None:
        """Half of WATCHDOG_USEC, if the watchdog is meant for this process."""
        pid = env.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            return None
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        return usec / 2 / 1_000_000 if usec > 0 else None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` lines as one datagram; False if there is no one to tell."""
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto("\n".join(fields).encode(), self.address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def without_notify(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` minus the notify variables: child processes must not speak for us."""
    return {k: v for k, v in environ.items() if k not in ENVIRONMENT}
