"""Queue semantics: a delivery limit and at-least-once dead-lettering on the work queues,
so a message that kills its worker every time ends in relayd.dead instead of looping.

A relay of its own in a second vhost of the fault suite's node, with a small delivery
limit. No input known to relayd crashes a worker (every handler error is caught and
retried or dead-lettered), so the test plays the crash: it kills the worker each time
the worker holds the message. To hold it long enough to be seen, the business's inbox is
unbound (relayd's publishes come back unroutable) and relayd's retry backoff is long.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.faults.ledger import ROWS
from tests.faults.rig import BUSINESS, WAIT, Rig, until
from tests.support.broker import TestBroker

pytestmark = [pytest.mark.faults, pytest.mark.broker_node,
              pytest.mark.asyncio(loop_scope="module")]

LIMIT = 2  # topology.delivery_limit: the broker dead-letters on the 3rd return


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(node: TestBroker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    """One user with one device; one worker per role, retrying only after 30 s."""
    rig = await Rig.create(
        node, tmp_path_factory.mktemp("poison"), "poison", {"p0": 1},
        workers={"inbound": 1, "outbound": 1, "retry_initial_backoff": 30,
                 "retry_max_backoff": 30},
        topology={"delivery_limit": LIMIT})
    try:
        yield rig
    finally:
        await rig.close()


async def bind(rig: Rig, queue: str, exchange: str, bound: bool) -> None:
    """Bind or unbind `queue` from `exchange`: what is routed nowhere is refused."""
    channel = await rig.clients["probe"].channel.get_underlay_channel()
    await (channel.queue_bind if bound else channel.queue_unbind)(queue, exchange, "")


class TestQueueSemantics:
    async def test_work_queues_have_a_delivery_limit_and_at_least_once(self, rig: Rig) -> None:
        """relayd.inbound and relayd.outbound are quorum queues with the limit and the
        at-least-once strategy (RabbitMQ 3.10+), which needs reject-publish."""
        arguments = rig.queue_arguments()
        for queue in (rig.topology.inbound_queue, rig.topology.outbound_queue):
            assert arguments[queue]["x-queue-type"] == "quorum"
            assert arguments[queue]["x-delivery-limit"] == LIMIT
            assert arguments[queue]["x-dead-letter-strategy"] == "at-least-once"
            assert arguments[queue]["x-overflow"] == "reject-publish"

    async def test_message_that_kills_its_worker_ends_in_dead(self, rig: Rig) -> None:
        """After the delivery limit the broker dead-letters it (x-death delivery_limit); a
        dead-letter that found relayd.dead unbound still arrives later: at-least-once."""
        name = f"poison: kills its worker x{LIMIT + 1}"
        t = rig.topology
        inbox = (rig.inbox, t.business_exchange.format(business=BUSINESS))
        await bind(rig, *inbox, bound=False)
        message_id, _ = await rig.send(name, rig.phones[0], "start")

        async def held() -> bool:  # a worker consumes and the message is not ready
            return await rig.clients["probe"].counts(t.inbound_queue) == (0, 1)

        for kill in range(LIMIT + 1):
            await until(held, "the worker to hold the message")
            if kill == LIMIT:  # the last one: what the broker dead-letters is routed nowhere
                await bind(rig, t.dead_queue, t.dead_exchange, bound=False)
            await rig.kill_worker("inbound")

        async def unroutable() -> bool:  # the broker's dead-letter found no queue: it keeps it
            return (f"Cannot forward any dead-letter messages from source quorum queue "
                    f"'{t.inbound_queue}' in vhost '{rig.vhost}'"
                    in rig.node.log_file.read_text(errors="replace"))
        await until(unroutable, "the broker to fail to dead-letter it")
        await bind(rig, t.dead_queue, t.dead_exchange, bound=True)  # relayd's restart did too
        await rig.ledger.until(lambda: message_id in rig.ledger.dead, WAIT)
        await bind(rig, *inbox, bound=True)
        up, _ = rig.ledger.rows(name)
        up.notes = [f"worker killed {LIMIT + 1} times holding it; dead-lettered while "
                    "relayd.dead was unbound, arrived once bound again (at-least-once)"]
        ROWS.append(up)
        assert rig.ledger.dead[message_id] == Counter({"delivery_limit": 1})
        assert (up.sent, up.lost, up.dead) == (1, 0, Counter({"delivery_limit": 1}))
