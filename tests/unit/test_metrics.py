"""relayd.metrics: what one handled message counts, and the supervisor's own metrics."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from relayd import metrics, observe, supervisor


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class TestHandled:
    def test_dead_letter_counts_a_rejection_by_reason(self) -> None:
        """A dead-lettered message counts under its outcome and its reason code."""
        stage = f"s{uuid.uuid4().hex[:8]}"  # the registry is global: a stage of our own
        metrics.handled(stage, "dead_lettered", "stale", "", 0.01, None)
        metrics.handled(stage, "delivered", "", "message", 0.02, None)
        assert value("relayd_messages_total", stage=stage, outcome="dead_lettered") == 1
        assert value("relayd_messages_total", stage=stage, outcome="delivered") == 1
        assert value("relayd_rejections_total", stage=stage, reason="stale") == 1
        assert value("relayd_end_to_end_seconds_count", stage=stage) == 2

    def test_error_answer_is_a_rejection(self) -> None:
        """A reply answered with an error event counts as rejected, by its error code."""
        stage = f"s{uuid.uuid4().hex[:8]}"
        metrics.handled(stage, "delivered", "", "error:conversation_closed", 0.01, None)
        assert value("relayd_messages_total", stage=stage, outcome="rejected") == 1
        assert value("relayd_rejections_total", stage=stage, reason="conversation_closed") == 1

    def test_retries_are_not_end_to_end(self) -> None:
        """A message put back for a retry has not reached its end: no latency sample."""
        stage = f"s{uuid.uuid4().hex[:8]}"
        metrics.handled(stage, "retry", "unroutable: nothing bound", "", 0.01, None)
        assert value("relayd_messages_total", stage=stage, outcome="retry") == 1
        assert value("relayd_end_to_end_seconds_count", stage=stage) == 0

    def test_end_to_end_from_the_amqp_timestamp(self) -> None:
        """With an AMQP timestamp, end-to-end latency counts from it, not from arrival."""
        stage = f"s{uuid.uuid4().hex[:8]}"
        metrics.handled(stage, "delivered", "", "message", 0.001,
                        datetime.now(UTC) - timedelta(seconds=20))
        assert value("relayd_end_to_end_seconds_bucket", stage=stage, le="10.0") == 0
        assert value("relayd_end_to_end_seconds_bucket", stage=stage, le="30.0") == 1

    def test_in_flight_goes_back_to_zero(self) -> None:
        """Every received message is settled once: the gauge returns to where it was."""
        stage = f"s{uuid.uuid4().hex[:8]}"
        metrics.received(stage)
        metrics.received(stage)
        assert value("relayd_in_flight_messages", stage=stage) == 2
        metrics.settled(stage)
        metrics.settled(stage)
        assert value("relayd_in_flight_messages", stage=stage) == 0

    def test_reason_labels_stay_bounded(self) -> None:
        """Only reason codes become labels; free text (which could name anything) is other."""
        assert metrics.reason_label("decrypt_failed") == "decrypt_failed"
        assert metrics.reason_label("no device alice-phone") == "other"
        assert metrics.reason_label("x" * 80) == "other"


class TestSupervisorCollector:
    def test_exports_workers_restarts_queues(self) -> None:
        """The supervisor's view: configured and consuming workers, restarts, queue depths."""
        collector = metrics.SupervisorCollector()
        collector.configured = {"inbound": 2, "outbound": 1}
        collector.consuming = {"inbound": 1, "outbound": 1}
        collector.restarts = {"inbound": 3}
        collector.queues = {"dead": (7, 0)}
        registry = CollectorRegistry()
        registry.register(collector)
        assert registry.get_sample_value("relayd_workers", {"role": "inbound"}) == 2
        assert registry.get_sample_value("relayd_workers_consuming", {"role": "inbound"}) == 1
        assert registry.get_sample_value("relayd_worker_restarts_total",
                                         {"role": "inbound"}) == 3
        assert registry.get_sample_value("relayd_worker_restarts_total",
                                         {"role": "outbound"}) == 0
        assert registry.get_sample_value("relayd_queue_messages", {"queue": "dead"}) == 7
        assert registry.get_sample_value("relayd_ready", {}) == 0
        assert b"relayd_queue_consumers" in generate_latest(registry)


class TestBackoff:
    def test_doubles_up_to_the_cap(self) -> None:
        """A worker that keeps exiting waits 0.5 s, 1 s, 2 s ... up to 30 s."""
        waits = [supervisor.backoff(n) for n in range(1, 10)]
        assert waits[:4] == [0.5, 1.0, 2.0, 4.0]
        assert waits[-1] == supervisor.RESTART_MAX_S
        assert waits == sorted(waits)


class TestRates:
    def test_per_second_over_the_window(self) -> None:
        """Rates are the change of each total over the time between the oldest and newest
        samples; too few samples give none."""
        rates = observe.Rates(window=3)
        rates.add(0.0, {("inbound", "delivered"): 100})
        assert rates.per_second() == {}
        rates.add(10.0, {("inbound", "delivered"): 150, ("outbound", "rejected"): 5})
        rates.add(20.0, {("inbound", "delivered"): 300, ("outbound", "rejected"): 10})
        assert rates.per_second() == {"inbound": {"delivered": 10.0},
                                      "outbound": {"rejected": 0.5}}
        rates.add(30.0, {("inbound", "delivered"): 300, ("outbound", "rejected"): 10})
        assert rates.per_second()["inbound"] == {"delivered": 7.5}  # the oldest fell out
