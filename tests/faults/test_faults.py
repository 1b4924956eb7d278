"""Nothing is lost under crashes, broker restarts, lost connections and overload.

One relay (`relayd run` and its workers) on a dedicated RabbitMQ node. Each test is a
phase: its own numbered batch flows both ways while one fault is injected; then closes,
a full drain, and the checker's row for that fault (tests/faults/ledger.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from relayd.client import DeviceKeys
from tests.faults.ledger import NOTES, ROWS, Row
from tests.faults.rig import WAIT, Fault, Phone, Rig, until
from tests.support.broker import TestBroker

pytestmark = [pytest.mark.faults, pytest.mark.broker_node,
              pytest.mark.asyncio(loop_scope="module")]

USERS = {"u0": 3, "u1": 2, "u2": 2, "u3": 3}  # user -> devices
ALARM_S = 12.0  # more than twice the 5 s heartbeat
KILLS = 9  # while the numbered traffic flows, then 3 more while the closes are handled


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(node: TestBroker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    """The relay and its parties, for every phase of this module in turn."""
    seed = int(os.environ.get("FAULT_SEED") or random.randrange(1_000_000))
    rig = await Rig.create(node, tmp_path_factory.mktemp("faults"), "faults", USERS)
    rig.rng.seed(seed)
    try:
        yield rig
    finally:
        await rig.close()
        for index, row in enumerate(ROWS):  # count what arrived after a phase's check too
            if row.phase in rig.ledger.ups_of:
                fresh = rig.ledger.rows(row.phase)[row.direction == "down"]
                fresh.notes = row.notes
                ROWS[index] = fresh
        mib = {role: f"{rss / 2**20:.0f} MiB" for role, rss in sorted(rig.rss_max.items())}
        NOTES.extend([
            f"seed {seed} (FAULT_SEED={seed} repeats the kill schedule); {len(USERS)} users "
            f"with {sum(USERS.values())} devices; relayd run with 2 inbound and 1 outbound "
            "worker processes",
            f"max RSS per worker during the suite: {mib}",
            f"'missed heartbeats' lines in the node's log: {rig.missed_heartbeats()}",
        ])


def record(rig: Rig, up: Row, down: Row) -> None:
    """Add the phase's rows to the report, then check what must hold after every fault."""
    ROWS.extend([up, down])
    phase = up.phase
    assert (up.lost, down.lost) == (0, 0), rig.ledger.missing(phase)
    assert not rig.ledger.unexpected
    assert rig.ledger.seq_conflicts(phase) == []
    # A delivered message may have a dead-lettered copy only when a device published its
    # envelope twice (a lost confirm): the relay turns the copy away as a replay.
    assert set(rig.ledger.dead_copies_of_delivered(phase)) <= {"replayed"}
    assert "conversation states ok" in up.notes
    assert rig.missed_heartbeats() == 0


async def flowing(rig: Rig, phase: str, more: int = 20) -> None:
    """Until `more` further messages of `phase` reached the business."""
    target = rig.ledger.arrived(phase) + more
    await rig.ledger.until(lambda: rig.ledger.arrived(phase) >= target, WAIT)


def connections_kept(rig: Rig, before: set[tuple[str, int, int, str]]) -> str:
    """The relay's broker connections are the ones it had: none was dropped and replaced."""
    after = rig.relayd_connections()
    assert {c[:2] for c in after} == {c[:2] for c in before}
    assert {c[2] for c in after} == {5}  # the heartbeat timeout relayd asked for
    return f"{len(after)} relayd connections kept (heartbeat 5 s)"


