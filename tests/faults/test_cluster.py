"""relayd on a 3-node RabbitMQ cluster whose nodes and hosts are cut off for real.

The cluster (tests/support/cluster.py) runs each node in a network namespace of its own;
a relayd host runs in one too, so a test can drop every packet of one link and leave its
TCP connections half-open, as a dead switch or a crashed machine would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from relayd import config, keys
from tests.faults.ledger import NOTES
from tests.support.broker import TestBroker
from tests.support.cluster import PREFIX, Cluster, Host, _netns, ip

pytestmark = [pytest.mark.faults, pytest.mark.broker_node,
              pytest.mark.asyncio(loop_scope="module")]

DETECT_S = 30.0  # a default relayd must notice a half-open connection well within this


async def until(check: Callable[[], bool], what: str, wait: float) -> float:
    """Poll state that offers no event (the broker's consumers, a log); the seconds it
    took."""
    started = time.monotonic()
    while not await asyncio.to_thread(check):
        if time.monotonic() - started > wait:
            raise AssertionError(f"timed out after {wait:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


def consumers(node: TestBroker, vhost: str) -> dict[str, int]:
    out = node.ctl("list_queues", "-p", vhost, "name", "consumers", "--no-table-headers",
                   "-q")
    return {name: int(count) for name, count in (line.split("\t") for line in
                                                 out.splitlines() if line)}


@dataclass
class RelaydHost:
    """`relayd run` in a host namespace of the cluster, logging beside its config."""

    host: Host
    config_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.config_path.parent / "relayd.log"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.host.command(sys.executable, "-m", "relayd", "run", "--config",
                                  str(self.config_path)),
                stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def logged(self, *events: str) -> bool:
        text = self.log.read_bytes()
        return any(f'"event":"{event}"'.encode() in text for event in events)


def relayd_config(root: Path, url: str, **sections: dict[str, Any]) -> Path:
    """A relayd config with the defaults for everything that decides how fast a failure
    is noticed (amqp.heartbeat above all)."""
    data: dict[str, Any] = {
        "amqp": {"url": url},
        "store": {"url": f"sqlite:///{root}/relayd.db"},
        "keys": {"dir": str(root / "keys")},
        "logging": {"level": "info", "format": "json"},
        "metrics": {"enabled": False},
        "retention": {"enabled": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "relayd.yaml"
    path.write_text(yaml.safe_dump(data))
    keys.generate(config.load(path, environ={}).keys.dir, "cluster-1")
    return path


@pytest_asyncio.fixture(loop_scope="module")
async def vhost(cluster: Cluster) -> AsyncIterator[str]:
    name = f"cluster-{secrets.token_hex(4)}"
    cluster.nodes[0].ctl("add_vhost", name)
    cluster.nodes[0].ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield name
    finally:
        with contextlib.suppress(RuntimeError):
            cluster.nodes[0].ctl("delete_vhost", name)


class TestHarness:
    async def test_three_nodes_and_a_cut_one_pauses(self, cluster: Cluster) -> None:
        """The nodes form one cluster; a node cut off from the others stops counting
        (pause_minority), and counts again once its link is back."""
        assert len(cluster.running(0)) == 3
        cluster.cut(2)
        try:  # Erlang notices a silent peer after its net tick (60 s by default)
            await until(lambda: len(cluster.running(0)) == 2, "node 2 to drop out", 120)
        finally:
            cluster.heal(2)
        await until(lambda: len(cluster.running(0)) == 3, "node 2 to come back", 120)

    async def test_a_failed_start_leaves_nothing_behind(self, tmp_path: Path) -> None:
        """A cluster whose nodes cannot start removes its namespaces and links anyway."""
        broken = Cluster(tmp_path, size=1, extra_conf="no_such_setting = 1\n")
        with pytest.raises(RuntimeError):
            await asyncio.to_thread(broken.start)
        assert not [n for n in _netns() if n.startswith(f"{PREFIX}{os.getpid()}-"
                                                          f"{broken.subnet}-")]
        assert f"rc{broken.subnet}:" not in ip("link").stdout


class TestFailureDetection:
    async def test_a_half_open_connection_is_noticed_within_seconds(
            self, cluster: Cluster, vhost: str, tmp_path: Path) -> None:
        """A relayd host whose link drops every packet leaves its connection half-open.
        With the default settings the broker drops relayd's consumers, and relayd gives
        the connection up, in seconds (a 30 s heartbeat took 60 to 90 s); once the link is
        back relayd consumes again."""
        node = cluster.nodes[0]
        host = cluster.host("detect")
        relayd = RelaydHost(host, relayd_config(
            tmp_path, f"amqp://guest:guest@{node.host}:{node.amqp_port}/{vhost}"))
        assert config.load(relayd.config_path, environ={}).amqp.heartbeat <= 10
        relayd.start()
        try:
            await until(lambda: consumers(node, vhost).get("relayd.inbound") == 1,
                        "relayd to consume", 60)
            host.cut()
            try:
                broker_s = await until(
                    lambda: consumers(node, vhost).get("relayd.inbound") == 0,
                    "the broker to drop relayd's consumer", DETECT_S)
                relayd_s = await until(lambda: relayd.logged("connection_lost",
                                                             "connect_failed"),
                                       "relayd to give up its connection", DETECT_S)
            finally:
                host.heal()
            await until(lambda: consumers(node, vhost).get("relayd.inbound") == 1,
                        "relayd to consume again", 60)
        finally:
            relayd.kill()
        NOTES.append(f"half-open relayd connection (heartbeat default): the broker dropped "
                     f"it after {broker_s:.0f} s, relayd after {broker_s + relayd_s:.0f} s")
