"""relayd run under a real journald: each line is filed at its level, so that
`journalctl -p warning` shows the warnings of the supervisor and its workers.

systemd is not needed: the test starts a journald of its own, in a journal namespace
(systemd-journald NAMESPACE), and connects relayd's stdout to it the way systemd does for
StandardOutput=journal: a stream socket, a header, and $JOURNAL_STREAM. It needs root,
and removes the namespace's sockets and files afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

JOURNALD = Path("/lib/systemd/systemd-journald")
WAIT = 30.0


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "starts a journald: needs root"
    if not JOURNALD.is_file() or shutil.which("journalctl") is None:
        return "needs systemd-journald and journalctl"
    return None


def wait_for(check: Any, what: str) -> Any:
    """Poll `check` until it returns a true value: journald announces nothing."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def namespace() -> Iterator[str]:
    """A journald of our own, in a fresh namespace."""
    why = _why_not()
    if why:
        pytest.skip(why)
    name = f"relaydtest{secrets.token_hex(4)}"
    machine = Path("/etc/machine-id").read_text().strip()
    journald = subprocess.Popen([str(JOURNALD), name], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        wait_for(Path(f"/run/systemd/journal.{name}/stdout").exists, "journald's socket")
        yield name
    finally:
        journald.terminate()
        journald.wait(timeout=WAIT)
        shutil.rmtree(f"/run/systemd/journal.{name}", ignore_errors=True)
        for base in ("/var/log/journal", "/run/log/journal"):
            shutil.rmtree(f"{base}/{machine}.{name}", ignore_errors=True)


def journal_stream(namespace: str) -> socket.socket:
    """A stdout stream into the journal, as systemd opens one for a service with
    SyslogLevelPrefix=yes (the default): identifier, unit, priority 6, level prefix on."""
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.connect(f"/run/systemd/journal.{namespace}/stdout")
    stream.sendall(b"relayd\n\n6\n1\n0\n0\n0\n")
    stream.shutdown(socket.SHUT_RD)
    return stream


def entries(namespace: str, *options: str) -> list[dict[str, Any]]:
    """relayd's entries in the namespace's journal (not journald's own)."""
    out = subprocess.run(["journalctl", f"--namespace={namespace}", "-o", "json",
                          "--no-pager", *options, "SYSLOG_IDENTIFIER=relayd"],
                         capture_output=True, text=True,
                         check=True, timeout=WAIT).stdout
    return [json.loads(line) for line in out.splitlines()]


def event(entry: dict[str, Any]) -> str:
    message = json.loads(entry["MESSAGE"])
    assert isinstance(message, dict)
    return str(message["event"])


def test_levels_reach_journald(namespace: str, tmp_path: Path) -> None:
    """A broker that refuses connections: the workers' connect_failed lines are filed at
    warning (4) and the supervisor's start and stop at info (6), with the JSON intact;
    `journalctl -p warning` shows the warnings and no info line."""
    config = tmp_path / "relayd.yaml"
    config.write_text(yaml.safe_dump({
        "amqp": {"url": "amqp://guest:guest@127.0.0.1:1/none", "reconnect_max_backoff": 1},
        "store": {"url": f"sqlite:///{tmp_path}/relayd.db"},
        "keys": {"dir": str(tmp_path / "keys")},
        "logging": {"format": "json"},
        "metrics": {"port": 0},
    }))
    subprocess.run([sys.executable, "-m", "relayd", "keys", "generate", "--config",
                    str(config)], check=True, capture_output=True, timeout=WAIT)
    stream = journal_stream(namespace)
    info = os.fstat(stream.fileno())
    env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    with stream:
        relayd = subprocess.Popen([sys.executable, "-m", "relayd", "run", "--config",
                                   str(config)], stdout=stream.fileno(),
                                  stderr=stream.fileno(), env=env)
    try:
        wait_for(lambda: [e for e in entries(namespace) if "connect_failed" in e["MESSAGE"]],
                 "a connect_failed line")
        relayd.send_signal(signal.SIGTERM)
        assert relayd.wait(timeout=WAIT) == 0
    finally:
        if relayd.poll() is None:
            relayd.kill()
            relayd.wait()
    logged = wait_for(lambda: [e for e in entries(namespace) if '"stopped"' in e["MESSAGE"]]
                      and entries(namespace), "the stopped line")
    priorities = {(event(e), e["PRIORITY"]) for e in logged}
    assert ("connect_failed", "4") in priorities
    assert {("metrics_listening", "6"), ("stopping", "6"), ("stopped", "6")} <= priorities
    assert not [e for e in logged if e["MESSAGE"].startswith("<")]
    warnings = {event(e) for e in entries(namespace, "-p", "warning")}
    assert "connect_failed" in warnings
    assert not warnings & {"metrics_listening", "stopping", "stopped"}
