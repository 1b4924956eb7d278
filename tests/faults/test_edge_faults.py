"""Nothing is lost, and order is kept, for devices connected through the edge.

A relay of its own in a vhost of the fault suite's node: `relayd run` with two edge
processes on one port, one inbound and one outbound worker (so that one process orders
each device's messages: docs/protocol.md section 9). Every device logs in through the
edge (relayd.client.EdgeDevice, which reconnects and resumes by itself), sends its
numbered messages there and takes its down messages from there. Each test is a phase
(tests/faults/rig.py): a fault under traffic, then closes, a full drain and the
checker's row, which must show nothing lost and no message overtaken by one its sender
sent later.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.faults.ledger import NOTES, Row
from tests.faults.rig import Rig
from tests.faults.test_faults import flowing, record
from tests.support.broker import TestBroker

pytestmark = [pytest.mark.faults, pytest.mark.broker_node,
              pytest.mark.asyncio(loop_scope="module")]

USERS = {"e0": 2, "e1": 2, "e2": 1}  # user -> devices
EDGES = 2
KILLS = 4


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(node: TestBroker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    seed = int(os.environ.get("FAULT_SEED") or random.randrange(1_000_000))
    rig = await Rig.create(node, tmp_path_factory.mktemp("edge-faults"), "edge-faults", USERS,
                           edge=EDGES, workers={"inbound": 1, "outbound": 1})
    rig.rng.seed(seed)
    try:
        yield rig
    finally:
        await rig.close()
        NOTES.append(f"edge rows: seed {seed}; {len(USERS)} users with {sum(USERS.values())} "
                     f"devices, all through {EDGES} edge processes of relayd run")


def in_order(rig: Rig, up: Row, down: Row) -> None:
    """The phase's rows, checked as every fault row is, and for order."""
    reordered = rig.ledger.reordered(up.phase)
    up.notes.append(f"REORDERED: {reordered}" if reordered else "order kept")
    record(rig, up, down)
    assert reordered == []


class TestThroughTheEdge:
    async def test_kill_9_edge_processes(self, rig: Rig) -> None:
        """Edge processes killed with SIGKILL under traffic: their devices reconnect to
        whichever edge takes them and resend what was not acked; nothing is lost, and no
        message overtakes one its sender sent earlier."""
        name = f"edge kill -9 x{KILLS}"

        dropped: list[int] = []

        def logins() -> int:
            return sum(p.edge.connects for p in rig.phones if p.edge is not None)

        before = logins()

        async def kills() -> list[str]:
            for _ in range(KILLS):
                await flowing(rig, name, 10)
                await asyncio.sleep(rig.rng.uniform(0.0, 1.0))  # a random moment
                dropped.append(await rig.kill_edge())
            await flowing(rig, name, 10)
            return [f"{KILLS} edge processes killed, holding {sum(dropped)} devices in all; "
                    f"{logins() - before} logins again"]

        in_order(rig, *await rig.phase(name, kills))
        assert all(dropped)  # each kill cut devices off mid-stream
        assert logins() - before >= sum(dropped)

    async def test_broker_restart(self, rig: Rig) -> None:
        """The broker stopped and started again under traffic through the edge: the edge
        nacks what it cannot publish, the devices send it again, and nothing is lost or
        overtaken."""
        name = "edge: broker restart"

        async def restart() -> list[str]:
            await flowing(rig, name)
            await asyncio.to_thread(rig.node.restart)
            await rig.ready()
            await flowing(rig, name)
            return ["node stopped and started"]

        in_order(rig, *await rig.phase(name, restart))
