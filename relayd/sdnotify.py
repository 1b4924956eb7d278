"""The systemd notify protocol, spoken directly: one datagram per message to $NOTIFY_SOCKET.

A path socket, or an abstract one written `@name`. Outside systemd (no NOTIFY_SOCKET)
every call is a no-op. See sd_notify(3).

A send never blocks the caller (the supervisor's event loop, which must stay free to stop):
while the manager's receive queue is full, datagrams wait, in order, for a thread that
sends them as the manager reads.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections import deque
from collections.abc import Mapping

ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Tells the service manager READY, STATUS, STOPPING and WATCHDOG."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s = self._watchdog(env)
        self._backlog: deque[bytes] = deque()  # not sent yet: the manager's queue was full
        self._lock = threading.Lock()

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
        datagram = "\n".join(fields).encode()
        with self._lock:
            if self._backlog:  # behind the others, in order
                self._backlog.append(datagram)
                return True
            try:
                self._sendto(datagram, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._backlog.append(datagram)
                threading.Thread(target=self._send_backlog, name="relayd-notify",
                                 daemon=True).start()
            except OSError:
                return False
        return True

    def _send_backlog(self) -> None:
        """Send the backlog, waiting as long as the manager takes to read."""
        while True:
            with self._lock:
                if not self._backlog:
                    return
                datagram = self._backlog[0]
            with contextlib.suppress(OSError):  # the manager went away: nobody to tell
                self._sendto(datagram)
            with self._lock:
                self._backlog.popleft()

    def _sendto(self, datagram: bytes, flags: int = 0) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(datagram, flags, self.address)

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
