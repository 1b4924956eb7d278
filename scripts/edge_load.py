"""How many idle devices one `relayd edge` process holds, and the memory each costs.

Usage: .venv/bin/python scripts/edge_load.py [--connections N] [--window N]
           [--budget SECONDS] [--json FILE]

Loopback only, in a vhost of its own on the local RabbitMQ (deleted afterwards), with a
SQLite store and keys in a temporary directory:
  1. registers N devices through the store API and declares their queues;
  2. starts one `relayd edge` process on port 0 (it reads the port from the edge's log);
  3. opens N WebSocket connections and logs each in with its device's key, at most
     --window logins at a time, and holds them idle;
  4. reads the edge's RSS before the first login and with all N held: memory per
     connection = (after - before) / held;
  5. puts one message in every device's queue and counts the connections it reaches
     (each acknowledges it): an idle connection can still receive.
Every step is bounded by --budget. Each connection is a file descriptor in the edge and
one in this process: the soft RLIMIT_NOFILE is raised to the hard limit here, and the
edge inherits it (under systemd: LimitNOFILE in deploy/relayd.service).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import aio_pika
import orjson
import yaml
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

from relayd import keys, topology
from relayd.client import DeviceKeys
from relayd.config import Settings, load
from relayd.crypto import Kem, b64d, b64e
from relayd.edge import login
from relayd.store import Device, open_store

HOST = os.environ.get("RELAYD_BENCH_BROKER", "127.0.0.1:5672")
NAME = "edge-load.example"
SUBPROTOCOL = Subprotocol("relayd.v1")
START_S = 60.0  # the most the edge may take to listen and reach the broker
STEP_S = 0.05  # how often a wait looks again (the edge's log, its readiness)


def progress(text: str) -> None:
    print(f"[edge-load] {text}", file=sys.stderr, flush=True)


@dataclass
class Report:
    connections: int  # asked for
    held: int = 0  # logged in and open at the end
    received: int = 0  # of the held, how many got the message put in their queue
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    kib_per_connection: float = 0.0
    login_s: float = 0.0
    nofile: int = 0  # the soft RLIMIT_NOFILE the edge ran with
    load: tuple[float, ...] = ()  # load average (1, 5, 15 min) before and after


def raise_nofile(needed: int) -> int:
    """Raise the soft limit of open files to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < needed:
        progress(f"RLIMIT_NOFILE is {soft}, {needed} needed: raise the hard limit")
    return soft


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) / 1024
    return 0.0


def write_config(root: Path, vhost_name: str, connections: int) -> Settings:
    config = {
        "amqp": {"url": f"amqp://guest:guest@{HOST}/{vhost_name}"},
        "store": {"url": f"sqlite:///{root}/relayd.db"},
        "keys": {"dir": str(root / "keys")},
        "metrics": {"enabled": False},
        "logging": {"format": "json"},
        "edge": {"name": NAME, "host": "127.0.0.1", "port": 0,
                 "max_connections": connections + 16, "login_timeout": 60.0},
    }
    path = root / "relayd.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load(path, environ={})
    keys.generate(settings.keys.dir, "load-1", Kem.X25519)
    return settings


async def register(settings: Settings, count: int) -> tuple[list[DeviceKeys], bytes]:
    """`count` devices in the store, each its own user, and their queues declared."""
    secret = keys.load(settings.keys.dir, timedelta(days=1)).opaque_secret
    devices = [DeviceKeys.generate(f"load-{i}") for i in range(count)]
    store = await open_store(settings.store.url, secret=secret)
    try:
        for i, device in enumerate(devices):
            await store.add_device(Device(device.device, f"user-{i}", Kem.X25519,
                                          device.enc_public, device.sign_public))
    finally:
        await store.close()
    t = settings.topology
    connection = await aio_pika.connect(settings.amqp.url)
    async with connection:
        channel = await connection.channel()
        await topology.declare(channel, topology.core(t))
        lanes = [await connection.channel() for _ in range(8)]

        async def declare(lane: int) -> None:
            for device in devices[lane::len(lanes)]:
                await topology.declare(lanes[lane],
                                       topology.device(t, device.device, secret))

        await asyncio.gather(*(declare(i) for i in range(len(lanes))))
    return devices, secret


def start_edge(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "relayd", "edge", "--config", str(config)],
            stdout=log_file, stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")})


def listening_port(log_path: Path) -> int:
    """The port in the edge's `edge_listening` log line; 0 until there is one."""
    for line in log_path.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            event = orjson.loads(line)
            if isinstance(event, dict) and event.get("event") == "edge_listening":
                return int(event["port"])
    return 0


@contextlib.asynccontextmanager
async def edge_process(root: Path) -> AsyncIterator[tuple[int, int]]:
    """`relayd edge` on root/relayd.yaml in a process of its own, logging to a file;
    (pid, port) once it takes logins (within START_S). Stopped with SIGTERM afterwards
    (SIGKILL if it does not end in 30 s)."""
    log_path = root / "edge.log"
    process = start_edge(root / "relayd.yaml", log_path)
    try:
        deadline = time.monotonic() + START_S
        while not (port := listening_port(log_path)):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the edge did not listen: {log_path.read_text()[-2000:]}")
            await asyncio.sleep(STEP_S)
        while True:  # 503 until the edge reached the broker
            try:
                async with connect(f"ws://127.0.0.1:{port}/v1/device",
                                   subprotocols=[SUBPROTOCOL]):
                    break
            except InvalidStatus:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(STEP_S)
        yield process.pid, port
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def log_in(url: str, device: DeviceKeys) -> ClientConnection:
    """One connection logged in as `device`; ValueError unless the edge says ready."""
    ws = await connect(url, subprotocols=[SUBPROTOCOL], compression=None,
                       ping_interval=None, open_timeout=60)
    try:
        challenge = orjson.loads(await ws.recv())
        sig = login.sign(device.sign_private, NAME, device.device, b64d(challenge["nonce"]))
        await ws.send(orjson.dumps({"type": "login", "device": device.device,
                                    "sig": b64e(sig)}).decode())
        answer = orjson.loads(await ws.recv())
    except BaseException:
        ws.transport.abort()
        raise
    if answer.get("type") != "ready":
        ws.transport.abort()
        raise ValueError(answer)
    return ws


