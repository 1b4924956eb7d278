"""What the relay shows of itself: the supervisor's endpoints and samples, a worker's loop lag.

The supervisor (relayd.supervisor) owns one Observer when `metrics.enabled`: a private
PROMETHEUS_MULTIPROC_DIR for its workers, message rates and queue depths sampled by its
jobs, and the routes of its HTTP endpoint (/metrics, /healthz, /readyz, /status).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relayd import endpoints, log, metrics, status
from relayd.config import Settings

_log = log.get("relayd.observe")


class Rates:
    """Messages per second by stage and outcome, over the last `window` samples."""

    def __init__(self, window: int = 7) -> None:
        self._samples: deque[tuple[float, dict[tuple[str, str], float]]] = deque(maxlen=window)

    def add(self, at: float, totals: dict[tuple[str, str], float]) -> None:
        """Note the message totals (relayd_messages_total by stage, outcome) at time `at`."""
        self._samples.append((at, totals))

    def per_second(self) -> dict[str, dict[str, float]]:
        rates: dict[str, dict[str, float]] = {}
        if len(self._samples) < 2:
            return rates
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        for (stage, outcome), value in last.items():
            rate = (value - first.get((stage, outcome), 0.0)) / (t1 - t0)
            rates.setdefault(stage, {})[outcome] = round(rate, 3)
        return rates


class Observer:
    """The supervisor's metrics: its workers' values, its own collector, and samples."""

    def __init__(self, settings: Settings, collector: metrics.SupervisorCollector) -> None:
        self.collector = collector
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="relayd-metrics-"))
        self.rates = Rates()
        self.depths = status.QueueDepths(settings)

    async def sample_rates(self) -> None:
        self.rates.add(time.monotonic(), metrics.message_totals(
            metrics.aggregated(self.metrics_dir)))

    async def sample_depths(self) -> None:
        try:
            self.collector.queues = await self.depths.sample()
        except Exception:
            self.collector.queues = {}  # absent rather than stale
            raise

    def forget(self, pid: int) -> None:
        """A worker process exited: drop its live gauges."""
        metrics.forget(self.metrics_dir, pid)

    def routes(self, ready: Callable[[], bool], describe: Callable[[], str],
               snapshot: Callable[[], dict[str, Any]]) -> endpoints.Routes:
        registry = metrics.registry(self.metrics_dir, self.collector)

        def readyz() -> endpoints.Response:
            if ready():
                return endpoints.Response(HTTPStatus.OK, b"ready\n")
            return endpoints.Response(HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"not ready: {describe()}\n".encode())

        return {
            "/metrics": lambda: endpoints.Response(HTTPStatus.OK, generate_latest(registry),
                                                   CONTENT_TYPE_LATEST),
            "/healthz": lambda: endpoints.Response(HTTPStatus.OK, b"alive\n"),
            "/readyz": readyz,
            "/status": lambda: endpoints.Response(HTTPStatus.OK, orjson.dumps(snapshot()),
                                                  "application/json"),
        }

    async def close(self) -> None:
        await self.depths.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


async def watch_lag(stage: str, every_s: float = 0.1, report_s: float = 1.0,
                    floor_ms: float = 10.0) -> None:
    """Log the loop's worst lag (how late a timer fired) each `report_s` it reached
    `floor_ms`: work that blocks the loop, such as crypto or storage, shows here before it
    starves heartbeats."""
    loop = asyncio.get_running_loop()
    worst, reported = 0.0, loop.time()
    while True:
        before = loop.time()
        await asyncio.sleep(every_s)
        now = loop.time()
        worst = max(worst, now - before - every_s)
        if now - reported >= report_s:
            if worst * 1000 >= floor_ms:
                _log.info("loop_lag", stage=stage, latency_ms=round(worst * 1000, 1))
            worst, reported = 0.0, now
