"""One edge process holds many devices: channels shared, and the load tool kept working.

Real `relayd edge`, real WebSocket clients and the machine's RabbitMQ; no timed assertion.
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import orjson
import pytest

from tests.integration.edge_harness import running
from tests.integration.harness import Relay

DEVICES = 40
CHANNELS = 2


def device_consumers(vhost: str) -> list[dict[str, object]]:
    """The broker's consumers in `vhost` on device queues, with their channels."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_consumers", "-p", vhost, "queue_name", "channel_pid",
         "--formatter", "json", "--quiet"], check=True, capture_output=True, timeout=60)
    consumers: list[dict[str, object]] = orjson.loads(listed.stdout)
    return [c for c in consumers if str(c["queue_name"]).startswith("relayd.device.")]


class TestSharedChannels:
    async def test_many_device_consumers_share_the_edges_few_channels(self, relay: Relay
                                                                       ) -> None:
        """40 devices logged in to an edge with edge.channels = 2: the broker sees 40
        consumers on at most 2 channels, not a channel each."""
        devices = [await relay.add_device(f"user-{i}", f"dev-{i}") for i in range(DEVICES)]
        async with running(relay, channels=CHANNELS) as edge:
            sockets = [await edge.login(device) for device in devices]
            try:
                consumers = await asyncio.to_thread(device_consumers, relay.vhost)
            finally:
                await asyncio.gather(*(ws.close() for ws in sockets))
        assert len(consumers) == DEVICES
        assert len({c["channel_pid"] for c in consumers}) <= CHANNELS


def load_tool() -> ModuleType:
    path = Path(__file__).parents[2] / "scripts" / "edge_load.py"
    spec = importlib.util.spec_from_file_location("edge_load", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.load
class TestLoadTool:
    async def test_the_load_tool_holds_hundreds_and_each_still_receives(self) -> None:
        """scripts/edge_load.py with 300 devices: every one logs in to one edge process,
        stays connected, and gets the message put in its queue afterwards."""
        report = await load_tool().run(300, window=50, budget_s=300)
        assert report.held == 300
        assert report.received == 300
        assert report.rss_after_mb > 0
