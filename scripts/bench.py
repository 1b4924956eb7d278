"""The relay's benchmark: relayd against the relay a competent engineer writes, in one run.

Usage: .venv/bin/python scripts/bench.py [--quick] [--json FILE] [--soak SECONDS]
           [--only SCENARIO...] [--rate MSG_S] [--postgres SERVER_URL] [--shards N]
           [--repeat N]

Scenarios, each in a vhost of its own on the local RabbitMQ, each relay a process of its own:
  a     THE BASELINE: a pipelined aio-pika relay, no crypto, no store: consume callbacks
        with prefetch 256, publish persistent with publisher confirms, ack after the
        confirm, quorum queues on both sides, on uvloop as relayd's workers are
  aseq  a second row, not a baseline: the same relay awaiting each confirm before it takes
        the next message (what this bench compared against before issue 14)
  b     relayd inbound, X25519, one inbound worker process, a backlog from 128 devices
        (bf: from 4 devices, the per-device lanes' cost; b2: workers.inbound = 2;
        bp: b on PostgreSQL, needs --postgres)
  c1    relayd outbound, 1 device per user;  c3: 3 devices per user (c3x2: two workers)
        (c3c, a second row, not a baseline: c3's floor, a pipelined aio-pika relay doing
        only the reply's JSON and the 3 signed seals and confirmed publishes)
  d     relayd inbound with the MLKEM768_X25519 hybrid suite
  s1    relayd inbound through 4 shard queues, one worker;  s2: two workers
        (s1e: the same backlog as the edge publishes it, with the device's header, straight
        to the device's shard queue: no router)
  e     64 devices through one `relayd edge` process: up messages/s (acked after the
        broker's confirm), then device -> business -> device round trips at half the
        saturated rate of that path; e0: the same devices on raw AMQP, same run and rate
The store is SQLite (synchronous=FULL) in every scenario but bp, which runs b on a fresh
database on the --postgres server: the targets name SQLite, and bp/b compares the two
stores; --shards N runs b to d sharded too.
All use quorum work queues, persistent ~400-byte messages and the same prefetch.
For each: saturated throughput over a preloaded backlog, timed by arrivals at the relay's
output queue(s), then end-to-end latency at half that rate, CPU time per message of the
relay's process tree and the peak RSS of every process in it, and the whole machine's CPU
time per message ("host µs": relay, broker, database and this bench) with how busy its
CPUs were at saturation ("busy"): near 100%, a row's rate is what the machine's cores
give it, and its ratio to another row is at most the inverse ratio of their host µs.
Ratios against (a) come from the same run; --repeat N runs everything N times and says
for each target in how many runs it was met, with the machine's load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import psutil
import uvloop
import yaml

from relayd import envelope, keys, opaque, shard, topology
from relayd.client import DeviceKeys, RelayPublic, reply
from relayd.config import Settings, load
from relayd.crypto import Kem, b64e
from relayd.store import Business, Device, open_store

HOST = os.environ.get("RELAYD_BENCH_BROKER", "127.0.0.1:5672")
PREFETCH = 256
BODY_BYTES = 400
USERS = 128  # devices sending the inbound backlog (bf: FEW_DEVICES); users outbound
FEW_DEVICES = 4
OUT_USERS = 64  # outbound: users, each with 1 or 3 devices (each device a queue to poll)
SHARDS = 4
POLL_S = 0.01
FIXED_RATE = 0.0  # --rate: measure latency at this rate instead of half saturation
SCENARIOS = ["aseq", "ac", "b", "bf", "b2", "bp", "c1", "c3c", "c3", "c3x2", "d", "s1", "s1e",
             "s2", "e"]  # and a
QUICK = ["b", "bf", "b2", "c3", "d"]  # --quick's, to stay under two minutes
POSTGRES = ""  # --postgres: the server to make bp's database on
DEFAULT_SHARDS = 1  # --shards


def progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def vhost(prefix: str = "relayd-bench") -> Iterator[str]:
    """A vhost of its own on the local RabbitMQ, deleted afterwards."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    ctl("add_vhost", name)
    ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield name
    finally:
        ctl("delete_vhost", name)


@contextlib.asynccontextmanager
async def scenario(postgres: bool = False) -> AsyncIterator[tuple[str, Path, str]]:
    """A vhost, a directory and a store URL of the scenario's own: SQLite in the
    directory, or with `postgres` a fresh database on the --postgres server; all gone
    afterwards."""
    with vhost() as vh, tempfile.TemporaryDirectory() as tmp:
        if not postgres:
            yield vh, Path(tmp), f"sqlite:///{tmp}/relayd.db"
            return
        import asyncpg

        name = f"relayd_bench_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(f"{POSTGRES}/postgres")
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
            try:
                yield vh, Path(tmp), f"{POSTGRES}/{name}"
            finally:
                await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@dataclass
class Result:
    name: str
    messages: int
    rate: float = 0.0  # messages/s at saturation (for fan-out: replies/s)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    latency_rate: float = 0.0
    cpu_us: float = 0.0  # CPU time of the relay's process tree per message (for fan-out: reply)
    # the table's "host µs" and "busy": the whole machine's CPU time per message (relay,
    # broker, database, this bench) and how busy its CPUs were, 0 to 1, at saturation
    machine_us: float = 0.0
    busy: float = 0.0
    crypto_us: float = 0.0  # (b) only: HPKE open + Ed25519 verify per message, in the bench
    rss_mb: list[float] = field(default_factory=list)
    soak_rss_mb: list[float] = field(default_factory=list)  # every 10 s, the largest worker


