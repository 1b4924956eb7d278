"""relayd on a 3-node RabbitMQ cluster whose nodes and hosts are cut off for real.

The cluster (tests/support/cluster.py) runs each node in a network namespace of its own;
a relayd host runs in one too, so a test can drop every packet of one link and leave its
TCP connections half-open, as a dead switch or a crashed machine would.

TestHosts runs the fault suite's rig (tests/faults/rig.py) with sharded relayd hosts on
the cluster (through a load balancer) and on PostgreSQL (each host through a link of its
own that a test can freeze): a host cut off from the store, a host killed, hosts joining
and leaving. Each row checks the ledger and order per lane, both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import psutil
import pytest
import pytest_asyncio
import yaml

from relayd import admin, config, keys, shard, topology, worker
from relayd.client import DeviceKeys, RelayPublic, parse_event, reply
from relayd.store import Business, Device, open_store
from tests.faults.ledger import NOTES, ROWS, Row
from tests.faults.rig import WAIT, Relayd, Rig
from tests.faults.rig import until as rig_until
from tests.faults.test_faults import flowing
from tests.support import postgres
from tests.support.broker import TestBroker
from tests.support.cluster import PREFIX, Cluster, Forwarder, Host, _netns, ip

pytestmark = [pytest.mark.faults, pytest.mark.broker_node,
              pytest.mark.asyncio(loop_scope="module")]

DETECT_S = 30.0  # a default relayd must notice a half-open connection well within this
OUTAGE_S = 15.0  # a node stopped this long: 2 tries of relayd before would have given up
PACE_S = 0.05  # a slow reader's pause before each ack
WAIT_S = 180.0  # bound of every wait for messages


async def until(check: Callable[[], bool], what: str, wait: float) -> float:
    """Poll state that offers no event (the broker's consumers, a log); the seconds it
    took."""
    started = time.monotonic()
    while not await asyncio.to_thread(check):
        if time.monotonic() - started > wait:
            raise AssertionError(f"timed out after {wait:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


def consumers(node: TestBroker, vhost: str) -> dict[str, int]:
    out = node.ctl("list_queues", "-p", vhost, "name", "consumers", "--no-table-headers",
                   "-q")
    return {name: int(count) for name, count in (line.split("\t") for line in
                                                 out.splitlines() if line)}


@dataclass
class RelaydHost:
    """`relayd run` in a host namespace of the cluster, logging beside its config."""

    host: Host
    config_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.config_path.parent / "relayd.log"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.host.command(sys.executable, "-m", "relayd", "run", "--config",
                                  str(self.config_path)),
                stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def logged(self, *events: str) -> bool:
        text = self.log.read_bytes()
        return any(f'"event":"{event}"'.encode() in text for event in events)


def relayd_config(root: Path, url: str, **sections: dict[str, Any]) -> Path:
    """A relayd config with the defaults for everything that decides how fast a failure
    is noticed (amqp.heartbeat above all)."""
    data: dict[str, Any] = {
        "amqp": {"url": url},
        "store": {"url": f"sqlite:///{root}/relayd.db"},
        "keys": {"dir": str(root / "keys")},
        "logging": {"level": "info", "format": "json"},
        "metrics": {"enabled": False},
        "retention": {"enabled": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "relayd.yaml"
    path.write_text(yaml.safe_dump(data))
    keys.generate(config.load(path, environ={}).keys.dir, "cluster-1")
    return path


@pytest_asyncio.fixture(loop_scope="module")
async def vhost(cluster: Cluster) -> AsyncIterator[str]:
    name = f"cluster-{secrets.token_hex(4)}"
    cluster.nodes[0].ctl("add_vhost", name)
    cluster.nodes[0].ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield name
    finally:
        with contextlib.suppress(RuntimeError):
            cluster.nodes[0].ctl("delete_vhost", name)


class TestHarness:
    async def test_three_nodes_and_a_cut_one_pauses(self, cluster: Cluster) -> None:
        """The nodes form one cluster; a node cut off from the others stops counting
        (pause_minority), and counts again once its link is back."""
        assert len(cluster.running(0)) == 3
        cluster.cut(2)
        try:  # Erlang notices a silent peer after its net tick (60 s by default)
            await until(lambda: len(cluster.running(0)) == 2, "node 2 to drop out", 120)
        finally:
            cluster.heal(2)
        await until(lambda: len(cluster.running(0)) == 3, "node 2 to come back", 120)

    async def test_a_failed_start_leaves_nothing_behind(self, tmp_path: Path) -> None:
        """A cluster whose nodes cannot start removes its namespaces and links anyway."""
        broken = Cluster(tmp_path, size=1, extra_conf="no_such_setting = 1\n")
        with pytest.raises(RuntimeError):
            await asyncio.to_thread(broken.start)
        assert not [n for n in _netns() if n.startswith(f"{PREFIX}{os.getpid()}-"
                                                          f"{broken.subnet}-")]
        assert f"rc{broken.subnet}:" not in ip("link").stdout


class TestFailureDetection:
    async def test_a_half_open_connection_is_noticed_within_seconds(
            self, cluster: Cluster, vhost: str, tmp_path: Path) -> None:
        """A relayd host whose link drops every packet leaves its connection half-open.
        With the default settings the broker drops relayd's consumers, and relayd gives
        the connection up, in seconds (a 30 s heartbeat took 60 to 90 s); once the link is
        back relayd consumes again."""
        node = cluster.nodes[0]
        host = cluster.host("detect")
        relayd = RelaydHost(host, relayd_config(
            tmp_path, f"amqp://guest:guest@{node.host}:{node.amqp_port}/{vhost}"))
        assert config.load(relayd.config_path, environ={}).amqp.heartbeat <= 10
        relayd.start()
        try:
            await until(lambda: consumers(node, vhost).get("relayd.inbound") == 1,
                        "relayd to consume", 60)
            host.cut()
            try:
                broker_s = await until(
                    lambda: consumers(node, vhost).get("relayd.inbound") == 0,
                    "the broker to drop relayd's consumer", DETECT_S)
                relayd_s = await until(lambda: relayd.logged("connection_lost",
                                                             "connect_failed"),
                                       "relayd to give up its connection", DETECT_S)
            finally:
                host.heal()
            await until(lambda: consumers(node, vhost).get("relayd.inbound") == 1,
                        "relayd to consume again", 60)
        finally:
            relayd.kill()
        NOTES.append(f"half-open relayd connection (heartbeat default): the broker dropped "
                     f"it after {broker_s:.0f} s, relayd after {broker_s + relayd_s:.0f} s")


# --- relayd hosts on the cluster, sharded, on PostgreSQL -----------------------------------

HOST_USERS = {"u0": 2, "u1": 2, "u2": 2, "u3": 2}  # user -> devices
SHARDS = 4
MEMBER_TTL = 3.0  # topology.shard_member_ttl: a dead host's shards move within 4 s
MAX_ROUNDS = 3000  # traffic lasts as long as the fault: rabbitmqctl is slow on a busy machine


@dataclass
class Hosts:
    """The rig's relay (host "a") and more relayd hosts beside it: each its own `relayd run`
    with one inbound and one outbound worker, its own config and copy of the keys, on the
    cluster through a load balancer, and on one PostgreSQL database through a link of its
    own (a socat forwarder) that a test can freeze."""

    rig: Rig
    cluster: Cluster
    database: str
    links: dict[str, Forwarder]
    running: dict[str, Relayd]

    def store_url(self, name: str) -> str:
        return linked(self.database, self.cluster.root, self.links[name])

    def start(self, name: str) -> Relayd:
        """Start host `name` (a new one gets a link and a config of its own)."""
        if name not in self.links:
            self.links[name] = self.cluster.forward(postgres_port(self.database))
            home = self.rig.root / name
            shutil.copytree(self.rig.settings.keys.dir, home / "keys")
            data = yaml.safe_load(self.rig.relayd.config_path.read_text())
            data["keys"]["dir"] = str(home / "keys")
            data["store"]["url"] = self.store_url(name)
            (home / "relayd.yaml").write_text(yaml.safe_dump(data))
        home = self.rig.root / name
        host = Relayd(home / "relayd.yaml", home / "relayd.log",
                      self.rig.relayd.workers_per_role)
        host.start()
        self.running[name] = host
        return host

    async def stop(self, name: str, sig: int = signal.SIGTERM) -> int:
        host = self.running.pop(name)
        workers = host.workers()
        code = await host.stop(sig)
        for process in workers:  # a killed supervisor leaves its workers behind
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        return code

    def holders(self) -> dict[str, list[str]]:
        """The channel of each active consumer of each shard queue."""
        out = self.rig.node.ctl("list_consumers", "-p", self.rig.vhost, "queue_name",
                                "channel_pid", "active", "--no-table-headers", "-q")
        held: dict[str, list[str]] = defaultdict(list)
        for line in out.splitlines():
            queue, channel, active = line.split("\t")
            if active == "true":
                held[queue].append(channel)
        return held

    def connections_holding(self) -> int | None:
        """How many relayd connections hold each role's shards between them, when every
        shard queue has exactly one active consumer and both roles agree; else None."""
        held = self.holders()
        t = self.rig.topology
        out = self.rig.node.ctl("list_channels", "pid", "connection", "--no-table-headers",
                                "-q")
        connection = dict(line.split("\t") for line in out.splitlines() if line)
        counts = set()
        for role in ("inbound", "outbound"):
            queues = [shard.shard_queue(t, role, k) for k in range(t.shards)]
            if any(len(held[q]) != 1 for q in queues):
                return None
            counts.add(len({connection.get(held[q][0]) for q in queues}))
        return counts.pop() if len(counts) == 1 else None

    async def shared_by(self, count: int, wait: float = WAIT) -> None:
        """Until the shards of both roles are held by `count` hosts, one consumer each."""
        async def check() -> bool:
            return await asyncio.to_thread(self.connections_holding) == count
        await rig_until(check, f"the shards to be shared by {count} hosts", wait)


def postgres_port(url: str) -> int:
    return urllib.parse.urlsplit(url).port or 5432


def linked(database: str, address: str, link: Forwarder) -> str:
    """The URL of `database` through `link`, a forwarder listening on `address`."""
    url = urllib.parse.urlsplit(database)
    return url._replace(netloc=f"{url.username}@{address}:{link.port}").geturl()


def logged(host: Relayd, event: str) -> bool:
    return f'"event":"{event}"'.encode() in host.log_path.read_bytes()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hosts(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[Hosts]:
    """Host "a" (the rig's relay) and host "b", sharded, on the cluster and PostgreSQL."""
    root = tmp_path_factory.mktemp("hosts")
    async with postgres.database() as database:
        links = {"a": cluster.forward(postgres_port(database))}
        balancer = cluster.balancer()
        vhost = f"hosts-{secrets.token_hex(4)}"
        rig = await Rig.create(
            cluster.nodes[0], root, vhost, HOST_USERS,
            amqp={"url": f"amqp://guest:guest@{cluster.root}:{balancer}/{vhost}"},
            store={"url": linked(database, cluster.root, links["a"])},
            workers={"inbound": 1, "outbound": 1, "prefetch": 8},
            topology={"shards": SHARDS, "shard_member_ttl": MEMBER_TTL})
        fixture = Hosts(rig, cluster, database, links, {"a": rig.relayd})
        try:
            fixture.start("b")
            await fixture.shared_by(2)
            yield fixture
        finally:
            for name in [n for n in fixture.running if n != "a"]:
                await fixture.stop(name, signal.SIGKILL)
            await rig.close()


def record_ordered(rig: Rig, up: Row, down: Row) -> None:
    """Add the phase's rows to the report, then check: nothing lost or dead-lettered,
    nothing unexpected, no state change applied twice (seqs), the conversations' states,
    and order: each device's messages reach the business in the order sent, and each
    device gets its messages in seq order."""
    phase = up.phase
    reordered = rig.ledger.reordered(phase)
    up.notes.append(f"REORDERED: {reordered}" if reordered else "order kept")
    ROWS.extend([up, down])
    assert (up.lost, down.lost) == (0, 0), rig.ledger.missing(phase)
    assert (up.dead, down.dead) == ({}, {})
    assert not rig.ledger.unexpected
    assert rig.ledger.seq_conflicts(phase) == []
    assert "conversation states ok" in up.notes
    assert reordered == []


class TestHosts:
    """Phases in order on hosts "a" and "b" (and "c" for a while); each a row."""

    async def test_store_cut_off_from_one_host(self, hosts: Hosts) -> None:
        """Host b's link to PostgreSQL hangs while b still reaches the broker: b gives its
        shards up, a takes them all, and nothing is lost, reordered or applied twice;
        once the link is back b takes its share again."""
        rig, b = hosts.rig, hosts.running["b"]
        name = "store cut off from host b"

        async def cut() -> list[str]:
            await flowing(rig, name)
            started = time.monotonic()
            hosts.links["b"].freeze()
            try:
                await rig_until(lambda: asyncio.to_thread(logged, b, "fenced"),
                                "host b to give its shards up")
                await hosts.shared_by(1)
                moved = time.monotonic() - started
                await flowing(rig, name)
            finally:
                hosts.links["b"].thaw()
            await rig_until(lambda: asyncio.to_thread(logged, b, "unfenced"),
                            "host b to take shards again")
            await hosts.shared_by(2)
            return [f"a seen holding every shard {moved:.0f} s after the cut"]

        record_ordered(rig, *await rig.phase(name, cut, opened=True, max_rounds=MAX_ROUNDS))

    async def test_kill_a_host(self, hosts: Hosts) -> None:
        """Host b killed (supervisor and workers, SIGKILL) mid-stream: a takes its shards
        after the member ttl; b started again takes its share back."""
        rig = hosts.rig
        name = "kill -9 host b"

        async def kill() -> list[str]:
            await flowing(rig, name)
            started = time.monotonic()
            await hosts.stop("b", signal.SIGKILL)
            await hosts.shared_by(1)
            moved = time.monotonic() - started
            await flowing(rig, name)
            hosts.start("b")
            await hosts.shared_by(2)
            return [f"a seen holding every shard {moved:.0f} s after the kill"]

        record_ordered(rig, *await rig.phase(name, kill, opened=True, max_rounds=MAX_ROUNDS))

    async def test_add_and_remove_hosts(self, hosts: Hosts) -> None:
        """Host c joins, b leaves (SIGTERM), b joins again, c leaves, mid-stream: the
        shards move four times with messages in flight."""
        rig = hosts.rig
        name = "hosts join and leave"

        async def churn() -> list[str]:
            for step, count in (("+c", 3), ("-b", 2), ("+b", 3), ("-c", 2)):
                await flowing(rig, name, 10)
                which = step[1]
                if step[0] == "+":
                    hosts.start(which)
                else:
                    assert await hosts.stop(which) == 0
                await hosts.shared_by(count)
            return ["c joined, b left, b joined, c left"]

        record_ordered(rig, *await rig.phase(name, churn, opened=True, max_rounds=MAX_ROUNDS))
@dataclass
class OnCluster:
    """relayd's workers (in this process, sharded) on node 0 of the cluster, a business
    `acme` and a user with a phone whose queue lives on node 2 and a tablet on node 1;
    the test publishes for them (through node 0) and reads their queues."""

    settings: config.Settings
    keyring: keys.KeyRing
    public: RelayPublic
    channel: aio_pika.abc.AbstractChannel
    phone: DeviceKeys
    tablet: DeviceKeys
    conversation: str = ""

    @property
    def inbox(self) -> str:
        return topology.business_inbox(self.settings.topology, "acme",
                                       self.keyring.opaque_secret)

    def queue_of(self, device: DeviceKeys) -> str:
        return topology.device_queue(self.settings.topology, device.device,
                                     self.keyring.opaque_secret)

    async def up(self, device: DeviceKeys, kind: str, n: int) -> str:
        t, message_id = self.settings.topology, str(uuid.uuid4())
        await publish(self.channel, t.ingress_exchange, t.inbound_routing_key,
                      aio_pika.Message(device.seal(self.public, device.payload(
                          "acme", kind, {"text": str(n)}, message_id=message_id)),
                          headers={"relayd-kid": self.public.kid},
                          delivery_mode=aio_pika.DeliveryMode.PERSISTENT))
        return message_id

    async def answer(self, n: int) -> str:
        reply_id = str(uuid.uuid4())
        await publish(self.channel, self.settings.topology.replies_exchange, "acme",
                      aio_pika.Message(reply(self.conversation, "message", {"text": str(n)},
                                             reply_id), content_type="application/json",
                                       user_id="guest",
                                       delivery_mode=aio_pika.DeliveryMode.PERSISTENT))
        return reply_id

    async def events_in_order(self, expected: list[str], pace_s: float = 0.0) -> list[str]:
        return await first_arrivals(self.channel, self.inbox, set(expected),
                                    lambda body: str(parse_event(body)["id"]), pace_s)

    async def replies_in_order(self, device: DeviceKeys, expected: list[str],
                               pace_s: float = 0.0) -> list[str]:
        def read(body: bytes) -> str:
            down = device.open(self.public, body)
            return str(down["id"]) if down["id"] in expected else ""
        return await first_arrivals(self.channel, self.queue_of(device), set(expected), read,
                                    pace_s)

    async def dead(self) -> int:
        queue = await self.channel.declare_queue(self.settings.topology.dead_queue,
                                                 passive=True)
        return int(queue.declaration_result.message_count or 0)


@contextlib.asynccontextmanager
async def on_cluster(cluster: Cluster, vhost: str, root: Path) -> AsyncIterator[OnCluster]:
    urls = [f"amqp://guest:guest@{n.host}:{n.amqp_port}/{vhost}" for n in cluster.nodes]
    path = relayd_config(root, urls[0], topology={"shards": 2}, workers={
        "retry_initial_backoff": 0.1, "retry_max_backoff": 1.0, "max_attempts": 2})
    settings = config.load(path, environ={})
    keyring = keys.load(settings.keys.dir, timedelta(days=1))
    store = await open_store(settings.store.url, secret=keyring.opaque_secret)
    stop = asyncio.Event()
    workers: list[asyncio.Task[None]] = []
    connection = await aio_pika.connect(urls[0])
    try:
        await admin.declare_all(settings, store, keyring.opaque_secret)
        await admin.add_business(settings, store, Business("acme", "guest", False),
                                 keyring.opaque_secret)
        phone, tablet = DeviceKeys.generate("phone"), DeviceKeys.generate("tablet")
        for device, node in ((phone, 2), (tablet, 1)):  # a queue lives where it is declared
            at = settings.model_copy(update={"amqp": settings.amqp.model_copy(
                update={"url": urls[node]})})
            await admin.add_device(at, store, Device(
                device.device, "alice", device.kem, device.enc_public, device.sign_public),
                keyring.opaque_secret)
        ready = []
        for role in ("inbound", "outbound"):
            consuming = asyncio.Event()
            ready.append(consuming)
            workers.append(asyncio.create_task(worker.serve(
                settings, role, store, lambda: keyring, stop, consuming)))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 60)
        relay = OnCluster(settings, keyring, RelayPublic.from_json(keyring.public_info()),
                          await connection.channel(publisher_confirms=True), phone, tablet)
        await relay.events_in_order([await relay.up(phone, "start", 0)])
        _, conversation = await store.business_and_conversation("acme", "alice")
        assert conversation is not None
        relay.conversation = conversation.id
        yield relay
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers, return_exceptions=True), 60)
        await connection.close()
        await store.close()


