"""A relay under faults: a real `relayd run` on a dedicated RabbitMQ node, and its parties.

The parties live in the test's event loop, on robust aio-pika connections, and re-send
each publish until the broker confirms it:
- devices (several users, 2-3 devices each) seal numbered messages up, and open and
  record what comes down: on AMQP, or, in a rig made with `edge=N`, through `relayd run`'s
  N edge processes (relayd.client.EdgeDevice, which reconnects and resends by itself);
- a business consumes its inbox, replies to each message event, de-duplicates on the
  event id and derives each reply's id from it, so a redelivered event yields the same
  reply;
- an operator drains relayd.dead, opening dead-lettered envelopes with the relay's own
  key to learn their ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import orjson
import psutil
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection

from relayd import admin, config, envelope, keys, topology
from relayd.client import DeviceKeys, EdgeDevice, EdgeRefusedError, RelayPublic, parse_event, reply
from relayd.crypto import Kem
from relayd.store import Business, Device, Store, open_store
from tests.faults.ledger import Ledger, Row, Up
from tests.support.broker import TestBroker, free_ports
from tests.support.config import write_config

NAMESPACE = uuid.UUID("0c7c1a52-4f8e-4c38-9a55-2f6b1d9e8e01")
BUSINESS = "acme"
EDGE_NAME = "fault-edge.example"
WAIT = 90.0  # bound of every wait in a phase
_AWAY = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError, TimeoutError)
Fault = Callable[[], Awaitable[list[str]]]  # injects a fault; returns notes for the table


async def until(check: Callable[[], Awaitable[bool]], what: str, wait: float = WAIT) -> None:
    """Poll external state that offers no event (a process, the broker's counters)."""
    deadline = time.monotonic() + wait
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {wait:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


# --- relayd itself ---------------------------------------------------------------------


def _option(process: psutil.Process, name: str, default: str) -> str:
    args = process.cmdline()
    return args[args.index(name) + 1] if name in args else default


def _role(process: psutil.Process) -> str:
    return _option(process, "--role", "")


def _slot(process: psutil.Process) -> str:
    """The supervisor's name for a worker (inbound-0, ...), stable across its restarts."""
    return _option(process, "--name", "")


@dataclass
class Relayd:
    """`relayd run` as a real process, logging to `log_path`: a supervisor whose children
    are the worker processes."""

    config_path: Path
    log_path: Path
    workers_per_role: dict[str, int]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relayd", "run", "--config", str(self.config_path)],
                stdout=log_file, stderr=subprocess.STDOUT, env=env)

    def workers(self) -> list[psutil.Process]:
        """The live worker processes."""
        assert self.process is not None
        with contextlib.suppress(psutil.NoSuchProcess):
            return [p for p in psutil.Process(self.process.pid).children()
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        return []

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal relayd run and return its exit code."""
        assert self.process is not None
        self.process.send_signal(sig)
        return await asyncio.to_thread(self.process.wait, 60)

    def rss(self) -> dict[str, int]:
        """Resident memory of each worker, by role and pid."""
        found = {}
        for worker in self.workers():
            with contextlib.suppress(psutil.NoSuchProcess):
                if role := _role(worker):  # not one still starting
                    found[f"{role}-{worker.pid}"] = worker.memory_info().rss
        return found


# --- the parties -------------------------------------------------------------------------


@dataclass
class Client:
    """One robust connection of a test party, with a confirming channel."""

    connection: AbstractRobustConnection
    channel: AbstractRobustChannel

    @classmethod
    async def open(cls, url: str, name: str, prefetch: int = 256) -> Client:
        connection = await aio_pika.connect_robust(
            url, reconnect_interval=0.5, client_properties={"connection_name": name})
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=prefetch)
        return cls(connection, channel)

    async def publish(self, exchange: str, routing_key: str, message: aio_pika.Message) -> int:
        """Publish until the broker confirms; return the attempts it took (1: no resend)."""
        deadline = time.monotonic() + WAIT
        for attempt in range(1, 1000):
            try:
                underlay = await asyncio.wait_for(self.channel.get_underlay_channel(), WAIT)
                await underlay.basic_publish(message.body, exchange=exchange,
                                             routing_key=routing_key,
                                             properties=message.properties, mandatory=True)
            except _AWAY:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)  # the broker is away: try again shortly
                continue
            return attempt
        raise AssertionError("publish never confirmed")

    async def consume(self, queue: str,
                      callback: Callable[[AbstractIncomingMessage], Awaitable[None]]) -> str:
        declared = await self.channel.declare_queue(queue, passive=True)
        return await declared.consume(callback)

    async def counts(self, queue: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of `queue`; None while the broker is away."""
        try:
            underlay = await asyncio.wait_for(self.channel.get_underlay_channel(), 5)
            ok = await underlay.queue_declare(queue, passive=True, timeout=5)
        except _AWAY:
            return None
        return int(ok.message_count or 0), int(ok.consumer_count or 0)


async def settle(message: AbstractIncomingMessage) -> None:
    """Ack; if the channel is gone the broker redelivers, and the party de-duplicates."""
    with contextlib.suppress(*_AWAY):
        await message.ack()


@dataclass
class Phone:
    user: str
    keys: DeviceKeys
    edge: EdgeDevice | None = None  # its session with the edge, in an edge rig
    reader: asyncio.Task[None] | None = None  # what takes its down messages from the edge


# --- the rig -----------------------------------------------------------------------------


# What the relay under faults runs with, before a test's own sections.
DEFAULTS: dict[str, dict[str, Any]] = {
    "amqp": {"heartbeat": 5, "reconnect_max_backoff": 2},
    "workers": {"inbound": 2, "outbound": 1, "retry_initial_backoff": 0.2,
                "retry_max_backoff": 2, "shutdown_timeout": 10},
    "logging": {"level": "info"},
    "metrics": {"enabled": False},
}


@dataclass
class Rig:
    """One relay in a vhost of the dedicated node, with its parties and its ledger."""

    node: TestBroker
    vhost: str
    root: Path
    settings: config.Settings
    keyring: keys.KeyRing
    store: Store
    relayd: Relayd
    phones: list[Phone]
    ledger: Ledger = field(default_factory=Ledger)
    rng: random.Random = field(default_factory=random.Random)
    clients: dict[str, Client] = field(default_factory=dict)
    conversations: dict[str, str] = field(default_factory=dict)  # user -> conversation id
    sealed: dict[str, bytes] = field(default_factory=dict)  # up id -> its envelope
    replied: set[str] = field(default_factory=set)  # events whose reply was confirmed
    business_tag: str | None = None
    rss_max: dict[str, int] = field(default_factory=dict)  # role -> max RSS seen
    kills: Counter[str] = field(default_factory=Counter)  # worker slot -> SIGKILLs
    sampler: asyncio.Task[None] | None = None

    @property
    def public(self) -> RelayPublic:
        return RelayPublic.from_json(self.keyring.public_info())

    @property
    def topology(self) -> config.Topology:
        return self.settings.topology

    def devices_of(self, user: str) -> list[Phone]:
        return [p for p in self.phones if p.user == user]

    @property
    def users(self) -> list[str]:
        return sorted({p.user for p in self.phones})

    # --- setup -----------------------------------------------------------------------------

    @classmethod
    async def create(cls, node: TestBroker, root: Path, vhost: str, users: dict[str, int],
                     edge: int = 0, **sections: dict[str, Any]) -> Rig:
        """With `edge` > 0, `relayd run` also runs that many edge processes on one port,
        and the devices go up and down through them only."""
        node.ctl("add_vhost", vhost)
        node.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        url = f"amqp://guest:guest@{node.host}:{node.amqp_port}/{vhost}"
        if edge:
            [port] = free_ports(1)
            sections = {**sections, "edge": {"name": EDGE_NAME, "port": port},
                        "workers": {**sections.get("workers", {}), "edge": edge}}
        path = write_config(root, url, DEFAULTS, sections)
        settings = config.load(path, environ={})
        keys.generate(settings.keys.dir, "fault-1")
        keyring = keys.load(settings.keys.dir, timedelta(days=1))
        store = await open_store(settings.store.url, secret=keyring.opaque_secret)
        await admin.add_business(settings, store, Business(BUSINESS, "guest"),
                                 keyring.opaque_secret)
        phones = []
        for user, count in users.items():
            for n in range(count):
                device = DeviceKeys.generate(f"{user}-d{n}")
                await admin.add_device(settings, store, Device(
                    device.device, user, device.kem, device.enc_public, device.sign_public),
                    keyring.opaque_secret)
                phones.append(Phone(user, device))
        relayd = Relayd(path, root / "relayd.log",
                        {"inbound": settings.workers.inbound,
                         "outbound": settings.workers.outbound})
        rig = cls(node, vhost, root, settings, keyring, store, relayd, phones)
        relayd.start()
        try:
            for name in ("devices", "business", "operator", "probe"):
                rig.clients[name] = await Client.open(url, f"fault-{name}")
            await rig.ready()
            for phone in phones:
                if edge:
                    await rig._connect_edge(phone)
                else:
                    await rig.clients["devices"].consume(
                        rig.device_queue(phone),
                        functools.partial(rig._on_device, phone))
            await rig.clients["operator"].consume(rig.topology.dead_queue, rig._on_dead)
            await rig.resume_business()
        except BaseException:
            await rig.close()
            raise
        rig.sampler = asyncio.create_task(rig._sample_rss())
        return rig

    async def close(self) -> None:
        if self.sampler is not None:
            self.sampler.cancel()
        for phone in self.phones:
            if phone.reader is not None:
                phone.reader.cancel()
            if phone.edge is not None:
                with contextlib.suppress(Exception):
                    await phone.edge.close()
        if self.relayd.process is not None and self.relayd.process.poll() is None:
            workers = self.relayd.workers()
            await self.relayd.stop(signal.SIGKILL)
            for worker in workers:  # a killed supervisor leaves its workers behind
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.kill()
        for client in self.clients.values():
            with contextlib.suppress(*_AWAY):
                await client.connection.close()
        await self.store.close()

    # --- relayd under test ---------------------------------------------------------------

    async def consumers(self, queue: str) -> int | None:
        counts = await self.clients["probe"].counts(queue)
        return None if counts is None else counts[1]

    async def ready(self) -> None:
        """Until every worker consumes its queue."""
        async def up() -> bool:
            wanted = self.relayd.workers_per_role
            return {r: await self.consumers(self.queue_of(r)) for r in wanted} == wanted
        await until(up, "relayd to consume both queues")

    async def kill_worker(self, role: str | None = None) -> str:
        """SIGKILL a worker (of `role`, or any consuming one; of those, one killed least
        often), then wait until the supervisor has started it again and it consumes."""
        candidates = [w for w in self.relayd.workers()
                      if _role(w) in ((role,) if role else ("inbound", "outbound"))]
        fewest = min(self.kills[_slot(w)] for w in candidates)
        victim = self.rng.choice([w for w in candidates if self.kills[_slot(w)] == fewest])
        self.kills[_slot(victim)] += 1
        name, queue = _role(victim), self.queue_of(_role(victim))
        victim.kill()
        await asyncio.to_thread(victim.wait, 10)

        async def gone() -> bool:
            count = await self.consumers(queue)
            return count is not None and count < self.relayd.workers_per_role[name]
        await until(gone, "the broker to drop the killed worker's consumer")
        await self.ready()
        return name

    def queue_of(self, role: str) -> str:
        return self.topology.inbound_queue if role == "inbound" else self.topology.outbound_queue

    async def _sample_rss(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error, AssertionError):
                for name, rss in self.relayd.rss().items():
                    role = name.rpartition("-")[0]
                    self.rss_max[role] = max(self.rss_max.get(role, 0), rss)
            await asyncio.sleep(0.5)

    def log_mark(self) -> int:
        return self.relayd.log_path.stat().st_size

    def max_loop_lag_ms(self, since: int) -> float | None:
        """The worst event-loop lag the workers logged since offset `since` of the log."""
        worst = None
        with self.relayd.log_path.open("rb") as log_file:
            log_file.seek(since)
            for line in log_file:
                if b'"loop_lag"' in line:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        lag = float(orjson.loads(line)["latency_ms"])
                        worst = lag if worst is None else max(worst, lag)
        return worst

    # --- broker state ------------------------------------------------------------------------

    @property
    def queues(self) -> list[str]:
        t = self.topology
        return [t.inbound_queue, t.outbound_queue, self.inbox, t.dead_queue,
                *(self.device_queue(p) for p in self.phones)]

    def device_queue(self, phone: Phone) -> str:
        return topology.device_queue(self.topology, phone.keys.device, self.keyring.opaque_secret)

    @property
    def inbox(self) -> str:
        """The business's inbox."""
        return topology.business_inbox(self.topology, BUSINESS, self.keyring.opaque_secret)

    async def drained(self, *names: str) -> None:
        """Until the named queues (default: all) have no message ready."""
        async def empty() -> bool:
            for name in names or self.queues:
                counts = await self.clients["probe"].counts(name)
                if counts is None or counts[0]:
                    return False
            return True
        await until(empty, f"queues {', '.join(names) or 'all'} to drain")

    def relayd_connections(self) -> set[tuple[str, int, int, str]]:
        """(name, connected_at, heartbeat timeout, state) of each relayd connection."""
        out = self.node.ctl("list_connections", "--formatter", "json", "client_properties",
                            "connected_at", "timeout", "state", "vhost")
        found = set()
        for c in json.loads(out):
            props = {p[0]: p[2] for p in c["client_properties"]}
            name = str(props.get("connection_name", ""))
            if c["vhost"] == self.vhost and name.startswith("relayd-"):
                found.add((name, int(c["connected_at"]), int(c["timeout"]), str(c["state"])))
        return found

    def queue_arguments(self) -> dict[str, dict[str, Any]]:
        out = self.node.ctl("list_queues", "-p", self.vhost, "--formatter", "json", "name",
                            "arguments")
        return {q["name"]: {a[0]: a[2] for a in q["arguments"]} for q in json.loads(out)}

    def missed_heartbeats(self) -> int:
        """Lines of the node's log that report a client's missed heartbeats."""
        text = self.node.log_file.read_text(errors="replace")
        return text.count("missed heartbeats")

    # --- the parties' callbacks ------------------------------------------------------------

    async def _connect_edge(self, phone: Phone) -> None:
        """Log the device in through the edge, and take its down messages from there."""
        port = self.settings.edge.port
        phone.edge = EdgeDevice(f"ws://127.0.0.1:{port}/v1/device", EDGE_NAME, phone.keys,
                                self.public, max_backoff=1.0, ping_interval=2.0)
        await asyncio.wait_for(phone.edge.connect(), WAIT)
        phone.reader = asyncio.create_task(self._read_edge(phone, phone.edge))

    async def _read_edge(self, phone: Phone, edge: EdgeDevice) -> None:
        while True:
            message = await edge.receive()
            self.ledger.device_got(phone.keys.device, message)
            await edge.received(message)

    async def kill_edge(self) -> int:
        """SIGKILL the edge process that holds the most devices, then wait until the
        supervisor has started another: its devices reconnect by themselves, to whichever
        edge process takes them. Return how many devices it held."""
        port = self.settings.edge.port

        def held(process: psutil.Process) -> int:
            with contextlib.suppress(psutil.Error):
                return sum(c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
                           for c in process.net_connections("tcp"))
            return 0

        edges = [w for w in self.relayd.workers() if _role(w) == "edge"]
        victim = max(edges, key=held)
        devices = held(victim)
        self.kills[_slot(victim)] += 1
        victim.kill()
        await asyncio.to_thread(victim.wait, 10)

        async def back() -> bool:
            return len([w for w in self.relayd.workers() if _role(w) == "edge"]) == len(edges)
        await until(back, "the supervisor to start the edge process again")
        return devices

    async def _on_device(self, phone: Phone, message: AbstractIncomingMessage) -> None:
        self.ledger.device_got(phone.keys.device, phone.keys.open(self.public, message.body))
        await settle(message)

    async def _on_business(self, message: AbstractIncomingMessage) -> None:
        """Record the event; answer a message event unless its reply was confirmed before."""
        event = parse_event(message.body)
        self.ledger.business_got(event)
        event_id = str(event.get("id"))
        sent = self.ledger.up.get(event_id)
        if sent is not None:
            self.conversations[sent.user] = str(event["conversation"])
        if sent is not None and event["type"] == "message" and event_id not in self.replied:
            await self.business_reply(sent.phase, sent.user, "message",
                                      {"text": f"re {event['body']['text']}"},
                                      str(uuid.uuid5(NAMESPACE, event_id)))
            self.replied.add(event_id)
        await settle(message)

    async def business_reply(self, phase: str, user: str, kind: str, body: dict[str, Any],
                             reply_id: str) -> None:
        self.ledger.sent_reply(reply_id, phase, [p.keys.device for p in self.devices_of(user)])
        attempts = await self.clients["business"].publish(
            self.topology.replies_exchange, BUSINESS, aio_pika.Message(
                reply(self.conversations[user], kind, body, reply_id),
                content_type="application/json", user_id="guest",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT))
        self.ledger.resent[reply_id] += attempts - 1

    async def _on_dead(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        reason = str(headers.get("x-relayd-reason") or headers.get("x-first-death-reason"))
        self.ledger.dead_lettered(self._id_of(message), reason)
        await settle(message)

    def _id_of(self, message: AbstractIncomingMessage) -> str | None:
        """The message id inside a dead-lettered message: sealed up, or a JSON reply."""
        if not message.body:  # kept without it (docs/protocol.md section 8)
            return None
        if message.content_type != envelope.CONTENT_TYPE:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                return str(orjson.loads(message.body).get("id"))
            return None
        key = self.keyring.hpke.get(str((message.headers or {}).get(envelope.KID_HEADER)))
        if key is None:
            return None
        _, payload = envelope.open_sealed(message.body, direction="up", kid=key.kid,
                                          kem=key.kem, private=key.private)
        return str(orjson.loads(payload).get("id"))

    async def pause_business(self) -> None:
        assert self.business_tag is not None
        declared = await self.clients["business"].channel.declare_queue(
            self.inbox, passive=True)
        await declared.cancel(self.business_tag)
        self.business_tag = None

    async def resume_business(self) -> None:
        self.business_tag = await self.clients["business"].consume(
            self.inbox, self._on_business)

    # --- traffic -----------------------------------------------------------------------------

    async def send(self, phase: str, phone: Phone, kind: str, body: dict[str, Any] | None = None,
                   sealed: bytes | None = None) -> tuple[str, bytes]:
        """Seal (unless `sealed`) and publish one up message; return its id and envelope."""
        if sealed is None:
            message_id = str(uuid.uuid4())
            sealed = phone.keys.seal(self.public, phone.keys.payload(
                BUSINESS, kind, body, message_id=message_id))
            others = [p.keys.device for p in self.devices_of(phone.user) if p is not phone]
            self.ledger.sent_up(message_id, Up(phase, phone.keys.device, phone.user, kind),
                                others)
        else:
            _, payload = envelope.open_sealed(
                sealed, direction="up", kid=self.keyring.current.kid,
                kem=self.keyring.current.kem, private=self.keyring.current.private)
            message_id = str(orjson.loads(payload)["id"])
        self.sealed[message_id] = sealed
        if phone.edge is not None:
            self.ledger.resent[message_id] += await self._send_edge(phone.edge, sealed) - 1
            return message_id, sealed
        attempts = await self.clients["devices"].publish(
            self.topology.ingress_exchange, self.topology.inbound_routing_key, aio_pika.Message(
                sealed, content_type=envelope.CONTENT_TYPE,
                headers={envelope.KID_HEADER: self.keyring.current.kid},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT))
        self.ledger.resent[message_id] += attempts - 1
        return message_id, sealed

    async def _send_edge(self, edge: EdgeDevice, sealed: bytes) -> int:
        """Send through the edge until it acks; return the attempts it took. A lost
        session is the client's to resume; a nack for want of the broker is tried again."""
        deadline = time.monotonic() + WAIT
        for attempt in range(1, 1000):
            try:
                async with asyncio.timeout(WAIT):
                    await edge.send_sealed(sealed, self.keyring.current.kid)
            except TimeoutError:
                raise AssertionError(
                    f"no answer from the edge in {WAIT:.0f} s: {edge.keys.device} logged in "
                    f"{edge.connects} times, ready={edge._ready.is_set()}, "
                    f"final={edge._final!r}") from None
            except EdgeRefusedError as refused:
                if refused.code not in ("unavailable", "broker_full") or (
                        time.monotonic() > deadline):
                    raise
                await asyncio.sleep(0.2)  # the broker is away: try again shortly
                continue
            return attempt
        raise AssertionError("send never acked")

    async def round(self, phase: str, number: int) -> list[bytes]:
        """Every device sends its next numbered message; return the envelopes."""
        sent = await asyncio.gather(*(
            self.send(phase, phone, "message", {"text": f"{phase} #{number} {phone.keys.device}"})
            for phone in self.phones))
        return [envelope_ for _, envelope_ in sent]

    async def phase(self, name: str, fault: Fault, *, after_close: Fault | None = None,
                    min_rounds: int = 10, max_rounds: int = 200,
                    pace: float = 0.2, opened: bool = False) -> tuple[Row, Row]:
        """Numbered traffic both ways while `fault` runs, then closes, then the checker.
        `opened`: the traffic waits until every start reached the business, so that no
        two devices of a user race to open (or reopen) their conversation."""
        mark = self.log_mark()
        starts = [(await self.send(name, self.devices_of(user)[0], "start"))[0]
                  for user in self.users]
        if opened:
            await self.ledger.until(lambda: all(self.ledger.at_business[i] for i in starts),
                                    WAIT)
        done = asyncio.Event()

        async def traffic() -> None:
            for number in range(max_rounds):
                if done.is_set() and number >= min_rounds:
                    return
                await self.round(name, number)
                await asyncio.sleep(pace)  # the pace of the traffic, not a synchronisation

        sender = asyncio.create_task(traffic())
        try:
            notes = await fault()
        finally:
            done.set()
            await sender
        notes += await self.finish(name, after_close)
        up, down = self.ledger.rows(name)
        lag = self.max_loop_lag_ms(mark)
        up.notes = notes
        down.notes = [f"max loop lag {lag:.0f} ms" if lag is not None else "loop lag < 10 ms"]
        return up, down

    async def finish(self, name: str, after_close: Fault | None) -> list[str]:
        """Closes once everything sent arrived (and `after_close` while they are handled),
        then drain everything: the phase's end."""
        await self.ledger.settled(name, WAIT)  # so the closes come after all the rest
        await self.drained(*self.queues[:3])
        first, second = self.users[0], self.users[1]
        await self.send(name, self.devices_of(first)[0], "close")
        await self.business_reply(name, second, "close", {},
                                  str(uuid.uuid5(NAMESPACE, f"close {name}")))
        notes = await after_close() if after_close is not None else []
        await self.ledger.settled(name, WAIT)
        await self.drained()
        states = {u: await self.store.conversation_of(u, BUSINESS) for u in self.users}
        wrong = [u for u, c in states.items() if c is None or (c.state, c.closed_by) != (
            ("closed", "user") if u == first else ("closed", "business") if u == second
            else ("open", None))]
        notes.append("conversation states ok" if not wrong else f"WRONG STATE: {wrong}")
        resent = sum(self.ledger.resent[i] for i in self.ledger.ups_of[name])
        resent += sum(self.ledger.resent[i] for i, p in self.ledger.replies.items() if p == name)
        if resent:
            notes.append(f"{resent} publishes resent after a lost confirm")
        return notes

    async def break_device(self, device: str, user: str, public: bytes) -> None:
        """Register a device whose signing key is corrupt in the store, as a bug would:
        through the store (which keeps ids as pseudonyms), past `device add`'s checks."""
        await self.store.add_device(Device(device, user, Kem.X25519, public, b"\0" * 31))
