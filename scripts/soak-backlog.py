#!/usr/bin/env python3
"""Bounded resources under a backlog: relayd drains 100k messages, through a memory alarm.

Usage: .venv/bin/python scripts/soak-backlog.py [--messages 100000] [--alarm-s 20]

On a dedicated RabbitMQ node (tests/support/broker.py; the machine's broker is not
touched): preload `--messages` sealed up messages into relayd.inbound, start `relayd run`
(heartbeat 5 s), let a business drain its inbox, and raise a memory alarm for `--alarm-s`
once a third of the backlog is done. Every 0.5 s it samples each worker's RSS. It prints
the RSS per worker (after start, peak, peak during the alarm), the drain rate, the worst
event-loop lag the workers logged, the node's "missed heartbeats" lines, and whether
relayd's connections were replaced. Not part of CI: it takes several minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.faults.rig import Rig
from tests.support.broker import TestBroker

DEVICES = 100


def progress(text: str) -> None:
    print(f"[soak] {text}", file=sys.stderr, flush=True)


async def preload(rig: Rig, total: int) -> None:
    """Seal and publish `total` messages round-robin over the devices, 500 at a time."""
    per_device = {p.keys.device: 0 for p in rig.phones}
    for start in range(0, total, 500):
        batch = []
        for n in range(start, min(total, start + 500)):
            phone = rig.phones[n % len(rig.phones)]
            kind = "start" if per_device[phone.keys.device] == 0 else "message"
            per_device[phone.keys.device] += 1
            body = None if kind == "start" else {"text": f"backlog #{n}"}
            batch.append(rig.send("soak", phone, kind, body))
        await asyncio.gather(*batch)
        if start % 10_000 == 0:
            progress(f"preloaded {start + len(batch)}")


async def soak(base: Path, total: int, alarm_s: float) -> dict[str, object]:
    node = TestBroker(base / "node")
    node.start()
    rig: Rig | None = None
    try:
        (base / "relay").mkdir()
        rig = await Rig.create(node, base / "relay", "soak",
                               {f"s{n}": 1 for n in range(DEVICES)})
        await rig.relayd.stop(signal.SIGTERM)  # the backlog first, then relayd
        await rig.pause_business()
        started = time.monotonic()
        await preload(rig, total)
        progress(f"preloaded {total} in {time.monotonic() - started:.0f} s")
        await rig.resume_business()
        rig.rss_max.clear()
        rig.relayd.start()
        await rig.ready()
        connections = rig.relayd_connections()
        began = time.monotonic()
        at_start = rig.relayd.rss()
        alarm_rss: dict[str, int] = {}
        alarmed = False
        while rig.ledger.arrived("soak") < total:
            if time.monotonic() - began > 1800:
                raise TimeoutError("the backlog did not drain in 30 minutes")
            if not alarmed and rig.ledger.arrived("soak") > total // 3:
                alarmed = True
                progress("memory alarm raised")
                node.ctl("set_vm_memory_high_watermark", "0")
                until = time.monotonic() + alarm_s
                while time.monotonic() < until:
                    for name, rss in rig.relayd.rss().items():
                        alarm_rss[name] = max(alarm_rss.get(name, 0), rss)
                    await asyncio.sleep(0.5)
                node.ctl("set_vm_memory_high_watermark", "0.4")
                progress("memory alarm cleared")
            await asyncio.sleep(1)
            progress(f"{rig.ledger.arrived('soak')} of {total} at the business")
        elapsed = time.monotonic() - began
        kept = {c[:2] for c in rig.relayd_connections()} == {c[:2] for c in connections}
        return {
            "messages": total,
            "drain_s": round(elapsed, 1),
            "rate_per_s (alarm included)": round(total / elapsed),
            "rss_mib_after_start": {k: round(v / 2**20) for k, v in at_start.items()},
            "rss_mib_peak_by_role": {k: round(v / 2**20) for k, v in rig.rss_max.items()},
            "rss_mib_peak_during_alarm": {k: round(v / 2**20) for k, v in alarm_rss.items()},
            "max_loop_lag_ms": rig.max_loop_lag_ms(0),
            "missed_heartbeats_lines": rig.missed_heartbeats(),
            "relayd_connections_kept": kept,
            "duplicates_at_business": sum(n - 1 for n in rig.ledger.at_business.values() if n),
        }
    finally:
        if rig is not None:
            await rig.close()
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--alarm-s", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relayd-soak-") as base:
        result = asyncio.run(soak(Path(base), args.messages, args.alarm_s))
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