async def publish(channel: aio_pika.abc.AbstractChannel, exchange: str, routing_key: str,
                  message: aio_pika.Message) -> None:
    """Publish with a confirm, again after a failure, until the broker confirms it (the
    same body each time: a copy that got through before is a duplicate, never a loss)."""
    for _ in range(60):
        try:
            await (await channel.get_exchange(exchange, ensure=False)).publish(
                message, routing_key=routing_key, timeout=10)
        except (aio_pika.exceptions.AMQPError, ConnectionError, TimeoutError):
            if channel.is_closed:
                await channel.reopen()
            await asyncio.sleep(0.5)
        else:
            return
    raise AssertionError("a publish was never confirmed")


async def first_arrivals(channel: aio_pika.abc.AbstractChannel, queue: str, expected: set[str],
                         read: Callable[[bytes], str], pace_s: float = 0.0) -> list[str]:
    """The ids read from `queue` in the order they first arrived, until every expected
    one came (the same id again is dropped: at least once); each acked `pace_s` after it
    came (a reader that cannot keep up)."""
    seen: list[str] = []
    async with asyncio.timeout(WAIT_S), (await channel.get_queue(queue, ensure=False)
                                         ).iterator() as messages:
        async for message in messages:
            await asyncio.sleep(pace_s)
            await message.ack()
            got = read(message.body)
            if got and got not in seen:
                seen.append(got)
            if expected <= set(seen):
                break
    return seen


