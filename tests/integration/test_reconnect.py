"""Every connection a running relay holds comes back after the broker and the database
drop them all, and with them every metric.

Only this test's own vhost and database lose their connections (`rabbitmqctl
close_all_connections --vhost`, and PostgreSQL's `pg_terminate_backend` for each
session of the database), so the shared broker and server carry on for everyone else.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import asyncpg

from tests.integration.harness import kill_group, rabbitmqctl, relay_in_vhost, stop_process
from tests.integration.test_resilience import collect
from tests.integration.test_service import all_up, scrape, status_when, until
from tests.support.broker import free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
# What relayd run holds with the default roles: one connection per worker, and the
# supervisor's own for the queue depths.
CONNECTIONS = {"relayd-inbound", "relayd-outbound", "relayd-retention", "relayd-status"}


def connections(vhost: str) -> set[str]:
    """The connection_name of every connection open in `vhost`."""
    out = rabbitmqctl("-q", "list_connections", "--formatter", "json", "vhost",
                      "client_properties")
    return {str(properties.get("connection_name", "")) for row in json.loads(out)
            if row["vhost"] == vhost
            for properties in [{key: value for key, _, value in row["client_properties"]}]}


async def terminate_sessions(store_url: str) -> int:
    """End every other session on the relay's database, as a server restart would."""
    name = urllib.parse.urlsplit(store_url).path.lstrip("/")
    admin = await asyncpg.connect(store_url.rsplit("/", 1)[0] + "/postgres")
    try:
        ended: int = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()", name)
    finally:
        await admin.close()
    return ended


def consumers(samples: Samples) -> dict[frozenset[tuple[str, str]], float]:
    """relayd_queue_consumers by queue: what the supervisor last saw on the broker."""
    return {labels: count for (name, labels), count in samples.items()
            if name == "relayd_queue_consumers"}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_every_connection_and_metric_comes_back(tmp_path: Path) -> None:
    """After the broker closes every connection of the relay's vhost and PostgreSQL ends
    every session of its database: each worker and the supervisor's depth sampler
    connect again (relayd_reconnects_total counts the workers'), every series /metrics
    showed before is there again, queue depths among them, and a message sent after the
    cut goes through the store and reaches the business."""
    port = free_port()
    async with relay_in_vhost(tmp_path, store="postgresql", metrics={"port": port}) as relay:
        await relay.add_business("acme")
        device = await relay.add_device("user-1", "dev-1")
        process = relay.spawn()
        try:
            await status_when(port, all_up, wait=60)
            first = await relay.send(device, "acme", "start")
            await collect(relay, {first})

            async def complete() -> Samples | None:
                """Every series there: the message counted, and the queue depths sampled
                since the workers consume (the first sample may precede them)."""
                samples = scrape(port)
                return samples if all(
                    value(samples, "relayd_queue_consumers", queue=queue) == 1
                    for queue in ("inbound", "outbound")) \
                    and value(samples, "relayd_messages_total", stage="inbound",
                              outcome="delivered") == 1 else None
            before = await until(complete, 60)
            assert connections(relay.vhost) >= CONNECTIONS

            rabbitmqctl("close_all_connections", "--vhost", relay.vhost,
                        "test: every connection of this vhost")
            assert await terminate_sessions(relay.settings.store.url) > 0

            async def back() -> set[str] | None:
                names = connections(relay.vhost)
                return names if names >= CONNECTIONS else None
            await until(back, 60)

            async def recovered() -> Samples | None:
                samples = scrape(port)
                reconnected = all(value(samples, "relayd_reconnects_total", stage=stage) >= 1
                                  for stage in ("inbound", "outbound"))
                return samples if reconnected and value(samples, "relayd_ready") == 1 \
                    and set(before) <= set(samples) \
                    and consumers(samples) == consumers(before) else None
            after = await until(recovered, 60)

            await relay.reconnect()  # the test's own connection was in the vhost too
            second = await relay.send(device, "acme", "message", {"text": "after"})
            seen, _ = await collect(relay, {second})
            assert stop_process(process) == 0
        finally:
            kill_group(process)
    assert set(before) - set(after) == set()
    assert consumers(after) == consumers(before)
    assert second in seen
