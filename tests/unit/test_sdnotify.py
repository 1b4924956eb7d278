"""relayd.sdnotify: the notify protocol over a real datagram socket, as systemd reads it."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.sdnotify import Notifier, without_notify


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path
             ) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket playing systemd, and its NOTIFY_SOCKET value."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = name = str(tmp_path / "notify")
    else:
        name = f"@relayd-test-{secrets.token_hex(6)}"
        address = "\0" + name[1:]
    sock.bind(address)
    sock.settimeout(5)
    try:
        yield sock, name
    finally:
        sock.close()


class TestNotifier:
    def test_ready_status_stopping_watchdog(self, listener: tuple[socket.socket, str]) -> None:
        """Each message arrives as one datagram of KEY=value lines."""
        sock, name = listener
        notifier = Notifier({"NOTIFY_SOCKET": name})
        assert notifier.ready("2/2 workers consuming")
        assert sock.recv(4096).decode().split("\n") == [
            "READY=1", "STATUS=2/2 workers consuming", f"MAINPID={os.getpid()}"]
        assert notifier.status("reloading")
        assert sock.recv(4096) == b"STATUS=reloading"
        assert notifier.stopping("stopping")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"

    def test_no_socket_is_a_no_op(self) -> None:
        """Outside systemd nothing is sent and nothing fails."""
        notifier = Notifier({})
        assert not notifier.ready("ready")
        assert notifier.watchdog_s is None

    def test_gone_socket_is_not_an_error(self, tmp_path: Path) -> None:
        """A NOTIFY_SOCKET nobody listens on makes send() return False, not raise."""
        assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")}).watchdog()

    def test_full_queue_does_not_block(self, listener: tuple[socket.socket, str]) -> None:
        """While the manager reads nothing, sends still return (the supervisor's loop must
        stay free to stop); once it reads, every datagram arrives, in order."""
        sock, name = listener
        notifier = Notifier({"NOTIFY_SOCKET": name})
        qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
        count = qlen + 20
        returned = threading.Event()

        def ping() -> None:
            for n in range(count):
                notifier.status(str(n))
            returned.set()
        threading.Thread(target=ping, daemon=True).start()
        assert returned.wait(10)  # a blocking send would wait for a read that comes later
        assert [sock.recv(4096) for _ in range(count)] == [
            f"STATUS={n}".encode() for n in range(count)]


class TestWatchdog:
    def test_half_of_watchdog_usec(self) -> None:
        """Pings are due at half the interval systemd gives."""
        assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_s == 15.0

    def test_for_our_pid_only(self) -> None:
        """A WATCHDOG_PID naming another process means the watchdog is not ours."""
        env = {"WATCHDOG_USEC": "30000000"}
        assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 15.0
        assert Notifier({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_s is None

    def test_unset_or_bad_values(self) -> None:
        """No, zero or unparsable WATCHDOG_USEC means no watchdog."""
        for value in ("", "0", "soon"):
            assert Notifier({"WATCHDOG_USEC": value}).watchdog_s is None

    def test_children_do_not_inherit_it(self) -> None:
        """Worker processes get an environment without the notify variables."""
        env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "PATH": "/bin"}
        assert without_notify(env) == {"PATH": "/bin"}
