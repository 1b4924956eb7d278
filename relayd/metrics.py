"""Prometheus metrics. Workers count; the supervisor serves the sum over every worker.

Worker processes run in prometheus-client's multiprocess mode: `relayd run` gives them a
private PROMETHEUS_MULTIPROC_DIR, where each process keeps its values in a file, and
sums the files when scraped. Labels only ever hold stages, outcomes, reason codes,
publish targets and queue roles: never an id.
"""

from __future__ import annotations

import functools
import platform
import re
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from relayd import __version__

MESSAGES = Counter("relayd_messages", "Messages handled, by stage and outcome.",
                   ["stage", "outcome"])
REJECTIONS = Counter("relayd_rejections", "Messages rejected (dead-lettered or answered "
                     "with an error event), by stage and reason code.", ["stage", "reason"])
CONFIRM_LATENCY = Histogram(
    "relayd_publish_confirm_seconds", "From a publish to the broker's confirm, by target.",
    ["target"], buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
END_TO_END = Histogram(
    "relayd_end_to_end_seconds", "From a message's arrival (or its AMQP timestamp) to its "
    "ack, by stage.", ["stage"],
    buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
IN_FLIGHT = Gauge("relayd_in_flight_messages", "Messages received and not yet settled.",
                  ["stage"], multiprocess_mode="livesum")
SKIPPED = Counter("relayd_devices_skipped", "Copies of a message not sent to one device of "
                  "a user (its stored key cannot be sealed to; device_error_lost: the "
                  "error telling it of its refused message could not be published), by "
                  "reason.", ["reason"])
RECONNECTS = Counter("relayd_reconnects", "Connections to the broker made again after the "
                     "first, by stage.", ["stage"])
EDGE_CONNECTIONS = Gauge("relayd_edge_connections", "Device connections open at the edge.",
                         multiprocess_mode="livesum")
EDGE_CLOSES = Counter("relayd_edge_closes", "Device connections ended at the edge, by close "
                      "code (1006: dropped without a close frame).", ["code"])
WAKES = Counter("relayd_wakes", "Push wakes for devices queued to, by outcome: sent, online "
                "(an edge reads its queue), throttled (woken within wake.interval), empty, "
                "gone, skipped (too many checks at once), failed.", ["outcome"])
EDGE_SENDS = Counter("relayd_edge_sends", "Up messages from devices at the edge, by answer: "
                     "ack, or the nack code.", ["answer"])

EDGE_RECEIPTS = Counter("relayd_edge_receipts", "Receipts of business messages a device "
                        "acknowledged, handed back to relayd by the edge, by outcome: "
                        "confirmed or lost.", ["outcome"])
_REASON = re.compile(r"[a-z][a-z_]{0,39}")
ACKED = ("delivered", "dead_lettered")
OUTCOMES = ("delivered", "dead_lettered", "rejected", "retry", "unsettled")
HANDLING = ("inbound", "outbound", "gdpr")  # the roles whose workers handle messages
M = TypeVar("M", Counter, Gauge, Histogram)


@functools.cache
def _child(metric: M, *values: str) -> M:
    """metric.labels(*values), looked up once per label set (they are few and fixed)."""
    return metric.labels(*values)


def reason_label(reason: str) -> str:
    """A reason code as a label value; anything else is `other` (labels stay bounded)."""
    return reason if _REASON.fullmatch(reason) else "other"


def at_zero(role: str) -> None:
    """Create the counters a worker of `role` keeps, at 0: a series that appears only
    at its first increment shows no rate and fires no alert until then."""
    _child(RECONNECTS, role)
    if role in HANDLING:
        for outcome in OUTCOMES:
            _child(MESSAGES, role, outcome)
    if role == "edge":
        _child(EDGE_SENDS, "ack")
        EDGE_CONNECTIONS.set(0)


def received(stage: str) -> None:
    _child(IN_FLIGHT, stage).inc()


def settled(stage: str) -> None:
    """The message left our hands: settled, or abandoned to the broker's redelivery."""
    _child(IN_FLIGHT, stage).dec()


def handled(stage: str, outcome: str, reason: str, kind: str, latency_s: float,
            sent_at: datetime | None) -> None:
    """Count one settled message; `kind` `error:<code>` means it was answered with an error."""
    if kind.startswith("error:"):
        outcome, reason = "rejected", kind.removeprefix("error:")
    _child(MESSAGES, stage, outcome).inc()
    if outcome in ("rejected", "dead_lettered", "dead_lettered_by_broker"):
        _child(REJECTIONS, stage, reason_label(reason)).inc()
    if outcome in ACKED or outcome == "rejected":
        waited = time.time() - sent_at.timestamp() if sent_at is not None else 0.0
        _child(END_TO_END, stage).observe(max(latency_s, waited))


def woke(outcome: str) -> None:
    """One push wake decided (relayd.wake): its outcome."""
    _child(WAKES, outcome).inc()


def skipped(reason: str) -> None:
    """One device's copy of a message was not sent (the others were)."""
    _child(SKIPPED, reason_label(reason)).inc()


def confirmed(target: str, seconds: float) -> None:
    _child(CONFIRM_LATENCY, target).observe(seconds)


def aggregated(metrics_dir: Path, registry: CollectorRegistry | None = None) -> Collector:
    """The sum of every worker's values in `metrics_dir` (registered in `registry`)."""
    collector: Collector = MultiProcessCollector(  # type: ignore[no-untyped-call]
        registry, str(metrics_dir))
    return collector


def registry(metrics_dir: Path, supervisor: Collector) -> CollectorRegistry:
    """What /metrics serves: the workers' values summed, the supervisor's own figures,
    and the standard process_*, python_info and python_gc_* metrics of the supervisor
    process (prometheus-client's default collectors)."""
    served = CollectorRegistry()
    aggregated(metrics_dir, served)
    for collector in (supervisor, PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        served.register(collector)
    return served


def forget(metrics_dir: Path, pid: int) -> None:
    """Drop the live gauges of a worker process that exited (its counters stay)."""
    mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]


def message_totals(collector: Collector) -> dict[tuple[str, str], float]:
    """relayd_messages_total by (stage, outcome), summed over the workers."""
    totals: dict[tuple[str, str], float] = {}
    for family in collector.collect():
        if family.name == "relayd_messages":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = (sample.labels["stage"], sample.labels["outcome"])
                    totals[key] = totals.get(key, 0.0) + sample.value
    return totals


class SupervisorCollector(Collector):
    """What only the supervisor knows: its workers, their restarts, the queue depths."""

    def __init__(self) -> None:
        self.configured: dict[str, int] = {}
        self.consuming: dict[str, int] = {}
        self.restarts: dict[str, int] = {}
        self.queues: dict[str, tuple[int, int]] = {}  # role -> (messages, consumers)
        self.ready = False

    def collect(self) -> Iterable[Metric]:
        configured = GaugeMetricFamily("relayd_workers", "Worker processes configured.",
                                       labels=["role"])
        consuming = GaugeMetricFamily("relayd_workers_consuming",
                                      "Worker processes connected and consuming.",
                                      labels=["role"])
        restarts = CounterMetricFamily("relayd_worker_restarts",
                                       "Worker processes restarted after they exited.",
                                       labels=["role"])
        for role, count in self.configured.items():
            configured.add_metric([role], count)
            consuming.add_metric([role], self.consuming.get(role, 0))
            restarts.add_metric([role], self.restarts.get(role, 0))
        depth = GaugeMetricFamily("relayd_queue_messages", "Messages ready in a queue.",
                                  labels=["queue"])
        consumers = GaugeMetricFamily("relayd_queue_consumers", "Consumers of a queue.",
                                      labels=["queue"])
        for queue, (messages, count) in self.queues.items():
            depth.add_metric([queue], messages)
            consumers.add_metric([queue], count)
        ready = GaugeMetricFamily("relayd_ready", "1 when every worker is consuming.")
        ready.add_metric([], 1 if self.ready else 0)
        build = GaugeMetricFamily("relayd_build_info", "Always 1: the relayd and Python "
                                  "versions of the supervisor.", labels=["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1)
        return [configured, consuming, restarts, depth, consumers, ready, build]


def edge_connections(change: int) -> None:
    EDGE_CONNECTIONS.inc(change)


def edge_closed(code: int) -> None:
    _child(EDGE_CLOSES, str(code)).inc()


def edge_send(answer: str) -> None:
    _child(EDGE_SENDS, reason_label(answer)).inc()


def edge_receipt(outcome: str) -> None:
    _child(EDGE_RECEIPTS, outcome).inc()