class TestOrderOnTheCluster:
    async def test_a_stopped_node_delays_replies_in_order_and_loses_none(
            self, cluster: Cluster, vhost: str, tmp_path: Path) -> None:
        """With the node that holds the phone's (classic, unreplicated) queue stopped for
        longer than relayd once retried (workers.max_attempts tries), the user's tablet
        writes to the business and the business answers: every reply waits, held in
        relayd.outbound, and reaches both devices in the order sent once the node is
        back; every up message reaches the business in order; nothing is dead-lettered."""
        async with on_cluster(cluster, vhost, tmp_path) as relay:
            replies = [await relay.answer(n) for n in range(5)]
            started = time.monotonic()
            await asyncio.to_thread(cluster.stop, 2)
            try:
                ups = [await relay.up(relay.tablet, "message", n) for n in range(5)]
                replies += [await relay.answer(n) for n in range(5, 15)]
                await asyncio.sleep(OUTAGE_S)  # the fault's length, not a synchronisation
            finally:
                await asyncio.to_thread(cluster.start_node, 2)
            outage_s = time.monotonic() - started
            # the tablet's messages echo to the phone: they waited for the node too
            assert await relay.events_in_order(ups) == ups
            assert await relay.replies_in_order(relay.phone, replies) == replies
            assert await relay.replies_in_order(relay.tablet, replies) == replies
            assert await relay.dead() == 0
        NOTES.append(f"node holding a device queue stopped {outage_s:.0f} s under traffic "
                     f"(relayd once gave up after {relay.settings.workers.max_attempts} "
                     f"tries): {len(replies)} replies to 2 devices and {len(ups)} up "
                     "messages, all in order, 0 lost, 0 dead-lettered")

    async def test_full_queues_keep_order_both_ways(self, cluster: Cluster, vhost: str,
                                                    tmp_path: Path) -> None:
        """With the business inbox and the phone's queue capped at 2 (reject-publish)
        and read slowly, the tablet's messages reach the business and the replies reach
        both devices in the order sent: none lost, none dead-lettered."""
        async with on_cluster(cluster, vhost, tmp_path) as relay:
            node = cluster.nodes[0]
            caps = {"inbox-full": relay.inbox, "phone-full": relay.queue_of(relay.phone)}
            for name, queue in caps.items():
                node.ctl("set_policy", "-p", vhost, "--apply-to", "queues", name,
                         f"^{queue.replace('.', '[.]')}$",
                         '{"max-length": 2, "overflow": "reject-publish"}')
            try:
                ups = [await relay.up(relay.tablet, "message", n) for n in range(20)]
                replies = [await relay.answer(n) for n in range(20)]
                # read side by side: the tablet's messages echo to the phone's full queue
                events, down = await asyncio.gather(
                    relay.events_in_order(ups, PACE_S),
                    relay.replies_in_order(relay.phone, replies, PACE_S))
                assert events == ups
                assert down == replies
            finally:
                for name in caps:
                    node.ctl("clear_policy", "-p", vhost, name)
            assert await relay.replies_in_order(relay.tablet, replies) == replies
            assert await relay.dead() == 0
        NOTES.append(f"business inbox and a device queue capped at 2, read slowly: "
                     f"{len(ups)} up and {len(replies)} replies to 2 devices, all in order, "
                     "0 lost, 0 dead-lettered")
