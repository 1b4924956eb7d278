"""The edge under `relayd run`: `workers.edge` processes, supervised like the other workers.

Real supervisor and worker processes on a real broker; devices connect with the real
client (relayd.client.EdgeDevice) over WebSocket.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from relayd.client import DeviceKeys, EdgeDevice
from relayd.errors import ExitCode
from tests.integration.harness import WAIT, Relay, kill_group, relay_in_vhost, stop_process
from tests.integration.test_service import (
    relayd,
    sample,
    scrape,
    status_when,
)
from tests.support.broker import free_ports

NAME = "edge-service.example"


def edges(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [w for w in report["workers"] if w["role"] == "edge"]


def serving(port: int) -> Any:
    """A /status condition: ready, and every edge process listens on `port`."""
    def check(report: dict[str, Any]) -> bool:
        return bool(report["ready"]) and len(edges(report)) == 2 and all(
            w["state"] == "listening" and w["port"] == port for w in edges(report))
    return check


async def round_trip(relay: Relay, url: str, phone: DeviceKeys, laptop: DeviceKeys,
                     text: str, stored: set[int]) -> None:
    """The phone sends through the edge; the business sees it; the laptop gets the echo.
    `stored`: the seqs the laptop acknowledged before, as an app keeps them. One may come
    again (delivery is at least once): an edge process killed just after the laptop's
    acknowledgement reached it had not yet passed it on to the broker. The app drops it."""
    async with EdgeDevice(url, NAME, phone, relay.public) as sender, \
            EdgeDevice(url, NAME, laptop, relay.public) as other:
        sent = await sender.send("acme", "message" if text != "start" else "start",
                                 {"text": text})
        [event] = await relay.events("acme", 1)
        assert event["id"] == sent["id"]
        echo = await asyncio.wait_for(other.receive(), WAIT)
        while echo["seq"] in stored:
            await other.received(echo)
            echo = await asyncio.wait_for(other.receive(), WAIT)
        assert echo["body"]["body"] == {"text": text}
        await other.received(echo)
        stored.add(echo["seq"])


class TestEdgeUnderRun:
    async def test_edge_processes_are_supervised_and_share_one_port(self, tmp_path: Path
                                                                    ) -> None:
        """`relayd run` starts workers.edge processes on one port; the relay is ready only
        once they listen; status shows them with the port; devices go up and down
        through them; one killed is started again and the door stays open."""
        metrics_port, edge_port = free_ports(2)
        async with relay_in_vhost(tmp_path, metrics={"port": metrics_port},
                                  workers={"edge": 2, "shutdown_timeout": 5},
                                  edge={"name": NAME, "port": edge_port}) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device("alice", "phone")
            laptop = await relay.add_device("alice", "laptop")
            url = f"ws://127.0.0.1:{edge_port}/v1/device"
            process = relay.spawn()
            try:
                before = await status_when(metrics_port, serving(edge_port), wait=60)
                assert [w["name"] for w in edges(before)] == ["edge-0", "edge-1"]
                summary = relayd("status", "--config", str(relay.config_path))
                assert summary.returncode == ExitCode.OK, summary.stderr
                assert f"port {edge_port}" in summary.stdout
                stored: set[int] = set()
                await round_trip(relay, url, phone, laptop, "start", stored)

                victim = edges(before)[0]
                os.kill(victim["pid"], signal.SIGKILL)
                after = await status_when(metrics_port, lambda r: serving(edge_port)(r) and any(
                    w["restarts"] == 1 for w in edges(r)), wait=60)
                assert edges(after)[0]["pid"] != victim["pid"]
                for turn in range(4):  # new connections, over both processes' sockets
                    await round_trip(relay, url, phone, laptop, f"again {turn}", stored)
                samples = scrape(metrics_port)
                assert sample(samples, "relayd_workers_consuming", role="edge") == 2
                assert sample(samples, "relayd_worker_restarts_total", role="edge") == 1
                assert sample(samples, "relayd_edge_sends_total", answer="ack") >= 5
                assert stop_process(process) == ExitCode.OK
            finally:
                kill_group(process)

    async def test_no_edge_name_refuses_to_start(self, tmp_path: Path) -> None:
        """`relayd run --role edge` and `relayd edge` without edge.name exit 78 (config),
        naming the key, instead of starting a worker that cannot serve."""
        async with relay_in_vhost(tmp_path) as relay:
            for args in (("run", "--role", "edge"), ("edge",)):
                done = relayd(*args, "--config", str(relay.config_path))
                assert done.returncode == ExitCode.CONFIG, done.stderr
                assert "edge.name" in done.stderr
