"""A backlog drains whole: relayd stopped under traffic within the rate limits loses nothing.

A relay of its own in a third vhost of the fault suite's node, with real device limits:
a burst of BURST and RATE messages a second. Every device sends one numbered message each
2/RATE s (half its rate) while relayd is stopped for OUTAGE_S and started again. The
backlog then drains at once, far faster than the devices sent it, and each device's share
of it is several times its burst: judged at the time it is drained, most of it would be
refused; judged by when each device sent it (its signed `ts`), none is.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.faults.ledger import ROWS
from tests.faults.rig import Rig
from tests.support.broker import TestBroker

pytestmark = [pytest.mark.faults, pytest.mark.broker_node,
              pytest.mark.asyncio(loop_scope="module")]

RATE, BURST = 2.0, 3  # limits.device_rate and device_burst
OUTAGE_S = 15.0
USERS = {"b0": 3, "b1": 2, "b2": 2, "b3": 3}  # user -> devices


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(node: TestBroker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    """Device limits as in production, only smaller; the business's are not under test."""
    rig = await Rig.create(node, tmp_path_factory.mktemp("backlog"), "backlog", USERS,
                           limits={"device_rate": RATE, "device_burst": BURST})
    try:
        yield rig
    finally:
        await rig.close()


class TestBacklog:
    async def test_a_backlog_within_the_rate_drains_whole(self, rig: Rig) -> None:
        """relayd stopped for OUTAGE_S while every device keeps sending at half its rate:
        once it is back, every message and every reply arrives, and none is rate_limited."""
        name = f"outage {OUTAGE_S:.0f} s at half the rate"

        async def outage() -> list[str]:
            code = await rig.relayd.stop(signal.SIGTERM)
            await asyncio.sleep(OUTAGE_S)  # the outage itself: traffic goes on meanwhile
            backlog = await rig.clients["probe"].counts(rig.topology.inbound_queue)
            rig.relayd.start()
            await rig.ready()
            assert code == 0
            waiting = backlog[0] if backlog else 0
            return [f"relayd stopped {OUTAGE_S:.0f} s; {waiting} messages waited, "
                    f"{waiting / len(rig.phones):.0f} per device (burst {BURST}, "
                    f"rate {RATE:g}/s)"]

        up, down = await rig.phase(name, outage, min_rounds=5, pace=2 / RATE)
        ROWS.extend([up, down])
        assert (up.lost, down.lost) == (0, 0), rig.ledger.missing(name)
        assert up.dead["rate_limited"] == 0
        assert up.delivered == up.sent
        assert down.delivered == down.sent
        assert "conversation states ok" in up.notes
