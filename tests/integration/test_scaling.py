"""Several relayd hosts on one broker and one PostgreSQL: order, nothing lost, state once.

Each host is a real `relayd run` process with its own config file and its own copy of the
relay's keys, as on separate machines; they share the vhost and the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import urllib.parse
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from relayd import shard
from relayd.client import parse_event
from relayd.config import Topology
from relayd.errors import ExitCode, StoreUnavailableError
from relayd.store.postgres import PostgresStore
from tests.integration.harness import (
    WAIT,
    Relay,
    kill_group,
    rabbitmqctl,
    relay_in_vhost,
    stop_process,
)
from tests.support import postgres
from tests.support.cluster import forward

USERS = 6
COUNT = 40  # numbered messages per conversation, each way
SHARDS = 4


def consumers(relay: Relay) -> Counter[str]:
    """Consumers per queue, standbys included (the broker's consumer_count omits those)."""
    listing = rabbitmqctl("list_consumers", "-q", "--no-table-headers", "-p", relay.vhost,
                          "queue_name")
    return Counter(listing.split())


def work_queues(t: Topology, role: str) -> list[str]:
    """The queues the workers of `role` consume between them."""
    if not shard.sharded(t, role):
        return [shard.entry_queue(t, role)]
    return [shard.shard_queue(t, role, k) for k in range(t.shards)]


def holders(relay: Relay) -> dict[str, list[str]]:
    """The connection (its client address) of each consumer of each queue."""
    connection = {}
    for line in rabbitmqctl("list_channels", "-q", "--no-table-headers", "pid",
                            "name").splitlines():
        pid, name = line.split("\t")
        connection[pid] = name.rsplit(" (", 1)[0]
    held: dict[str, list[str]] = defaultdict(list)
    for line in rabbitmqctl("list_consumers", "-q", "--no-table-headers", "-p", relay.vhost,
                            "queue_name", "channel_pid").splitlines():
        queue, pid = line.split("\t")
        held[queue].append(connection.get(pid, "gone"))
    return held


async def wait_shared(relay: Relay, hosts: int, roles: tuple[str, ...] = ("inbound", "outbound"),
                      wait: float = 60) -> None:
    """Until each role's shard queues have one consumer each, spread over `hosts`
    connections (one per host: each host runs one worker of each role), and each entry
    queue has its router."""
    t = relay.settings.topology
    async with asyncio.timeout(wait):
        while True:  # the broker offers no event for a new consumer
            held = await asyncio.to_thread(holders, relay)  # the stream flows meanwhile
            if all(len(held[shard.entry_queue(t, role)]) == 1
                   and all(len(held[q]) == 1 for q in work_queues(t, role))
                   and len({held[q][0] for q in work_queues(t, role)}) == hosts
                   for role in roles):
                return
            await asyncio.sleep(0.2)


async def wait_consumers(relay: Relay, at_least: int, wait: float = 60) -> None:
    """Until the work queue of each role has at least `at_least` consumers."""
    t = relay.settings.topology
    names = [q for role in ("inbound", "outbound") for q in work_queues(t, role)]
    async with asyncio.timeout(wait):
        while True:  # the broker offers no event for a new consumer
            counts = consumers(relay)
            if all(counts[name] >= at_least for name in names):
                return
            await asyncio.sleep(0.2)


async def drain(relay: Relay, queue_name: str, expected: set[str], key: Any,
                wait: float = 90) -> list[Any]:
    """Every message of a queue, acked and decoded with `key`, until each expected id was
    seen; returns them in arrival order (duplicates included)."""
    seen: set[str] = set()
    got: list[Any] = []
    queue = await relay.queue(queue_name)
    async with asyncio.timeout(wait), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            item = key(message)
            got.append(item)
            seen.add(item["id"])
            if expected <= seen:
                break
    return got


def first_occurrences(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At-least-once delivery may repeat a message; the order is that of first arrivals."""
    seen: set[str] = set()
    unique = []
    for item in items:
        if item["id"] not in seen:
            seen.add(item["id"])
            unique.append(item)
    return unique


def stop_all(*processes: subprocess.Popen[bytes]) -> list[int]:
    """SIGTERM each host still running; its exit code (and SIGKILL whatever is left over,
    workers included)."""
    codes = [stop_process(p, signal.SIGTERM) if p.poll() is None else p.returncode
             for p in processes]
    for process in processes:
        kill_group(process)
    return codes


def take_away(host: subprocess.Popen[bytes], sig: int) -> None:
    """SIGKILL a host's supervisor and workers at once, as a crash of its machine would;
    or SIGTERM its supervisor, which stops its workers gracefully."""
    if sig == signal.SIGKILL:
        os.killpg(host.pid, signal.SIGKILL)
    else:
        host.send_signal(sig)


class Stream:
    """Numbered messages, each round one up and one reply per conversation, interleaved."""

    def __init__(self, relay: Relay, devices: list[Any]) -> None:
        self.relay, self.devices = relay, devices
        self.rounds = 0
        self.up: dict[str, set[str]] = defaultdict(set)
        self.down: dict[str, set[str]] = defaultdict(set)
        self.conversation: dict[str, str] = {}

    async def start(self) -> None:
        starts = {await self.relay.send(d, "acme", "start"): d for d in self.devices}
        self.conversation = {starts[e["id"]].device: e["conversation"]
                             for e in await self.relay.events("acme", len(self.devices))}

    async def round(self) -> None:
        self.rounds += 1
        text = {"text": str(self.rounds)}
        for d in self.devices:
            c = self.conversation[d.device]
            self.up[c].add(await self.relay.send(d, "acme", "message", text))
            self.down[d.device].add(await self.relay.reply("acme", c, "message", text))

    async def assert_in_order(self) -> None:
        """Every message arrived, and the first arrivals of each conversation, both ways,
        are in the order sent, with down seqs counting 1, 2, …"""
        relay, numbers = self.relay, [str(n) for n in range(1, self.rounds + 1)]
        events = await drain(relay, relay.inbox("acme"), set().union(*self.up.values()),
                             lambda m: parse_event(m.body))
        for c, ids in self.up.items():
            mine = first_occurrences([e for e in events if e["conversation"] == c])
            assert [e["body"]["text"] for e in mine] == numbers
            assert {e["id"] for e in mine} == ids
        for d in self.devices:
            received = first_occurrences(await drain(
                relay, relay.device_queue(d), self.down[d.device],
                lambda m, d=d: d.open(relay.public, m.body)))
            assert [m["body"]["text"] for m in received] == numbers
            assert [m["seq"] for m in received] == list(range(1, self.rounds + 1))


class TestOrder:
    @pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
    async def test_order_per_conversation_survives_losing_a_host(self, tmp_path: Path,
                                                                 sig: int) -> None:
        """Interleaved numbered conversations through two hosts with sharded queues arrive
        in order both ways and complete, although one host is killed (or stopped)
        mid-stream."""
        # A small prefetch keeps a backlog in the broker, for host B to take over.
        async with relay_in_vhost(tmp_path, store="postgresql", workers={"prefetch": 8},
                                  topology={"shards": SHARDS, "shard_member_ttl": 1.5}
                                  ) as relay:
            await relay.add_business("acme")
            devices = [await relay.add_device(f"user-{i}", f"dev-{i}") for i in range(USERS)]
            host_a = relay.spawn()
            await wait_shared(relay, 1)  # host A routes and holds every shard
            host_b = relay.spawn(config_path=relay.other_host("host-b"))
            try:
                await wait_shared(relay, 2)  # A handed half the shards over to B
                stream = Stream(relay, devices)
                await stream.start()
                for n in range(1, COUNT + 1):
                    await stream.round()
                    if n == COUNT // 2:  # both hosts are at work on the stream: take A away
                        await relay.wait_depth(relay.inbox("acme"), USERS * 4)
                        take_away(host_a, sig)
                assert host_a.wait(timeout=30) == (-sig if sig == signal.SIGKILL else 0)
                await wait_shared(relay, 1)  # B holds every shard, and routes
                await stream.assert_in_order()
            finally:
                codes = stop_all(host_a, host_b)
            assert codes[1] == ExitCode.OK

    async def test_order_holds_while_shards_change_hands(self, tmp_path: Path) -> None:
        """Host B joins, leaves and joins again while bursts of the stream flow, so shards
        move between live hosts three times with messages in flight; every conversation
        still arrives in order both ways."""
        async with relay_in_vhost(tmp_path, store="postgresql", workers={"prefetch": 8},
                                  topology={"shards": SHARDS, "shard_member_ttl": 1.5}
                                  ) as relay:
            await relay.add_business("acme")
            devices = [await relay.add_device(f"user-{i}", f"dev-{i}") for i in range(USERS)]
            other = relay.other_host("host-b")
            host_a = relay.spawn()
            hosts = [host_a]
            try:
                await wait_shared(relay, 1)
                stream = Stream(relay, devices)
                await stream.start()
                done = asyncio.Event()

                async def send() -> None:
                    while not done.is_set() and stream.rounds < 3000:
                        for _ in range(10):  # a burst: a backlog for the hand-over to meet
                            await stream.round()
                        await asyncio.sleep(0.2)

                sender = asyncio.create_task(send())
                hosts.append(relay.spawn(config_path=other))
                await wait_shared(relay, 2)
                assert await asyncio.to_thread(stop_process, hosts[-1]) == ExitCode.OK
                await wait_shared(relay, 1)
                hosts.append(relay.spawn(config_path=other))
                await wait_shared(relay, 2)
                assert not sender.done()  # the shards moved three times mid-stream
                done.set()
                await sender
                await stream.assert_in_order()
            finally:
                codes = stop_all(*hosts)
            assert codes == [ExitCode.OK] * len(codes)


class TestSeveralHosts:
    async def test_each_state_change_is_applied_once(self, tmp_path: Path) -> None:
        """Two hosts consuming the same queues: a replayed envelope is accepted once, down
        seqs have no gap or repeat, and a conversation closes once."""
        async with relay_in_vhost(tmp_path, store="postgresql") as relay:
            await relay.add_business("acme")
            phone = await relay.add_device("alice", "phone")
            laptop = await relay.add_device("alice", "laptop")
            hosts = [relay.spawn(), relay.spawn(config_path=relay.other_host("host-b"))]
            try:
                await wait_consumers(relay, 2)
                await relay.send(phone, "acme", "start")
                [start] = await relay.events("acme", 1)
                conversation = start["conversation"]

                sealed = phone.seal(relay.public, phone.payload("acme", "message",
                                                               {"text": "once"}))
                await asyncio.gather(*(relay.publish_up(sealed) for _ in range(40)))
                dead = await relay.dead(39)
                assert {m.headers["x-relayd-reason"] for m in dead} == {"replayed"}
                [accepted] = await relay.events("acme", 1)
                assert accepted["body"] == {"text": "once"}

                replies = await asyncio.gather(*(
                    relay.reply("acme", conversation, "message", {"text": str(n)})
                    for n in range(30)))
                on_phone = await relay.received(phone, 30)
                on_laptop = await relay.received(laptop, 32)  # two echoes, then the replies
                assert sorted(m["seq"] for m in on_phone) == list(range(1, 31))
                assert sorted(m["seq"] for m in on_laptop) == list(range(1, 33))
                assert {m["id"] for m in on_phone} == set(replies)

                close = phone.seal(relay.public, phone.payload("acme", "close"))
                await asyncio.gather(*(relay.publish_up(close) for _ in range(5)))
                [closed] = await relay.events("acme", 1)
                assert closed["type"] == "close"
                assert {m.headers["x-relayd-reason"] for m in await relay.dead(4)} == {
                    "replayed"}
                [gone] = await relay.received(laptop, 1)
                assert gone["type"] == "close"
                late = await relay.reply("acme", conversation, "message", {"text": "late"})
                [error] = await relay.events("acme", 1)
                assert (error["ref"], error["code"]) == (late, "conversation_closed")
                await relay.assert_empty(relay.inbox("acme"), relay.device_queue(phone),
                                         relay.device_queue(laptop),
                                         relay.settings.topology.dead_queue)
            finally:
                codes = stop_all(*hosts)
            assert codes == [ExitCode.OK, ExitCode.OK]


@pytest.mark.parametrize("role", ["inbound", "outbound"])
class TestRouter:
    async def test_a_standby_takes_over_the_router(self, tmp_path: Path, role: str) -> None:
        """Only one host routes an entry queue; when it stops, another takes over."""
        async with relay_in_vhost(tmp_path, topology={"shards": 2}) as relay:
            entry = shard.entry_queue(relay.settings.topology, role)
            first = relay.spawn(role)
            second = None
            try:
                await wait_shared(relay, 1, roles=(role,))
                router = holders(relay)[entry]
                second = relay.spawn(role, config_path=relay.other_host("host-b"))
                await wait_shared(relay, 2, roles=(role,))
                assert holders(relay)[entry] == router  # the first host still routes
                assert stop_process(first) == ExitCode.OK
                await wait_shared(relay, 1, roles=(role,))
                assert holders(relay)[entry] != router
            finally:
                stop_all(first, *([second] if second else []))


async def read_only(url: str, on: bool) -> None:
    """Turn the database of `url` read-only (or writable again), as a failover to a standby
    does, and end its sessions so that every connection sees it."""
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(f"{postgres.SERVER}/postgres")
    try:
        await admin.execute(f'ALTER DATABASE "{name}" '
                            + ("SET default_transaction_read_only = on" if on
                               else "RESET default_transaction_read_only"))
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = $1 AND pid <> pg_backend_pid()", name)
    finally:
        await admin.close()


async def logged(log: Path, event: str, wait: float = 60) -> None:
    """Until a host's log has `event` (a log offers no event to wait on)."""
    async with asyncio.timeout(wait):
        while True:
            if f'"event":"{event}"'.encode() in await asyncio.to_thread(log.read_bytes):
                return
            await asyncio.sleep(0.1)


class TestStoreFailover:
    async def test_a_database_that_turns_read_only_holds_every_message(
            self, tmp_path: Path) -> None:
        """PostgreSQL turns read-only mid-stream (every session ended, as in a failover),
        long enough for the host to give its shards up, then writable again: nothing is
        dead-lettered (a read-only server was taken for a bug, internal_error), every
        message arrives once with its seq, in order both ways (a message held while the
        store is unavailable keeps its place)."""
        async with relay_in_vhost(tmp_path, store="postgresql", workers={"prefetch": 8},
                                  topology={"shards": SHARDS, "shard_member_ttl": 1.5},
                                  logging={"level": "info"}) as relay:
            await relay.add_business("acme")
            devices = [await relay.add_device(f"user-{i}", f"dev-{i}") for i in range(USERS)]
            host = relay.spawn()
            log = relay.config_path.parent / "relayd.log"
            try:
                await wait_shared(relay, 1)
                stream = Stream(relay, devices)
                await stream.start()
                for n in range(1, COUNT + 1):
                    if n == COUNT // 4:
                        # This round meets the read-only store: the host fences only
                        # after a second without renewing its membership.
                        await read_only(relay.settings.store.url, on=True)
                    await stream.round()
                    if n == COUNT // 4:
                        await logged(log, "fenced")
                    if n == COUNT // 2:
                        await read_only(relay.settings.store.url, on=False)
                await stream.assert_in_order()
                await relay.assert_empty(relay.settings.topology.dead_queue)
            finally:
                codes = stop_all(host)
            assert codes == [ExitCode.OK]
            assert b'"reason":"store_unavailable"' in log.read_bytes()  # the fault did bite
            assert b'"event":"unfenced"' in log.read_bytes()

    async def test_a_call_over_a_hung_link_fails_in_bounded_time(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The link to PostgreSQL hangs half-open (a frozen forwarder: nothing answers,
        nothing is closed): a store call fails as the store unavailable within
        CALL_SECONDS, to be retried in place, instead of waiting until TCP gives up hours
        later with its lane held; once the link is back, calls succeed again."""
        monkeypatch.setattr("relayd.store.postgres.CALL_SECONDS", 1.0)
        async with postgres.database() as url:
            parts = urllib.parse.urlsplit(url)
            link = forward("127.0.0.1", parts.port or 5432)
            try:
                store = await PostgresStore.connect(
                    parts._replace(netloc=f"{parts.username}@127.0.0.1:{link.port}").geturl())
                try:
                    assert await store.business("acme") is None
                    link.freeze()
                    with pytest.raises(StoreUnavailableError):
                        await asyncio.wait_for(store.business("acme"), WAIT)
                    link.thaw()
                    for _ in range(10):  # the timed-out connection is dropped, not reused
                        with contextlib.suppress(StoreUnavailableError):
                            assert await asyncio.wait_for(store.business("acme"), WAIT) is None
                            break
                    else:
                        pytest.fail("the store did not come back after the link did")
                finally:
                    link.thaw()
                    await asyncio.wait_for(store.close(), WAIT)
            finally:
                link.stop()

    async def test_a_host_cut_off_from_the_store_gives_its_shards_up(
            self, tmp_path: Path) -> None:
        """Host B's link to PostgreSQL hangs (a frozen forwarder) while B still reaches the
        broker: B gives its shards up before its lease runs out, host A takes them all, and
        the stream completes in order both ways. Once the link is back, B takes its share
        again. (B used to keep its shards, and single active consumer kept A out.)"""
        async with relay_in_vhost(tmp_path, store="postgresql", workers={"prefetch": 8},
                                  topology={"shards": SHARDS, "shard_member_ttl": 1.5},
                                  logging={"level": "info"}) as relay:
            await relay.add_business("acme")
            devices = [await relay.add_device(f"user-{i}", f"dev-{i}") for i in range(USERS)]
            url = urllib.parse.urlsplit(relay.settings.store.url)
            link = forward("127.0.0.1", url.port or 5432)
            other = relay.other_host("host-b")
            data = yaml.safe_load(other.read_text())
            data["store"]["url"] = url._replace(
                netloc=f"{url.username}@127.0.0.1:{link.port}").geturl()
            other.write_text(yaml.safe_dump(data))
            hosts = [relay.spawn()]
            try:
                await wait_shared(relay, 1)
                hosts.append(relay.spawn(config_path=other))
                await wait_shared(relay, 2)
                stream = Stream(relay, devices)
                await stream.start()
                for n in range(1, COUNT + 1):
                    await stream.round()
                    if n == COUNT // 4:
                        link.freeze()
                        await wait_shared(relay, 1)  # A holds every shard
                    if n == COUNT // 2:
                        link.thaw()
                        await wait_shared(relay, 2)  # B took its share back
                await stream.assert_in_order()
                await relay.assert_empty(relay.settings.topology.dead_queue)
            finally:
                link.stop()
                codes = stop_all(*hosts)
            assert codes == [ExitCode.OK, ExitCode.OK]
            log = (other.parent / "relayd.log").read_bytes()
            assert b'"event":"fenced"' in log
            assert b'"event":"unfenced"' in log