class Workers:
    """The process tree under test: CPU time and peak RSS of every process in it."""

    def __init__(self, commands: list[list[str]], env: dict[str, str]) -> None:
        self.procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in commands]

    def tree(self) -> list[psutil.Process]:
        found = []
        for proc in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(proc.pid)
                found += [parent, *parent.children(recursive=True)]
        return found

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    def peak_rss_mb(self) -> list[float]:
        return [self._kib(proc.pid, "VmHWM:") / 1024 for proc in self.tree()]

    def rss_mb(self) -> list[float]:
        return [self._kib(proc.pid, "VmRSS:") / 1024 for proc in self.tree()]

    @staticmethod
    def _kib(pid: int, field: str) -> float:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field):
                    return round(float(line.split()[1]), 1)
        return 0.0

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def depth(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return int(declared.declaration_result.message_count or 0)


async def publish_all(exchange: aio_pika.abc.AbstractExchange, routing_key: str,
                      messages: list[aio_pika.Message]) -> None:
    """Publish with confirms, a window of 500 at a time."""
    for start in range(0, len(messages), 500):
        await asyncio.gather(*(exchange.publish(m, routing_key)
                               for m in messages[start:start + 500]))


async def saturate(arrived: Callable[[], Awaitable[int]], workers: Workers,
                   total: int, budget_s: float) -> tuple[float, float, float, float]:
    """Time a preloaded backlog through the workers by its arrivals at the output:
    from the first arrival seen to the last; (messages/s, the workers' CPU µs per
    message, the machine's CPU µs per message, how busy the machine's CPUs were)."""
    deadline = time.monotonic() + budget_s
    while (first := await arrived()) == 0:
        if time.monotonic() > deadline:
            raise TimeoutError("nothing came out of the relay")
        await asyncio.sleep(POLL_S)
    started, cpu_start, machine = time.monotonic(), workers.cpu_seconds(), psutil.cpu_times()
    last_report = started
    while (count := await arrived()) < total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"backlog not through within {budget_s} s")
        if time.monotonic() - last_report > 2:
            progress(f"  {count}/{total} arrived")
            last_report = time.monotonic()
        await asyncio.sleep(POLL_S)
    elapsed, cpu = time.monotonic() - started, workers.cpu_seconds() - cpu_start
    busy = machine_busy(psutil.cpu_times()) - machine_busy(machine)
    done = total - first
    return (done / elapsed, cpu / done * 1e6, busy / done * 1e6,
            busy / elapsed / (os.cpu_count() or 1))


def machine_busy(t: Any) -> float:
    """CPU seconds the machine's CPUs spent working (not idle, waiting or stolen)."""
    return float(t.user + t.nice + t.system + t.irq + t.softirq)


