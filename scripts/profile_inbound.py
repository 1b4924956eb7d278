"""Where an inbound message's CPU goes: relayd's inbound path, with or without the broker;
and with --outbound, where a business reply's goes.

Usage: .venv/bin/python scripts/profile_inbound.py [--messages N] [--devices N]
           [--no-broker] [--outbound] [--postgres SERVER_URL] [--py-spy SECONDS] [--out FILE]
           [--workers N]

The machine is shared and its wall-clock is noisy: CPU µs per message is what to compare.

--no-broker  relayd's own code only: Consumer, Inbound and the SQLite store, fed fake
             deliveries (tests/unit/fakes.py) 256 at a time, into a sink that confirms at
             once. The process's CPU time per message (the SQLite commit thread included).
default      a real `relayd run --role inbound` over a preloaded backlog on the local
             RabbitMQ (as scripts/bench.py's b): the worker process's CPU time per message
             while the backlog drains, and with --py-spy S a py-spy profile of it for S
             seconds (`py-spy record -r 250 -f raw`, pip install py-spy), summarised by
             where the samples fall.
--outbound   a real `relayd run --role outbound` over a backlog of replies, as
             scripts/bench.py's c3 (each reply sealed to the 3 devices of its user, of 64
             users): the worker's CPU time per reply, and the py-spy profile as above.
--postgres   the store on a fresh database of that server (as bench.py's --postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import psutil
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

from relayd import config, envelope, keys, log, opaque, topology
from relayd.client import DeviceKeys, reply
from relayd.consume import Consumer
from relayd.crypto import Kem, raw_public
from relayd.inbound import Inbound
from relayd.keys import KeyRing, RelayKey
from relayd.store import Business, Device, open_store

# Where py-spy's samples fall: the first pattern found, from the innermost frame out.
CATEGORIES = [("crypto (HPKE, Ed25519)", ("relayd/envelope.py", "relayd/crypto.py")),
              ("structlog", ("structlog/", "relayd/log.py")),
              ("prometheus", ("prometheus_client/", "relayd/metrics.py")),
              ("AMQP client (aiormq, pamqp, aio-pika)", ("aiormq/", "pamqp/", "aio_pika/")),
              ("relayd.wire", ("relayd/wire.py",)),
              ("payload validation", ("relayd/payload.py",)),
              ("store on the loop", ("relayd/store/", "asyncpg/")),
              ("asyncio in Python (tasks, futures, locks, streams)", ("asyncio/",))]


DEVNULL = Path(os.devnull).open("w")  # noqa: SIM115 - the log stream, for the process's life


class Sink:
    """Confirms every publish at once."""

    async def to_business(self, *_: object) -> None:
        return None

    async def to_device(self, *_: object) -> None:
        return None

    async def dead_letter(self, *_: object) -> None:
        return None


async def no_broker(messages: int, senders: int) -> None:
    from tests.unit.fakes import FakeDelivery
    from tests.unit.helpers import RELAYS

    relay = RELAYS[Kem.X25519]
    key = RelayKey(relay.kid, relay.kem, datetime.now(UTC), relay.private,
                   raw_public(relay.kem, relay.private_raw))
    keyring = KeyRing({relay.kid: key}, key, relay.signing, b"o" * 32)
    tmp = tempfile.mkdtemp()
    log.setup(config.Logging(level="info", format="json"), stream=DEVNULL)
    settings = config.parse({
        "amqp": {"url": "amqp://localhost"}, "store": {"url": f"sqlite:///{tmp}/r.db"},
        "keys": {"dir": tmp}, "limits": {"device_rate": 1e9, "device_burst": 10**9,
                                         "max_age_seconds": 7 * 86400}}, environ={})
    store = await open_store(settings.store.url, secret=keyring.opaque_secret)
    await store.add_business(Business("acme", "guest"))
    devices = [DeviceKeys.generate(f"dev-{i}") for i in range(senders)]
    for i, device in enumerate(devices):
        await store.add_device(Device(device.device, f"user-{i}", Kem.X25519,
                                      device.enc_public, device.sign_public))
    deliveries = [FakeDelivery(body=devices[i % senders].seal(relay.public, devices[
        i % senders].payload("acme", "start" if i < senders else "message",
                             {"text": "x" * 250})), headers={envelope.KID_HEADER: relay.kid})
        for i in range(messages)]
    consumer = Consumer("inbound", settings.workers,
                        Inbound(settings, store, lambda: keyring, Sink()), Sink(), "q")
    started, cpu = time.monotonic(), time.process_time()
    for start in range(0, messages, bench.PREFETCH):
        for delivery in deliveries[start:start + bench.PREFETCH]:
            await consumer.on_message(delivery)
        while consumer.lanes.tasks:
            await asyncio.wait(set(consumer.lanes.tasks))
    cpu, elapsed = time.process_time() - cpu, time.monotonic() - started
    acked = sum(d.settled == ["ack"] for d in deliveries)
    print(f"no broker: {messages} messages ({acked} acked) from {senders} devices,"
          f" {cpu / messages * 1e6:.0f} µs CPU per message, {messages / elapsed:.0f} msg/s;"
          f" load average {os.getloadavg()[0]:.1f}")
    await store.close()


async def with_broker(messages: int, senders: int, spy_s: int, out: Path,
                      processes: int = 1) -> None:
    async with bench.scenario(bool(bench.POSTGRES)) as (vh, tmp, store_url):
        setup = bench.relay_setup(tmp, vh, store_url, Kem.X25519, processes)
        t = setup.settings.topology
        secret = keys.load(setup.settings.keys.dir, timedelta(days=1)).opaque_secret
        store = await open_store(setup.settings.store.url, secret=secret)
        await store.add_business(Business("acme", "guest"))
        devices = [DeviceKeys.generate(f"dev-{i}") for i in range(senders)]
        for i, device in enumerate(devices):
            await store.add_device(Device(device.device, f"user-{i}", Kem.X25519,
                                          device.enc_public, device.sign_public))
        await bench.declare(setup, topology.core(t) + topology.business(t, "acme", secret))
        backlog = [aio_pika.Message(devices[i % senders].seal(setup.relay, devices[
            i % senders].payload("acme", "start" if i < senders else "message",
                                 {"text": "x" * 250})),
            headers={envelope.KID_HEADER: setup.relay.kid},
            content_type=envelope.CONTENT_TYPE, delivery_mode=2) for i in range(messages)]
        connection = await aio_pika.connect(setup.settings.amqp.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            ingress = await channel.get_exchange(t.ingress_exchange)
            await bench.publish_all(ingress, t.inbound_routing_key, backlog)
            inbox = topology.business_inbox(t, "acme", secret)
            await measure(setup, "inbound", lambda: bench.depth(channel, inbox), messages,
                          f"from {senders} devices", spy_s, out, processes)
        await store.close()
    if spy_s:
        print(summary(out))


async def with_broker_outbound(replies: int, spy_s: int, out: Path) -> None:
    per_user, users = 3, bench.OUT_USERS // 3
    async with bench.scenario(bool(bench.POSTGRES)) as (vh, tmp, store_url):
        setup = bench.relay_setup(tmp, vh, store_url, Kem.X25519)
        t = setup.settings.topology
        secret = keys.load(setup.settings.keys.dir, timedelta(days=1)).opaque_secret
        store = await open_store(setup.settings.store.url, secret=secret)
        await store.add_business(Business("acme", "guest"))
        specs = topology.core(t) + topology.business(t, "acme", secret)
        queues, conversations = [], []
        for u in range(users):
            for k in range(per_user):
                device = DeviceKeys.generate(f"dev-{u}-{k}")
                await store.add_device(Device(device.device, f"user-{u}", Kem.X25519,
                                              device.enc_public, device.sign_public))
                specs += topology.device(t, device.device, secret)
                queues.append(topology.device_queue(t, device.device, secret))
            conversations.append((await store.open_conversation(
                f"user-{u}", "acme", int(time.time() * 1000), False, functools.partial(
                    opaque.conversation_id, secret, f"user-{u}", "acme"))).id)
        await bench.declare(setup, specs)
        backlog = [aio_pika.Message(
            reply(conversations[i % users], "message", {"text": "x" * 250}),
            content_type="application/json", user_id="guest", delivery_mode=2)
            for i in range(replies)]
        connection = await aio_pika.connect(setup.settings.amqp.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(t.replies_exchange)
            await bench.publish_all(exchange, "acme", backlog)

            async def arrived() -> int:
                depths = await asyncio.gather(*(bench.depth(channel, q) for q in queues))
                return sum(depths) // per_user

            await measure(setup, "outbound", arrived, replies, f"{users} users", spy_s, out)
        await store.close()
    if spy_s:
        print(summary(out))


async def measure(setup: bench.Setup, role: str, arrived: Callable[[], Awaitable[int]],
                  total: int, what: str, spy_s: int, out: Path, processes: int = 1) -> None:
    """Run `processes` `role` workers over the backlog; print their CPU time per message
    handled (py-spy profiles the first)."""
    workers = bench.Workers([bench.relay_command(setup, role)], setup.env)
    try:
        # polling: a process and a queue depth have no event to wait on
        supervisor = psutil.Process(workers.procs[0].pid)
        while len(children := supervisor.children()) < processes:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        worker = children[0]

        def cpu_s() -> float:
            return sum(sum(child.cpu_times()[:2]) for child in children)

        def by_thread() -> collections.Counter[str]:
            """The first worker's CPU seconds by thread name (the SQLite committer's, say)."""
            times: collections.Counter[str] = collections.Counter()
            for thread in worker.threads():
                comm = Path(f"/proc/{worker.pid}/task/{thread.id}/comm")
                name = "main" if thread.id == worker.pid else comm.read_text().strip()
                times[name] += thread.user_time + thread.system_time
            return times
        while (first := await arrived()) == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        cpu, threads, started = cpu_s(), by_thread(), time.monotonic()
        if spy_s:
            await asyncio.to_thread(subprocess.run, [
                str(Path(sys.executable).parent / "py-spy"), "record", "-r", "250",
                "-d", str(spy_s), "-f", "raw", "-o", str(out), "-p", str(worker.pid)],
                capture_output=True, check=True)
        else:
            while await arrived() < total * 0.95:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        done = await arrived() - first
        threads = by_thread() - threads
        cpu, elapsed = cpu_s() - cpu, time.monotonic() - started
        print(f"{processes} {role} worker(s): {done} messages ({what}),"
              f" {cpu / done * 1e6:.0f} µs CPU per message, {done / elapsed:.0f} msg/s;"
              f" load average {os.getloadavg()[0]:.1f}")
        print("  the first worker's threads, µs CPU per message: " + ", ".join(
            f"{name} {seconds / done * processes * 1e6:.0f}"
            for name, seconds in threads.most_common()))
    finally:
        workers.stop()


def summary(profile: Path) -> str:
    """The shares of py-spy's samples on the event loop's thread and the SQLite thread."""
    shares: collections.Counter[str] = collections.Counter()
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "concurrent/futures/thread.py" in stack:
            shares["SQLite commit thread (COMMIT's fsync included)" if "_WorkItem" in stack
                   else "idle"] += int(count)
            continue
        if frames[-1].startswith(("Runner.run", "run (uvloop")):
            # py-spy leaves out a thread waiting in epoll: this is the loop's own C code
            shares["event loop in C (uvloop: sockets, callbacks, task steps)"] += int(count)
            continue
        found = "relayd, the rest (lanes, handlers, glue)"
        for frame in reversed(frames):
            if frame.startswith(("Runner.run", "run (uvloop", "_run (relayd/cli.py")):
                break  # the root of every stack on the loop: not a category
            hit = next((name for name, where in CATEGORIES if any(w in frame for w in where)),
                       None)
            if hit is not None:
                found = hit
                break
        shares[found] += int(count)
    total = sum(n for name, n in shares.items() if name != "idle")
    return "\n".join(f"{n / total * 100:5.1f}%  {name}" for name, n in shares.most_common()
                     if name != "idle")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=bench.USERS)
    parser.add_argument("--no-broker", action="store_true")
    parser.add_argument("--outbound", action="store_true")
    parser.add_argument("--postgres", metavar="SERVER_URL", default="")
    parser.add_argument("--py-spy", type=int, default=0, metavar="SECONDS")
    parser.add_argument("--out", type=Path, default=Path("inbound-profile.txt"))
    parser.add_argument("--workers", type=int, default=1,
                        help="inbound worker processes (py-spy profiles the first)")
    args = parser.parse_args()
    bench.POSTGRES = args.postgres.rstrip("/")
    if args.outbound:
        uvloop.run(with_broker_outbound(args.messages, args.py_spy, args.out))
    elif args.no_broker:
        uvloop.run(no_broker(args.messages, args.devices))
    else:
        uvloop.run(with_broker(args.messages, args.devices, args.py_spy, args.out,
                               args.workers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