async def hold(url: str, devices: list[DeviceKeys], window: int, budget_s: float
               ) -> list[ClientConnection]:
    """Log every device in, at most `window` at a time; the connections that made it."""
    gate = asyncio.Semaphore(window)
    held: list[ClientConnection] = []
    failures: dict[str, int] = {}

    async def one(device: DeviceKeys) -> None:
        async with gate:
            try:
                held.append(await log_in(url, device))
            except Exception as exc:  # counted and reported: the tool measures, not asserts
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
            if len(held) % 1000 == 0 and held:
                progress(f"  {len(held)} held")

    tasks = [asyncio.ensure_future(one(d)) for d in devices]
    _, pending = await asyncio.wait(tasks, timeout=budget_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if failures:
        progress(f"logins that failed: {failures}")
    return held


async def reach(settings: Settings, secret: bytes, devices: list[DeviceKeys],
                held: list[ClientConnection], budget_s: float) -> int:
    """Put one message in every device's queue; how many held connections got theirs
    (and acknowledged it)."""
    connection = await aio_pika.connect(settings.amqp.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.topology.devices_exchange)
        for start in range(0, len(devices), 500):
            await asyncio.gather(*(exchange.publish(
                aio_pika.Message(b"wake", delivery_mode=2),
                routing_key=topology.device_routing_key(d.device, secret))
                for d in devices[start:start + 500]))

    async def one(ws: ClientConnection) -> bool:
        frame = orjson.loads(await ws.recv())
        if frame.get("type") != "deliver" or b64d(frame["sealed"]) != b"wake":
            return False
        await ws.send(orjson.dumps({"type": "received", "tag": frame["tag"]}).decode())
        return True

    tasks = [asyncio.ensure_future(one(ws)) for ws in held]
    done, pending = await asyncio.wait(tasks, timeout=budget_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    outcomes: dict[str, int] = {"timed out": len(pending)}
    for task in done:
        error = task.exception()
        what = type(error).__name__ if error else "received" if task.result() else "other frame"
        outcomes[what] = outcomes.get(what, 0) + 1
    progress(f"outcomes: {outcomes}")
    return outcomes.get("received", 0)


def warnings(log_path: Path) -> dict[str, int]:
    """How many of each warning and error event the edge logged."""
    found: dict[str, int] = {}
    for line in log_path.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            event = orjson.loads(line)
            if isinstance(event, dict) and event.get("level") in ("warning", "error"):
                found[str(event.get("event"))] = found.get(str(event.get("event")), 0) + 1
    return found


async def run(connections: int, window: int = 100, budget_s: float = 600) -> Report:
    """The whole measurement (see the module's docstring), in a vhost of its own."""
    report = Report(connections, nofile=raise_nofile(connections + 256))
    load_before = os.getloadavg()
    with bench.vhost("relayd-edge-load") as vh, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = write_config(root, vh, connections)
        progress(f"registering {connections} devices")
        devices, secret = await register(settings, connections)
        async with edge_process(root) as (pid, port):
            url = f"ws://127.0.0.1:{port}/v1/device"
            report.rss_before_mb = rss_mb(pid)
            progress(f"logging in {connections} devices")
            started = time.monotonic()
            held = await hold(url, devices, window, budget_s)
            report.login_s = round(time.monotonic() - started, 1)
            try:
                await asyncio.sleep(1)  # let the edge settle
                report.held = sum(1 for ws in held if ws.close_code is None)
                report.rss_after_mb = rss_mb(pid)
                if report.held:
                    report.kib_per_connection = round(
                        (report.rss_after_mb - report.rss_before_mb) * 1024 / report.held, 1)
                progress(f"{report.held} held; one message to each")
                report.received = await reach(settings, secret, devices, held, budget_s)
                if report.received < report.held:
                    progress(f"the edge's warnings: {warnings(root / 'edge.log')}")
            finally:
                for ws in held:
                    ws.transport.abort()
    report.rss_before_mb = round(report.rss_before_mb, 1)
    report.rss_after_mb = round(report.rss_after_mb, 1)
    report.load = tuple(round(x, 2) for x in (*load_before, *os.getloadavg()))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=100, help="logins at a time")
    parser.add_argument("--budget", type=float, default=600, metavar="SECONDS",
                        help="the most each step may take")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    import uvloop

    report = uvloop.run(run(args.connections, args.window, args.budget))
    print(f"idle connections held: {report.held} of {report.connections}"
          f" (logins took {report.login_s} s; RLIMIT_NOFILE {report.nofile})")
    print(f"edge RSS: {report.rss_before_mb} MB before, {report.rss_after_mb} MB after:"
          f" {report.kib_per_connection} KiB per connection")
    print(f"held connections that received a message: {report.received}")
    print(f"load average (1, 5, 15 min) before: {list(report.load[:3])},"
          f" after: {list(report.load[3:])}")
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(asdict(report), option=orjson.OPT_INDENT_2))
    return 0 if report.held == report.received == report.connections else 1


if __name__ == "__main__":
    raise SystemExit(main())