async def paced(send: Callable[[int], Awaitable[object]], rate: float, count: int) -> None:
    """Call send(i) `count` times at `rate` per second, without waiting for each."""
    started = time.monotonic()
    pending = set()
    for i in range(count):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(send(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)


def percentiles(samples: list[float], result: Result) -> None:
    samples.sort()
    result.p50_ms = round(statistics.median(samples) * 1000, 2)
    result.p99_ms = round(samples[int(len(samples) * 0.99) - 1] * 1000, 2)
    result.max_ms = round(samples[-1] * 1000, 2)


async def collect(channel: aio_pika.abc.AbstractChannel, queues: list[str], expected: int,
                  key: Callable[[aio_pika.abc.AbstractIncomingMessage], str],
                  sent_at: dict[str, float], budget_s: float) -> list[float]:
    """Consume `queues` until `expected` arrivals; return each one's latency in seconds.

    Arrivals are only timestamped here; `key` (which may decrypt) runs after the last one,
    so that the bench's own work does not delay the arrivals it measures."""
    arrivals: list[tuple[float, aio_pika.abc.AbstractIncomingMessage]] = []
    finished = asyncio.Event()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        arrivals.append((time.monotonic(), message))
        await message.ack()
        if len(arrivals) >= expected:
            finished.set()

    for name in queues:
        queue = await channel.get_queue(name, ensure=False)
        await queue.consume(on_message)
    await asyncio.wait_for(finished.wait(), budget_s)
    return [at - sent_at[key(message)] for at, message in arrivals]


@dataclass
class Run:
    """A scenario's relay (or baseline) under test, as measure() times it."""

    channel: aio_pika.abc.AbstractChannel
    workers: Workers
    arrived: Callable[[], Awaitable[int]]  # how many messages of the backlog came out
    sinks: list[str]  # where the messages come out: purged, then consumed for latency
    message: Callable[[int, str], aio_pika.Message]  # the i-th latency message, with its id
    publish: Callable[[aio_pika.Message], Awaitable[object]]
    key: Callable[[aio_pika.abc.AbstractIncomingMessage], str]  # the id of an arrival
    copies: int = 1  # arrivals per message (fan-out)


async def measure(name: str, result: Result, run: Run, latency_s: float) -> int:
    """Saturated throughput over the preloaded backlog, then end-to-end latency at half
    that rate (or --rate), into `result`; return how many latency messages were sent."""
    result.rate, result.cpu_us, result.machine_us, result.busy = await saturate(
        run.arrived, run.workers, result.messages, 300)
    progress(f"{name}: {result.rate:.0f} msg/s; latency at half rate")
    for sink in run.sinks:
        await (await run.channel.get_queue(sink, ensure=False)).purge()
    result.latency_rate = FIXED_RATE or result.rate / 2
    count = max(50, int(result.latency_rate * latency_s))
    ids = [str(uuid.uuid4()) for _ in range(count)]
    messages = [run.message(i, ids[i]) for i in range(count)]
    sent_at: dict[str, float] = {}

    async def send(i: int) -> None:
        sent_at[ids[i]] = time.monotonic()
        await run.publish(messages[i])

    consumer = asyncio.create_task(collect(
        run.channel, run.sinks, count * run.copies, run.key, sent_at, 120))
    await paced(send, result.latency_rate, count)
    percentiles(await consumer, result)
    return count


def by_message_id(message: aio_pika.abc.AbstractIncomingMessage) -> str:
    return str(message.message_id)


# --- the scenarios ----------------------------------------------------------------------

@dataclass
class Setup:
    settings: Settings
    config_path: Path
    relay: RelayPublic
    env: dict[str, str]


def relay_setup(root: Path, vhost_name: str, store: str, kem: Kem, workers: int = 1,
                shards: int = 1) -> Setup:
    """The config of a relay whose role under test runs `workers` processes."""
    config = {
        "amqp": {"url": f"amqp://guest:guest@{HOST}/{vhost_name}"},
        "store": {"url": store},
        "keys": {"dir": str(root / "keys")},
        "workers": {"prefetch": PREFETCH, "inbound": workers, "outbound": workers},
        # no rate limits: the bench floods from a few devices on purpose
        "limits": {"max_age_seconds": 7 * 86400, "device_rate": 1e9, "device_burst": 10**9,
                   "business_rate": 1e9, "business_burst": 10**9},
        "metrics": {"enabled": False},
        "topology": {"shards": shards},
    }
    path = root / "relayd.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load(path, environ={})
    keys.generate(settings.keys.dir, "bench-1", kem)
    from datetime import timedelta

    ring = keys.load(settings.keys.dir, timedelta(days=1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
    return Setup(settings, path, RelayPublic.from_json(ring.public_info()), env)


def relay_command(setup: Setup, role: str) -> list[str]:
    return [sys.executable, "-m", "relayd", "run", "--role", role,
            "--config", str(setup.config_path)]


async def declare(setup: Setup, specs: list[topology.Spec]) -> None:
    connection = await aio_pika.connect(setup.settings.amqp.url)
    async with connection:
        await topology.declare(await connection.channel(), specs)


def text_for(size: int) -> str:
    return "x" * max(1, size)


def crypto_us(setup: Setup, bodies: list[bytes], devices: list[DeviceKeys]) -> float:
    """CPU µs per message of what no relay with full crypto can skip: HPKE open and
    Ed25519 verify, as relayd does them, in this process."""
    from datetime import timedelta

    from relayd import envelope
    from relayd.crypto import ed25519_public
    from relayd.inbound import open_up

    ring = keys.load(setup.settings.keys.dir, timedelta(days=1))
    signers = {d.device: ed25519_public(d.sign_public) for d in devices}
    started = time.process_time()
    for body in bodies:
        opened = open_up(body, setup.relay.kid, ring, setup.settings.limits)
        envelope.verify(opened.signature, opened.payload, direction="up",
                        signer=signers[opened.device])
    return (time.process_time() - started) / len(bodies) * 1e6


async def inbound(name: str, kem: Kem, worker_count: int, total: int, latency_s: float,
                  soak_s: float = 0, shards: int = 0, senders: int = USERS,
                  postgres: bool = False, edge: bool = False,
                  floor: bool = False) -> Result:
    """`senders` devices (each its own user) send the backlog, in turn; with `edge`, each
    message is published as relayd's edge publishes it (its device in x-relayd-device,
    and, sharded, straight to the device's shard queue); with `floor`, CRYPTO_RELAY
    relays it instead of relayd."""
    result = Result(name, total)
    async with scenario(postgres) as (vh, tmp, store_url):
        setup = relay_setup(tmp, vh, store_url, kem, worker_count, shards or DEFAULT_SHARDS)
        t = setup.settings.topology
        keyring = keys.load(setup.settings.keys.dir, __import__("datetime").timedelta(1))
        store = await open_store(setup.settings.store.url, secret=keyring.opaque_secret)
        await store.add_business(Business("acme", "guest"))
        devices = [DeviceKeys.generate(f"dev-{i}", kem) for i in range(senders)]
        for i, device in enumerate(devices):
            await store.add_device(Device(device.device, f"user-{i}", kem, device.enc_public,
                                          device.sign_public))
        secret = keys.load(setup.settings.keys.dir, __import__("datetime").timedelta(1))
        await declare(setup, topology.core(t) + topology.shards(t)
                      + topology.business(t, "acme", secret.opaque_secret))
        probe = devices[0].seal(setup.relay, devices[0].payload("acme", "message", {"text": ""}))
        text = text_for(BODY_BYTES - len(probe))

        def sealed(i: int, message_id: str | None = None) -> aio_pika.Message:
            device = devices[i % senders]
            kind = "start" if i < senders else "message"
            body = device.seal(setup.relay, device.payload(
                "acme", kind, {"text": text}, message_id=message_id))
            headers: dict[str, Any] = {envelope.KID_HEADER: setup.relay.kid}
            if edge:
                headers[envelope.DEVICE_HEADER] = device.device
            return aio_pika.Message(body, headers=headers,
                                    content_type="application/vnd.relayd.sealed",
                                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

        connection = await aio_pika.connect(setup.settings.amqp.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            ingress = await channel.get_exchange(t.ingress_exchange)
            direct = await channel.get_exchange(t.shard_exchange) if t.shards > 1 else None

            def publish(m: aio_pika.Message) -> Awaitable[Any]:
                """Where the edge publishes (relayd.edge.link.Link.publish)."""
                device = (m.headers or {}).get(envelope.DEVICE_HEADER)
                if direct is None or not isinstance(device, str):
                    return ingress.publish(m, t.inbound_routing_key)
                return direct.publish(m, shard.device_shard(t, device))

            progress(f"{name}: sealing and preloading {total} envelopes")
            backlog = [sealed(i) for i in range(total)]
            if kem is Kem.X25519:
                result.crypto_us = crypto_us(setup, [m.body for m in backlog[:1000]], devices)
            for start in range(0, total, 500):  # with confirms, a window of 500 at a time
                await asyncio.gather(*(publish(m) for m in backlog[start:start + 500]))
            inbox = topology.business_inbox(t, "acme", secret.opaque_secret)
            command = relay_command(setup, "inbound")
            if floor:
                signers = tmp / "signers.json"
                signers.write_bytes(orjson.dumps({d.device: b64e(d.sign_public)
                                                  for d in devices}))
                command = [sys.executable, "-c", CRYPTO_RELAY, str(setup.config_path),
                           str(signers), inbox]
            workers = Workers([command], setup.env)
            try:
                count = await measure(name, result, Run(
                    channel, workers, lambda: depth(channel, inbox), [inbox],
                    lambda i, message_id: sealed(total + i, message_id),
                    publish, by_message_id),
                    latency_s)
                if soak_s:
                    result.soak_rss_mb = await soak(channel, inbox, workers, soak_s, ingress,
                                                    t.inbound_routing_key, result.latency_rate,
                                                    lambda i: sealed(total + count + i))
                result.rss_mb = workers.peak_rss_mb()
            finally:
                workers.stop()
        await store.close()
    return result


async def soak(channel: aio_pika.abc.AbstractChannel, inbox: str, workers: Workers,
               seconds: float, exchange: aio_pika.abc.AbstractExchange, routing_key: str,
               rate: float, make: Callable[[int], aio_pika.Message]) -> list[float]:
    """Hold `rate` for `seconds` with the inbox drained; sample the workers' RSS every 10 s."""
    progress(f"soak: {rate:.0f} msg/s for {seconds:.0f} s")
    queue = await channel.get_queue(inbox, ensure=False)
    tag = await queue.consume(lambda m: m.ack(), no_ack=False)
    samples: list[float] = []

    async def sample() -> None:
        while True:
            samples.append(max(workers.rss_mb()))
            progress(f"soak: RSS {samples[-1]:.1f} MB")
            await asyncio.sleep(10)

    sampler = asyncio.create_task(sample())
    try:
        await paced(lambda i: exchange.publish(make(i), routing_key), rate,
                    int(rate * seconds))
    finally:
        sampler.cancel()
        await queue.cancel(tag)
    return samples


async def outbound(name: str, per_user: int, total: int, latency_s: float,
                   worker_count: int = 1, floor: bool = False) -> Result:
    """Replies to users of `per_user` devices each; with `floor`, CRYPTO_FANOUT relays
    them instead of relayd."""
    result = Result(name, total)
    users = OUT_USERS // per_user if per_user > 1 else OUT_USERS
    async with scenario() as (vh, tmp, store_url):
        setup = relay_setup(tmp, vh, store_url, Kem.X25519, worker_count, DEFAULT_SHARDS)
        t = setup.settings.topology
        secret = keys.load(setup.settings.keys.dir, __import__("datetime").timedelta(1))
        store = await open_store(setup.settings.store.url, secret=secret.opaque_secret)
        await store.add_business(Business("acme", "guest"))
        conversations = []
        devices: dict[str, DeviceKeys] = {}
        households: dict[str, list[tuple[str, str]]] = {}  # for CRYPTO_FANOUT
        specs = (topology.core(t) + topology.shards(t)
                 + topology.business(t, "acme", secret.opaque_secret))
        for u in range(users):
            for k in range(per_user):
                device = DeviceKeys.generate(f"dev-{u}-{k}")
                devices[device.device] = device
                await store.add_device(Device(device.device, f"user-{u}", Kem.X25519,
                                              device.enc_public, device.sign_public))
                specs += topology.device(t, device.device, secret.opaque_secret)
            conversation = await store.open_conversation(
                f"user-{u}", "acme", int(time.time() * 1000), False,
                functools.partial(opaque.conversation_id, secret.opaque_secret, f"user-{u}",
                                  "acme"))
            conversations.append(conversation.id)
            households[conversation.id] = [(d.device, b64e(d.enc_public))
                                           for d in list(devices.values())[-per_user:]]
        await declare(setup, specs)
        text = text_for(BODY_BYTES - len(reply(conversations[0], "message", {"text": ""})))

        def message(i: int, reply_id: str | None = None) -> aio_pika.Message:
            body = reply(conversations[i % users], "message", {"text": text}, reply_id)
            return aio_pika.Message(body, content_type="application/json", user_id="guest",
                                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

        device_queues = [topology.device_queue(t, d, secret.opaque_secret) for d in devices]
        connection = await aio_pika.connect(setup.settings.amqp.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            replies = await channel.get_exchange(t.replies_exchange)
            progress(f"{name}: preloading {total} replies")
            await publish_all(replies, "acme", [message(i) for i in range(total)])
            command = relay_command(setup, "outbound")
            if floor:
                (tmp / "households.json").write_bytes(orjson.dumps(households))
                command = [sys.executable, "-c", CRYPTO_FANOUT, str(setup.config_path),
                           str(tmp / "households.json")]
            workers = Workers([command], setup.env)
            try:
                async def arrived() -> int:
                    counts = await asyncio.gather(*(depth(channel, q) for q in device_queues))
                    return sum(counts) // per_user

                by_key = {topology.device_routing_key(d, secret.opaque_secret): d
                          for d in devices}  # a copy names no device: its routing key does

                def reply_id(m: aio_pika.abc.AbstractIncomingMessage) -> str:
                    device = devices[by_key[str(m.routing_key)]]
                    return str(device.open(setup.relay, m.body)["id"])

                await measure(name, result, Run(
                    channel, workers, arrived, device_queues, message,
                    lambda m: replies.publish(m, "acme"), reply_id, per_user), latency_s)
                result.rss_mb = workers.peak_rss_mb()
            finally:
                workers.stop()
        await store.close()
    return result


# (e): devices through one `relayd edge` process against the same devices on raw AMQP
# (e0), in one run, on one relay (inbound and outbound workers, one each) and one store.
EDGE_DEVICES = 64
EDGE_WINDOW = 8  # up messages in flight per device (the edge allows edge.max_inflight)


class EdgeLane:
    """One device's logged-in WebSocket: sends with a window, counts the acks, and
    timestamps every deliver (acknowledging it at once)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.window = asyncio.Semaphore(EDGE_WINDOW)
        self.acked = 0
        self.refused = 0
        self.arrivals: list[tuple[float, bytes]] = []
        self.sent_at: dict[int, float] = {}  # ref -> when sent
        self.up_s: list[float] = []  # send to the edge's answer (the up leg), in seconds
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        from relayd.crypto import b64d

        async for data in self.ws:
            frame = orjson.loads(data)
            if frame["type"] == "deliver":
                self.arrivals.append((time.monotonic(), b64d(frame["sealed"])))
                await self.ws.send(orjson.dumps({"type": "received", "tag": frame["tag"]}),
                                   text=True)
            elif frame["type"] in ("ack", "nack"):
                self.up_s.append(time.monotonic() - self.sent_at.pop(frame["ref"], 0.0))
                self.acked += frame["type"] == "ack"
                self.refused += frame["type"] == "nack"
                self.window.release()

    async def send(self, ref: int, kid: str, sealed: bytes) -> None:
        await self.window.acquire()
        self.sent_at[ref] = time.monotonic()
        await self.ws.send(orjson.dumps({"type": "send", "ref": ref, "kid": kid,
                                         "sealed": b64e(sealed)}), text=True)


async def edge_path(total: int, latency_s: float) -> list[Result]:
    """(e) and (e0): up messages per second (acked after the broker's confirm), then
    device -> business -> device round trips at half the saturated rate of that path."""
    import edge_load  # scripts/edge_load.py, beside this file

    through = Result(f"e {EDGE_DEVICES} devices via one edge", total)
    direct = Result(f"e0 {EDGE_DEVICES} devices raw AMQP", total)
    async with scenario(False) as (vh, tmp, store_url):
        setup = relay_setup(tmp, vh, store_url, Kem.X25519)
        config = yaml.safe_load(setup.config_path.read_text())
        config["edge"] = {"name": edge_load.NAME, "port": 0, "connection_rate": 1e9,
                          "connection_burst": 10**9, "max_inflight": EDGE_WINDOW}
        config["logging"] = {"format": "json"}
        setup.config_path.write_text(yaml.safe_dump(config))
        t = setup.settings.topology
        secret = keys.load(setup.settings.keys.dir, __import__("datetime").timedelta(1))
        store = await open_store(setup.settings.store.url, secret=secret.opaque_secret)
        await store.add_business(Business("acme", "guest"))
        devices = [DeviceKeys.generate(f"dev-{i}") for i in range(EDGE_DEVICES)]
        specs = (topology.core(t) + topology.shards(t)
                 + topology.business(t, "acme", secret.opaque_secret))
        for i, device in enumerate(devices):
            await store.add_device(Device(device.device, f"user-{i}", Kem.X25519,
                                          device.enc_public, device.sign_public))
            specs += topology.device(t, device.device, secret.opaque_secret)
        await store.close()
        await declare(setup, specs)
        queues = [topology.device_queue(t, d.device, secret.opaque_secret) for d in devices]
        inbox = topology.business_inbox(t, "acme", secret.opaque_secret)
        text = text_for(BODY_BYTES - len(devices[0].seal(
            setup.relay, devices[0].payload("acme", "message", {"text": ""}))))

        def sealed(i: int, kind: str = "message", message_id: str | None = None) -> bytes:
            device = devices[i % EDGE_DEVICES]
            return device.seal(setup.relay, device.payload(
                "acme", kind, {"text": text}, message_id=message_id))

        def raw(body: bytes) -> aio_pika.Message:
            return aio_pika.Message(body, headers={"relayd-kid": setup.relay.kid},
                                    content_type="application/vnd.relayd.sealed",
                                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

        connection = await aio_pika.connect(setup.settings.amqp.url)
        async with connection, edge_load.edge_process(tmp) as (pid, port):
            channel = await connection.channel(publisher_confirms=True)
            ingress = await channel.get_exchange(t.ingress_exchange)
            url = f"ws://127.0.0.1:{port}/v1/device"
            lanes = [EdgeLane(await edge_load.log_in(url, d)) for d in devices]
            edge = psutil.Process(pid)
            try:
                # 1. Up, saturated: the workers are not running, the backlog is purged.
                progress(f"e: sealing {2 * total} envelopes")
                bodies = [sealed(i) for i in range(2 * total)]
                cpu = sum(edge.cpu_times()[:2])
                started = time.monotonic()

                async def through_edge(d: int) -> None:
                    for ref, i in enumerate(range(d, total, EDGE_DEVICES), 1):
                        await lanes[d].send(ref, setup.relay.kid, bodies[i])
                    for _ in range(EDGE_WINDOW):  # every answer in
                        await lanes[d].window.acquire()

                await asyncio.wait_for(asyncio.gather(
                    *(through_edge(d) for d in range(EDGE_DEVICES))), 300)
                elapsed = time.monotonic() - started
                through.rate = total / elapsed
                through.cpu_us = (sum(edge.cpu_times()[:2]) - cpu) / total * 1e6
                assert sum(lane.acked for lane in lanes) == total, "a send was refused"
                for lane in lanes:
                    lane.window = asyncio.Semaphore(EDGE_WINDOW)
                progress(f"e: {through.rate:.0f} up msg/s through the edge")
                await (await channel.get_queue(t.inbound_queue, ensure=False)).purge()
                started = time.monotonic()

                async def direct_up(d: int) -> None:
                    mine = bodies[total + d::EDGE_DEVICES]
                    for at in range(0, len(mine), EDGE_WINDOW):
                        await asyncio.gather(*(ingress.publish(raw(b), t.inbound_routing_key)
                                               for b in mine[at:at + EDGE_WINDOW]))

                await asyncio.wait_for(asyncio.gather(
                    *(direct_up(d) for d in range(EDGE_DEVICES))), 300)
                direct.rate = total / (time.monotonic() - started)
                progress(f"e0: {direct.rate:.0f} up msg/s on raw AMQP")
                await (await channel.get_queue(t.inbound_queue, ensure=False)).purge()
                # 2. The round trip: the relay's workers, and a business that answers each
                # message with a reply whose id is the message's.
                workers = Workers([relay_command(setup, "inbound"),
                                   relay_command(setup, "outbound")], setup.env)
                try:
                    await round_trips(setup, channel, ingress, inbox, queues, lanes, devices,
                                      sealed, raw, through, direct, latency_s)
                finally:
                    workers.stop()
                through.rss_mb = [Workers._kib(pid, "VmHWM:") / 1024]
            finally:
                for lane in lanes:
                    lane.reader.cancel()
                    lane.ws.transport.abort()
    return [through, direct]


async def round_trips(setup: Setup, channel: aio_pika.abc.AbstractChannel,
                      ingress: aio_pika.abc.AbstractExchange, inbox: str, queues: list[str],
                      lanes: list[EdgeLane], devices: list[DeviceKeys],
                      sealed: Callable[..., bytes], raw: Callable[[bytes], aio_pika.Message],
                      through: Result, direct: Result, latency_s: float) -> None:
    t = setup.settings.topology
    replies = await channel.get_exchange(t.replies_exchange)
    at_business: dict[str, float] = {}  # message id -> when the business had it

    async def answer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        event = orjson.loads(message.body)
        if event["type"] == "message":
            at_business[event["id"]] = time.monotonic()
            await replies.publish(aio_pika.Message(
                reply(event["conversation"], "message", {"text": "ok"}, event["id"]),
                content_type="application/json", user_id="guest", delivery_mode=2), "acme")
        await message.ack()

    await (await channel.get_queue(inbox, ensure=False)).consume(answer)
    for i in range(EDGE_DEVICES):  # each device's conversation, opened on raw AMQP
        await ingress.publish(raw(sealed(i, "start")), t.inbound_routing_key)

    async def arrived() -> int:  # the edge delivers the replies to the lanes
        return sum(len(lane.arrivals) for lane in lanes)

    # Saturation of the round trip: a burst up on raw AMQP, timed by its replies' arrivals.
    burst = max(EDGE_DEVICES, through.messages // 4)
    await publish_all(ingress, t.inbound_routing_key,
                      [raw(sealed(i)) for i in range(burst)])
    rate, *_ = await saturate(arrived, Workers([], {}), burst, 300)
    rate = FIXED_RATE or rate / 2
    progress(f"e: round trips at {rate:.0f} msg/s")
    count = max(50, int(rate * latency_s))
    ids = [str(uuid.uuid4()) for _ in range(2 * count)]
    bodies = [sealed(i, "message", ids[i]) for i in range(2 * count)]

    def reply_id(body: bytes, i: int) -> str:
        return str(devices[i % EDGE_DEVICES].open(setup.relay, body)["id"])

    # Through the edge: sent on the device's WebSocket, received as its deliver frames.
    sent_at: dict[str, float] = {}
    for lane in lanes:
        lane.arrivals.clear()
        lane.up_s.clear()

    async def via_edge(i: int) -> None:
        sent_at[ids[i]] = time.monotonic()
        await lanes[i % EDGE_DEVICES].send(10**6 + i, setup.relay.kid, bodies[i])

    await paced(via_edge, rate, count)
    deadline = time.monotonic() + 120
    while sum(len(lane.arrivals) for lane in lanes) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("round trips through the edge did not all come back")
        await asyncio.sleep(POLL_S)
    percentiles([at - sent_at[reply_id(body, d)] for d, lane in enumerate(lanes)
                 for at, body in lane.arrivals], through)
    legs = {"send to ack": [s for lane in lanes for s in lane.up_s],
            "send to business": [at_business[i] - sent_at[i] for i in ids[:count]],
            "business to device": [at - at_business[reply_id(body, d)]
                                   for d, lane in enumerate(lanes) for at, body in lane.arrivals]}
    for leg, samples in legs.items():
        part = Result(leg, count)
        percentiles(samples, part)
        progress(f"e: {leg} p50 {part.p50_ms} ms, p99 {part.p99_ms} ms")
    # The same on raw AMQP, at the same rate, once the edge has let go of the queues.
    for lane in lanes:
        lane.reader.cancel()
        await lane.ws.close()
    deadline = time.monotonic() + 60
    while any([await consumers(channel, q) for q in queues]):
        if time.monotonic() > deadline:
            raise TimeoutError("the edge did not let go of the device queues")
        await asyncio.sleep(POLL_S)
    arrivals: list[tuple[float, int, bytes]] = []
    done = asyncio.Event()

    def on_reply(d: int) -> Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]]:
        async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrivals.append((time.monotonic(), d, message.body))
            await message.ack()
            if len(arrivals) >= count:
                done.set()
        return handle

    for d, queue in enumerate(queues):
        await (await channel.get_queue(queue, ensure=False)).consume(on_reply(d))

    async def via_amqp(i: int) -> None:
        sent_at[ids[count + i]] = time.monotonic()
        await ingress.publish(raw(bodies[count + i]), t.inbound_routing_key)

    await paced(via_amqp, rate, count)
    await asyncio.wait_for(done.wait(), 120)
    for leg, samples in {
            "send to business": [at_business[i] - sent_at[i] for i in ids[count:]],
            "business to device": [at - at_business[reply_id(body, d)]
                                   for at, d, body in arrivals]}.items():
        part = Result(leg, count)
        percentiles(samples, part)
        progress(f"e0: {leg} p50 {part.p50_ms} ms, p99 {part.p99_ms} ms")
    percentiles([at - sent_at[reply_id(body, d)] for at, d, body in arrivals], direct)
    through.latency_rate = direct.latency_rate = rate


async def consumers(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return int(declared.declaration_result.consumer_count or 0)


# The baseline (a): the relay a competent engineer writes in twenty lines. Deliveries are
# handled concurrently (aio-pika runs each consume callback as a task of its own), each
# published persistent on a confirming channel and acked once the broker confirmed it.
PIPELINED_RELAY = """
import asyncio, sys, aio_pika, uvloop
async def main(url, prefetch):
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=prefetch)
    out = await channel.get_exchange("bench.out")
    queue = await channel.get_queue("bench.in")
    async def relay(message):
        await out.publish(aio_pika.Message(message.body, message_id=message.message_id,
                                           delivery_mode=2), routing_key="")
        await message.ack()
    await queue.consume(relay)
    await asyncio.Future()
uvloop.run(main(sys.argv[1], int(sys.argv[2])))
"""

# (ac), a second row and no baseline: (a) doing the work no relay with relayd's promises
# can skip, as relayd does it: HPKE open, Ed25519 verify, reading the payload's JSON;
# no store, no rules, no lanes. It is the floor under relayd's cost on this machine.
CRYPTO_RELAY = """
import asyncio, sys, aio_pika, orjson, uvloop
from datetime import timedelta
from relayd import envelope, keys
from relayd.config import load
from relayd.crypto import b64d, ed25519_public
from relayd.inbound import open_up
async def main(config, signers, inbox):
    settings = load(config)
    ring = keys.load(settings.keys.dir, timedelta(days=1))
    sign = {d: ed25519_public(b64d(k)) for d, k in orjson.loads(open(signers, "rb").read()).items()}
    connection = await aio_pika.connect(settings.amqp.url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=settings.workers.prefetch)
    queue = await channel.get_queue(settings.topology.inbound_queue)
    async def relay(message):
        opened = open_up(message.body, message.headers.get(envelope.KID_HEADER), ring,
                         settings.limits)
        envelope.verify(opened.signature, opened.payload, direction="up",
                        signer=sign[opened.device])
        await channel.default_exchange.publish(aio_pika.Message(
            opened.payload, message_id=str(opened.claims["id"]), delivery_mode=2), inbox)
        await message.ack()
    await queue.consume(relay)
    await asyncio.Future()
uvloop.run(main(*sys.argv[1:]))
"""

# (c3c), a second row and no baseline: c3's floor, as (ac) is b's. A pipelined relay of
# replies doing what no relay with relayd's promises can skip, as relayd does it: the
# reply's JSON, then for each device of the conversation's user a down payload signed and
# sealed to it, the copies published at once, the reply acked after their confirms; no
# store, no rules, no lanes (its down seqs are counted in memory).
CRYPTO_FANOUT = """
import asyncio, sys, aio_pika, orjson, uvloop
from datetime import timedelta
from relayd import keys, payload, topology
from relayd.config import load
from relayd.crypto import Kem, b64d
from relayd.deliver import now_ms, seal_down
from relayd.store import Device
async def main(config, households):
    settings = load(config)
    t = settings.topology
    ring = keys.load(settings.keys.dir, timedelta(days=1))
    by_conversation = {c: [(Device(d, "", Kem.X25519, b64d(k), b""),
                            topology.device_routing_key(d, ring.opaque_secret)) for d, k in ds]
                       for c, ds in orjson.loads(open(households, "rb").read()).items()}
    seqs = {}
    connection = await aio_pika.connect(settings.amqp.url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=settings.workers.prefetch)
    exchange = await channel.get_exchange(t.devices_exchange)
    queue = await channel.get_queue(t.outbound_queue)
    async def relay(message):
        reply = payload.parse_reply(message.body, settings.limits)
        ts, copies = now_ms(), []
        for device, routing_key in by_conversation[reply.conversation]:
            seqs[device.id] = seq = seqs.get(device.id, 0) + 1
            sealed = seal_down(ring, device, payload.down_payload(
                device.id, seq, ts, reply.id, "acme", reply.type, reply.body))
            copies.append(exchange.publish(aio_pika.Message(
                sealed, content_type="application/vnd.relayd.sealed", delivery_mode=2),
                routing_key))
        await asyncio.gather(*copies)
        await message.ack()
    await queue.consume(relay)
    await asyncio.Future()
uvloop.run(main(*sys.argv[1:]))
"""

# (aseq), a second row and no baseline: the same, awaiting each confirm before it takes
# the next delivery (the baseline of this bench before issue 14).
SEQUENTIAL_RELAY = """
import asyncio, sys, aio_pika, uvloop
async def main(url, prefetch):
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=prefetch)
    out = await channel.get_exchange("bench.out")
    queue = await channel.get_queue("bench.in")
    async with queue.iterator() as messages:
        async for message in messages:
            await out.publish(aio_pika.Message(message.body, message_id=message.message_id,
                                               delivery_mode=2), routing_key="")
            await message.ack()
uvloop.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def naive(name: str, relay: str, total: int, latency_s: float) -> Result:
    """(a) and (aseq): the same queues, sizes, prefetch and persistence as relayd's
    inbound path; no crypto, no store."""
    result = Result(name, total)
    with vhost() as vh:
        url = f"amqp://guest:guest@{HOST}/{vh}"
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            quorum: dict[str, Any] = {"x-queue-type": "quorum"}
            inbound_queue = await channel.declare_queue("bench.in", durable=True, arguments=quorum)
            await channel.declare_queue("bench.sink", durable=True, arguments=quorum)
            out = await channel.declare_exchange("bench.out", aio_pika.ExchangeType.FANOUT,
                                                 durable=True)
            await (await channel.get_queue("bench.sink")).bind(out)
            body = os.urandom(BODY_BYTES)
            progress(f"{name.split()[0]}: preloading {total} messages")
            await publish_all(channel.default_exchange, inbound_queue.name,
                              [aio_pika.Message(body, delivery_mode=2) for _ in range(total)])
            workers = Workers([[sys.executable, "-c", relay, url, str(PREFETCH)]],
                              dict(os.environ))
            try:
                await measure(name.split()[0], result, Run(
                    channel, workers, lambda: depth(channel, "bench.sink"), ["bench.sink"],
                    lambda i, message_id: aio_pika.Message(body, message_id=message_id,
                                                           delivery_mode=2),
                    lambda m: channel.default_exchange.publish(m, "bench.in"), by_message_id),
                    latency_s)
                result.rss_mb = workers.peak_rss_mb()
            finally:
                workers.stop()
    return result


def table(results: list[Result]) -> str:
    base = results[0].rate
    head = (f"{'scenario':<30} {'msg/s':>7} {'x(a)':>5} {'at':>6} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'max ms':>7} {'cpu µs':>7} {'host µs':>7} {'busy':>4}"
            "  peak RSS MB per process")
    return "\n".join([head, *(
        f"{r.name:<30} {r.rate:>7.0f} {r.rate / base:>5.2f} {r.latency_rate:>6.0f} "
        f"{r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.max_ms:>7.2f} {r.cpu_us:>7.0f} "
        f"{r.machine_us:>7.0f} {r.busy:>4.0%}  "
        f"{[round(m, 1) for m in r.rss_mb]}" for r in results)])


def ratios(results: list[Result]) -> dict[str, float]:
    by = {r.name.split()[0]: r.rate for r in results}
    a = by["a"]
    found = {f"{k}/a": round(v / a, 2) for k, v in by.items() if k != "a"}
    for other, base in (("b", "ac"), ("c3", "c3c"), ("b2", "b"), ("bf", "b"), ("bp", "b"),
                        ("s1", "b"), ("s1e", "b"), ("s1e", "s1"), ("s2", "s1"), ("e", "e0")):
        if other in by and base in by:
            found[f"{other}/{base}"] = round(by[other] / by[base], 2)
    return found


def targets(results: list[Result], r: dict[str, float]) -> dict[str, tuple[bool, bool]]:
    """Issue 14's targets: {target: (measured in this run, met)}."""
    by = {x.name.split()[0]: x for x in results}
    a, b = by["a"], by.get("b")
    # (e)'s latencies are round trips through two workers and a business: not comparable
    relayd_rows = [x for x in results if not x.name.startswith(("a", "e"))]
    soaked = [x for x in results if x.soak_rss_mb]

    def ratio(key: str, at_least: float) -> tuple[bool, bool]:
        return key in r, r.get(key, 0) >= at_least

    return {
        "b/a >= 0.6 (inbound, one worker, X25519, SQLite, 128 devices)": ratio("b/a", 0.6),
        "b2/a >= 1.0 (two inbound workers; with cores to spare)": ratio("b2/a", 1.0),
        "d/a >= 0.5 (hybrid ML-KEM suite, one worker)": ratio("d/a", 0.5),
        "c3/a >= 0.3 (outbound, 3 devices per user, one worker)": ratio("c3/a", 0.3),
        "bp/b >= 0.9 (inbound on PostgreSQL / on SQLite)": ratio("bp/b", 0.9),
        "s1/b >= 0.9 (inbound sharded, 4 shards / unsharded)": ratio("s1/b", 0.9),
        "s1e/b >= 0.9 (the same, as the edge publishes: no router)": ratio("s1e/b", 0.9),
        "CPU per inbound message <= (a)'s + the crypto cost": (
            b is not None, b is not None and b.cpu_us <= a.cpu_us + b.crypto_us),
        "p99 at half saturation <= 2 x (a)'s p99 (every relayd row)": (
            bool(relayd_rows), all(x.p99_ms <= 2 * a.p99_ms for x in relayd_rows)),
        "RSS <= 100 MB per process": (bool(relayd_rows), all(
            m <= 100 for x in relayd_rows for m in x.rss_mb + x.soak_rss_mb)),
        "RSS flat over the soak (last <= first + 10 MB)": (bool(soaked), all(
            x.soak_rss_mb[-1] <= x.soak_rss_mb[0] + 10 for x in soaked)),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    total = 3000 if args.quick else 20000
    latency_s = 3.0 if args.quick else 15.0
    load_before = os.getloadavg()
    scenarios: dict[str, Callable[[], Awaitable[Result | list[Result]]]] = {
        "a": lambda: naive("a pipelined relay (baseline)", PIPELINED_RELAY, total, latency_s),
        "aseq": lambda: naive("aseq sequential relay", SEQUENTIAL_RELAY, total, latency_s),
        "ac": lambda: inbound("ac pipelined relay + crypto", Kem.X25519, 1, total, latency_s,
                              floor=True),
        "b": lambda: inbound(f"b inbound x1 {USERS} devices", Kem.X25519, 1, total, latency_s,
                             args.soak),
        "bf": lambda: inbound(f"bf inbound x1 {FEW_DEVICES} devices", Kem.X25519, 1, total,
                              latency_s, senders=FEW_DEVICES),
        "b2": lambda: inbound("b2 inbound x2", Kem.X25519, 2, total, latency_s),
        "bp": lambda: inbound("bp inbound x1 PostgreSQL", Kem.X25519, 1, total, latency_s,
                              postgres=True),
        "c1": lambda: outbound("c1 outbound 1 dev/user", 1, total, latency_s),
        "c3": lambda: outbound("c3 outbound 3 dev/user", 3, total // 3, latency_s),
        "c3c": lambda: outbound("c3c pipelined fan-out + crypto", 3, total // 3, latency_s,
                                floor=True),
        "c3x2": lambda: outbound("c3x2 outbound 3 dev/user x2", 3, total // 3, latency_s, 2),
        "d": lambda: inbound("d inbound hybrid PQ", Kem.MLKEM768_X25519, 1, total, latency_s),
        # Ordered per device (docs/scaling.md): a router, then shards shared by the workers.
        "s1": lambda: inbound(f"s1 inbound {SHARDS} shards x1", Kem.X25519, 1, total,
                              latency_s, shards=SHARDS),
        "s1e": lambda: inbound(f"s1e inbound {SHARDS} shards x1 edge", Kem.X25519, 1, total,
                               latency_s, shards=SHARDS, edge=True),
        "s2": lambda: inbound(f"s2 inbound {SHARDS} shards x2", Kem.X25519, 2, total,
                              latency_s, shards=SHARDS),
        "e": lambda: edge_path(total, latency_s),  # two rows: e and e0
    }
    chosen = ["a", *(args.only or (QUICK if args.quick else SCENARIOS))]
    if not POSTGRES and "bp" in chosen:
        progress("bp skipped: it needs --postgres")
        chosen.remove("bp")
    results: list[Result] = []
    for name in chosen:
        got = await scenarios[name]()
        results += got if isinstance(got, list) else [got]
    load = [round(x, 2) for x in (*load_before, *os.getloadavg())]
    print(table(results))
    r = ratios(results)
    print("ratios: " + "  ".join(f"{k}={v}" for k, v in r.items()))
    met = {}
    for target, (measured, ok) in targets(results, r).items():
        if measured:
            met[target] = ok
        print(f"target {target}: {('met' if ok else 'NOT met') if measured else 'not run'}")
    by = {x.name.split()[0]: x for x in results}
    if "b" in by:
        print(f"CPU per message: b {by['b'].cpu_us:.0f} µs, a {by['a'].cpu_us:.0f} µs,"
              f" crypto {by['b'].crypto_us:.0f} µs")
    if "e" in by and "e0" in by:
        e, e0 = by["e"], by["e0"]
        print(f"edge: up {e.rate:.0f} msg/s vs {e0.rate:.0f} on raw AMQP (e/e0 ="
              f" {e.rate / e0.rate:.2f}); round trips at {e.latency_rate:.0f} msg/s:"
              f" p50 {e.p50_ms} vs {e0.p50_ms} ms ({e.p50_ms / e0.p50_ms:.2f}x),"
              f" p99 {e.p99_ms} vs {e0.p99_ms} ms ({e.p99_ms / e0.p99_ms:.2f}x)")
    print(f"load average (1, 5, 15 min) before: {load[:3]}, after: {load[3:]}")
    return {"results": [asdict(x) for x in results], "ratios": r, "targets": met,
            "quick": args.quick, "cpus": os.cpu_count(), "load": load}


def summary(runs: list[dict[str, Any]]) -> str:
    """Each target over every run: met k of n, with the values."""
    lines = [f"{len(runs)} runs; load average (1 min) before each: "
             f"{[run['load'][0] for run in runs]}"]
    for target in dict.fromkeys(t for run in runs for t in run["targets"]):
        verdicts = [run["targets"][target] for run in runs if target in run["targets"]]
        lines.append(f"target {target}: met {sum(verdicts)} of {len(verdicts)}")
    lines += [f"{key}: {[run['ratios'].get(key) for run in runs]}"
              for key in dict.fromkeys(k for run in runs for k in run["ratios"])]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run, under a minute")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--rate", type=float, default=0,
                        help="measure latency at this many msg/s instead of half saturation")
    parser.add_argument("--soak", type=float, default=0, metavar="SECONDS",
                        help="after (b)'s latency phase, hold half rate this long, sampling RSS")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS,
                        help="run only these scenarios (the baseline a always runs first)")
    parser.add_argument("--postgres", metavar="SERVER_URL", default="",
                        help="run bp: b on a fresh database on this PostgreSQL server,"
                             " e.g. postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--shards", type=int, default=1, metavar="N",
                        help="run b, bf, b2, c1, c3 and d with topology.shards = N")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run it all N times; then each target met k of N")
    args = parser.parse_args()
    global FIXED_RATE, POSTGRES, DEFAULT_SHARDS
    FIXED_RATE, POSTGRES, DEFAULT_SHARDS = args.rate, args.postgres.rstrip("/"), args.shards
    # uvloop: the load generator must not be the bottleneck
    runs = [uvloop.run(main_async(args)) for _ in range(max(1, args.repeat))]
    if len(runs) > 1:
        print(summary(runs))
    if args.json:
        figures = runs[0] if len(runs) == 1 else {**runs[-1], "runs": runs}
        Path(args.json).write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
