"""Commands against the real broker: each refusal by the broker exits 78 (the config
must change) with what to fix, only an unreachable broker is "cannot reach", and
topology declare speaks JSON like the other commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from relayd import keys
from relayd.errors import ExitCode
from tests.integration.harness import BROKER, WAIT, Relay, rabbitmqctl, write_config


def relayd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relayd", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=WAIT * 4, check=False)


def with_url(root: Path, url: str) -> Path:
    path = write_config(root, "unused")
    data = yaml.safe_load(path.read_text())
    data["amqp"]["url"] = url
    path.write_text(yaml.safe_dump(data))
    keys.generate(Path(data["keys"]["dir"]))
    return path


@pytest.fixture
def bare_vhost() -> Iterator[str]:
    """A vhost on which guest has no permissions."""
    vhost = f"relayd-test-bare-{secrets.token_hex(4)}"
    rabbitmqctl("add_vhost", vhost)
    try:
        yield vhost
    finally:
        rabbitmqctl("delete_vhost", vhost)


class TestBrokerRefusals:
    @pytest.mark.parametrize("command", [("topology", "declare"), ("status",)])
    def test_missing_vhost(self, tmp_path: Path, command: tuple[str, ...]) -> None:
        """A vhost that does not exist: 78, naming the vhost and how to create it."""
        vhost = f"relayd-test-missing-{secrets.token_hex(4)}"
        result = relayd(with_url(tmp_path, f"amqp://guest:guest@{BROKER}/{vhost}"), *command)
        assert result.returncode == ExitCode.CONFIG, result.stderr
        assert "amqp.url" in result.stderr
        assert f"rabbitmqctl add_vhost {vhost}" in result.stderr
        assert "InvalidFrameError" not in result.stderr

    def test_vhost_without_permissions(self, tmp_path: Path, bare_vhost: str) -> None:
        """A vhost the user may not use: 78, naming the user and set_permissions."""
        result = relayd(with_url(tmp_path, f"amqp://guest:guest@{BROKER}/{bare_vhost}"),
                        "topology", "declare")
        assert result.returncode == ExitCode.CONFIG, result.stderr
        assert "to guest" in result.stderr
        assert f"set_permissions -p {bare_vhost}" in result.stderr

    def test_wrong_password(self, tmp_path: Path) -> None:
        """A login refused: 78, naming the user, never the password."""
        password = secrets.token_hex(8)
        result = relayd(with_url(tmp_path, f"amqp://guest:{password}@{BROKER}/"),
                        "topology", "declare")
        assert result.returncode == ExitCode.CONFIG, result.stderr
        assert "refused the login of guest" in result.stderr
        assert password not in result.stderr

    def test_unreachable_broker_is_unavailable(self, tmp_path: Path) -> None:
        """Nothing listening: 69, "cannot reach the broker"."""
        result = relayd(with_url(tmp_path, "amqp://guest:guest@127.0.0.1:9/"),
                        "topology", "declare")
        assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
        assert "cannot reach the broker" in result.stderr


def test_topology_declare_json(relay: Relay) -> None:
    """topology declare --json prints one JSON object with the count."""
    result = relayd(relay.config_path, "topology", "declare", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["declared"] > 5


async def test_daemon_names_the_refusal_and_keeps_trying(tmp_path: Path) -> None:
    """`relayd run` on a missing vhost: each worker logs connect_failed with reason
    VhostRefusedError and tries again (so the relay comes up once the vhost exists), never
    an InvalidFrameError; it stops cleanly."""
    vhost = f"relayd-test-missing-{secrets.token_hex(4)}"
    config = with_url(tmp_path, f"amqp://guest:guest@{BROKER}/{vhost}")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", "run", "--role", "inbound", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    seen: list[dict[str, object]] = []

    async def refused_twice() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            with contextlib.suppress(ValueError):
                seen.append(json.loads(raw))
            if sum(line.get("event") == "connect_failed" for line in seen) >= 2:
                return

    try:
        await asyncio.wait_for(refused_twice(), WAIT * 2)
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), WAIT * 2)
    assert {line["reason"] for line in seen if line.get("event") == "connect_failed"} == {
        "VhostRefusedError"}
    assert not [line for line in seen if line.get("event") == "worker_exited"]
    assert code == ExitCode.OK