class TestFaults:
    """Phases in order, on one relay; each its own batch and its own row."""

    async def test_baseline_load_and_replays(self, rig: Rig) -> None:
        """Under a burst nothing is lost or duplicated, and replayed envelopes are refused."""
        name = "baseline burst + 4 replays"
        before = rig.relayd_connections()
        notes: list[str] = []

        async def replays() -> list[str]:
            await rig.drained(rig.topology.inbound_queue)
            for message_id in rig.ledger.ups_of[name][-4:]:
                rig.ledger.replayed.add(message_id)
                await rig.send(name, rig.phones[0], "", sealed=rig.sealed[message_id])
            return notes

        up, down = await rig.phase(name, replays, min_rounds=60, pace=0)
        up.notes.append(connections_kept(rig, before))
        record(rig, up, down)
        assert (up.duplicated, down.duplicated) == (0, 0)
        assert rig.ledger.dead_copies_of_delivered(name) == Counter({"replayed": 4})

    async def test_kill_9_workers(self, rig: Rig) -> None:
        """Workers killed with SIGKILL at random moments lose nothing and apply each state
        change once, closes included; the supervisor starts each one again."""
        assert rig.relayd.process is not None
        supervisor, victims = rig.relayd.process.pid, Counter[str]()

        def kills(count: int, latest: float) -> Fault:
            async def fault() -> list[str]:
                for _ in range(count):
                    await asyncio.sleep(rig.rng.uniform(0.0, latest))  # a random moment
                    victims[await rig.kill_worker()] += 1
                return [f"{sum(victims.values())} kills: "
                        + ", ".join(f"{n} {r}" for r, n in sorted(victims.items()))]
            return fault

        up, down = await rig.phase(f"kill -9 x{KILLS + 3}", kills(KILLS, 1.2),
                                   after_close=kills(3, 0.3))
        up.notes = up.notes[1:]  # the count after the closes says it all
        record(rig, up, down)
        assert sum(victims.values()) >= 10
        assert rig.relayd.process.pid == supervisor  # it started its workers again
        assert rig.relayd.process.poll() is None

    async def test_broker_restart(self, rig: Rig) -> None:
        """The broker stopped and started again mid-stream loses nothing."""
        name = "broker restart"

        async def restart() -> list[str]:
            await flowing(rig, name)
            await asyncio.to_thread(rig.node.restart)
            await rig.ready()
            await flowing(rig, name)
            return ["node stopped and started"]

        record(rig, *await rig.phase(name, restart))

    async def test_connections_closed_by_broker(self, rig: Rig) -> None:
        """Every connection closed by the broker (close_all_connections) loses nothing."""
        name = "close_all_connections"

        async def close_all() -> list[str]:
            await flowing(rig, name)
            before = rig.relayd_connections()
            rig.node.ctl("close_all_connections", "--global", "fault suite: all connections closed")
            await rig.ready()
            assert not {c[:2] for c in before} & {c[:2] for c in rig.relayd_connections()}
            await flowing(rig, name)
            return [f"{len(before)} relayd connections closed and reopened"]

        record(rig, *await rig.phase(name, close_all))

    async def test_memory_alarm(self, rig: Rig) -> None:
        """A memory alarm blocks publishers; once cleared the relay resumes, losing nothing."""
        name = "memory alarm"
        before = rig.relayd_connections()

        async def alarm() -> list[str]:
            await asyncio.gather(*(rig.round(name, 1000 + n) for n in range(100)))  # a backlog
            rig.node.ctl("set_vm_memory_high_watermark", "0")
            try:
                # "blocking": told of the alarm, with nothing published since (a relay
                # that drained the backlog before the alarm); "blocked": a publish waits
                await until(lambda: asyncio.to_thread(
                    lambda: any(c[3] in ("blocked", "blocking")
                                for c in rig.relayd_connections())),
                    "a relayd connection to be blocked")
                blocked = rig.relayd.rss()
                await asyncio.sleep(ALARM_S)  # the alarm lasts longer than a heartbeat timeout
                rss = [*blocked.values(), *rig.relayd.rss().values()]
            finally:
                rig.node.ctl("set_vm_memory_high_watermark", "0.4")
            return [f"relayd blocked for {ALARM_S:.0f} s; worker RSS then "
                    f"{max(rss) / 2**20:.0f} MiB at most"]

        up, down = await rig.phase(name, alarm)
        up.notes.append(connections_kept(rig, before))
        record(rig, up, down)

    async def test_business_inbox_full(self, rig: Rig) -> None:
        """A full inbox (reject-publish) holds messages back, each in its place, for
        longer than workers.max_attempts retries: none is dropped, none dead-lettered."""
        name = "inbox full (reject-publish)"
        inbox = rig.inbox
        before = rig.relayd_connections()
        mark = rig.log_mark()

        def held_long() -> bool:  # relayd logs a held message at its 1st and 10th wait
            with rig.relayd.log_path.open("rb") as log_file:
                log_file.seek(mark)
                return any(b'"event":"held"' in line and b'"waits":10' in line
                           for line in log_file)

        async def full() -> list[str]:
            await flowing(rig, name)
            await rig.pause_business()
            rig.node.ctl("set_policy", "-p", rig.vhost, "--apply-to", "queues", "inbox-full",
                         f"^{inbox.replace('.', '[.]')}$",
                         '{"max-length": 5, "overflow": "reject-publish"}')
            try:
                await until(lambda: asyncio.to_thread(held_long), "a message held 10 waits",
                            WAIT)
            finally:
                rig.node.ctl("clear_policy", "-p", rig.vhost, "inbox-full")
                await rig.resume_business()
            return [f"inbox capped at 5 while relayd held a message for 10 waits (more than "
                    f"{rig.settings.workers.max_attempts} attempts)"]

        up, down = await rig.phase(name, full)
        up.notes.append(connections_kept(rig, before))
        record(rig, up, down)
        assert not up.dead
        assert not down.dead

    async def test_sigterm_under_load(self, rig: Rig) -> None:
        """SIGTERM under load drains and exits 0; after a restart nothing is lost."""
        name = "SIGTERM under load"

        async def sigterm() -> list[str]:
            await flowing(rig, name)
            code = await rig.relayd.stop(signal.SIGTERM)
            rig.relayd.start()
            await rig.ready()
            assert code == 0
            return [f"relayd run exited {code}"]

        record(rig, *await rig.phase(name, sigterm))

    async def test_handler_crash_is_dead_lettered(self, rig: Rig, tmp_path: Path) -> None:
        """A message whose handler always crashes ends in relayd.dead as internal_error
        after workers.max_attempts, while other traffic flows."""
        name = "poison: handler crashes"
        broken = Phone("u9", DeviceKeys.generate("u9-d0"))
        await rig.break_device(broken.keys.device, broken.user, broken.keys.enc_public)

        async def poison() -> list[str]:
            message_id, _ = await rig.send(name, broken, "message", {"text": "poison"})
            await rig.ledger.until(lambda: bool(rig.ledger.dead.get(message_id)), WAIT)
            return [f"dead-lettered after {rig.settings.workers.max_attempts} attempts"]

        up, down = await rig.phase(name, poison)
        record(rig, up, down)
        assert up.dead == Counter({"internal_error": 1})
