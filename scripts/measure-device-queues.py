#!/usr/bin/env python3
"""Memory per idle device queue, measured on a dedicated RabbitMQ node (never the shared one).

Starts a private node (tests/support/broker.py), declares device queues exactly as relayd
does (relayd.topology.device: queue and binding), and reads the node's memory from
`rabbitmqctl status` at each step. Prints one JSON line per step, then a summary.

    .venv/bin/python scripts/measure-device-queues.py --steps 10000 50000
    .venv/bin/python scripts/measure-device-queues.py --steps 10000 --variant cqv2

--variant names the queue arguments changed from relayd's: `relayd` (as shipped),
`cqv2` (x-queue-version 2), `lazy` (x-queue-mode lazy). --pending N puts N messages of
--size bytes in each queue (a device offline with messages waiting); --idle S measures
again after S seconds without traffic (idle queue processes hibernate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aio_pika

from relayd import topology
from relayd.config import Topology
from tests.support.broker import TestBroker

CHANNELS = 16
SECRET = secrets.token_bytes(32)  # stands in for the relay's opaque secret
MIB = 1024 * 1024
VARIANTS: dict[str, dict[str, Any]] = {
    "relayd": {},
    "cqv2": {"x-queue-version": 2},
    "lazy": {"x-queue-mode": "lazy"},
}


def memory(broker: TestBroker) -> dict[str, int]:
    """The node's memory breakdown in bytes, as `rabbitmqctl status` reports it."""
    status = json.loads(broker.ctl("status", "--formatter", "json", timeout=120))
    breakdown = status["memory"]
    total = breakdown.get("total", {})
    return {
        "total": int(total.get("erlang", 0) if isinstance(total, dict) else total),
        "rss": int(total.get("rss", 0)) if isinstance(total, dict) else 0,
        "queue_procs": int(breakdown.get("queue_procs", 0)),
        "binary": int(breakdown.get("binary", 0)),
        "mnesia": int(breakdown.get("mnesia", 0)),
        "other_ets": int(breakdown.get("other_ets", 0)),
    }


async def declare(url: str, names: range, extra: dict[str, Any], pending: int,
                  size: int) -> None:
    """Declare and bind the queue of device dev-NNNNNN (named by its keyed token, as relayd
    names it) for every number in `names`, then put
    `pending` persistent messages of `size` bytes in each."""
    t = Topology()
    connection = await aio_pika.connect(url)
    async with connection:
        setup = await connection.channel()
        await setup.declare_exchange(t.devices_exchange, aio_pika.ExchangeType.DIRECT,
                                     durable=True)

        async def lane(offset: int) -> None:
            channel = await connection.channel()
            exchange = await channel.get_exchange(t.devices_exchange)
            body = bytes(size)
            for number in names[offset::CHANNELS]:
                device = f"dev-{number:06d}"
                queue_spec, binding = topology.device(t, device, SECRET)
                assert isinstance(queue_spec, topology.Queue)
                assert isinstance(binding, topology.Binding)
                queue = await channel.declare_queue(
                    queue_spec.name, durable=True, arguments={**queue_spec.arguments, **extra})
                await queue.bind(binding.exchange, binding.routing_key)
                for _ in range(pending):
                    await exchange.publish(aio_pika.Message(
                        body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), binding.routing_key)

        await asyncio.gather(*(lane(i) for i in range(CHANNELS)))


def settle(broker: TestBroker) -> dict[str, int]:
    """Memory once it stops moving (at most 10 readings, a second apart)."""
    previous = memory(broker)
    for _ in range(10):
        time.sleep(1)
        current = memory(broker)
        if abs(current["total"] - previous["total"]) < MIB:
            return current
        previous = current
    return previous


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10_000, 50_000],
                        help="queue counts to measure at, ascending")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="relayd")
    parser.add_argument("--pending", type=int, default=0, help="messages waiting per queue")
    parser.add_argument("--size", type=int, default=1024, help="bytes per waiting message")
    parser.add_argument("--idle", type=float, default=0, help="seconds to idle, then measure")
    parser.add_argument("--budget", type=float, default=1200,
                        help="seconds each step may take before the run gives up")
    parser.add_argument("--dir", type=Path, help="node directory (default: a temporary one)")
    args = parser.parse_args()
    steps = sorted(args.steps)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the node is stopped below
    with tempfile.TemporaryDirectory(prefix="relayd-measure-") as scratch:
        broker = TestBroker(args.dir or Path(scratch))
        broker.start(timeout=120)
        try:
            base = settle(broker)
            print(json.dumps({"queues": 0, **base}), flush=True)
            done, results = 0, []
            for step in steps:
                started = time.monotonic()
                asyncio.run(asyncio.wait_for(declare(
                    broker.amqp_url, range(done, step), VARIANTS[args.variant], args.pending,
                    args.size), args.budget))
                declared_s = time.monotonic() - started
                done = step
                now = settle(broker)
                per_queue = {k: round((now[k] - base[k]) / step) for k in now}
                results.append({"queues": step, "declare_s": round(declared_s, 1),
                                "total_mib": round(now["total"] / MIB, 1),
                                "bytes_per_queue": per_queue})
                print(json.dumps(results[-1]), flush=True)
            if args.idle:
                time.sleep(args.idle)
                now = settle(broker)
                results.append({"queues": done, "after_idle_s": args.idle,
                                "total_mib": round(now["total"] / MIB, 1),
                                "bytes_per_queue": {k: round((now[k] - base[k]) / done)
                                                    for k in now}})
                print(json.dumps(results[-1]), flush=True)
            version = broker.ctl("version").strip()
            print(json.dumps({"summary": {"rabbitmq": version, "variant": args.variant,
                                          "pending": args.pending, "size": args.size,
                                          "steps": results}}))
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
