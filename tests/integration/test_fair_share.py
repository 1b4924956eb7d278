"""Rate limits: a flooding business and a flooding device are held back, others flow on."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aio_pika

from tests.integration.harness import add_amqp_user, amqp_url, rabbitmqctl, relay_in_vhost

MALLORY = "mallory@example.org"
ALICE = "alice@example.org"
FLOOD = 20
BURST = 3
# A rate so low that no token comes back while the test runs: exactly BURST get through.
LIMITS = {"device_rate": 0.0001, "device_burst": BURST,
          "business_rate": 0.0001, "business_burst": BURST}


async def in_order(sends: list[Coroutine[Any, Any, str]]) -> list[str]:
    """Run one sender's publishes one after another (the senders run side by side)."""
    return [await send for send in sends]


class TestFairShare:
    async def test_flooders_are_rate_limited_while_another_conversation_flows(
            self, tmp_path: Path) -> None:
        """A device and a business each sending 20 at once get 3 through and the rest
        refused with rate_limited, while a second conversation loses nothing."""
        async with relay_in_vhost(tmp_path, limits=LIMITS) as relay:
            globex_user = f"relayd-test-{secrets.token_hex(4)}"
            password = add_amqp_user(relay.vhost, globex_user)
            try:
                await relay.add_business("acme")  # the flooding business (AMQP user guest)
                await relay.add_business("globex", amqp_user=globex_user)
                spam = await relay.add_device(MALLORY, "spam")
                phone = await relay.add_device(ALICE, "phone")
                await relay.start()

                await relay.send(spam, "acme", "start")
                await relay.send(phone, "globex", "start")
                [flooded] = await relay.events("acme", 1)
                [calm] = await relay.events("globex", 1)

                globex = await aio_pika.connect(amqp_url(globex_user, password, relay.vhost))
                async with globex:
                    as_globex = await globex.channel(publisher_confirms=True)
                    flood_up = [relay.send(spam, "acme", "message", {"text": f"spam {i}"})
                                for i in range(FLOOD - 1)]
                    flood_down = [relay.reply("acme", flooded["conversation"], "message",
                                              {"text": f"ad {i}"}) for i in range(FLOOD)]
                    calm_down = [relay.reply("globex", calm["conversation"], "message",
                                             {"text": f"answer {i}"}, user_id=globex_user,
                                             channel=as_globex) for i in range(BURST)]
                    calm_up = relay.send(phone, "globex", "message", {"text": "thanks"})
                    sent_up, sent_down, answers, thanks = await asyncio.gather(
                        in_order(flood_up), in_order(flood_down), in_order(calm_down), calm_up)

                    # the other conversation: every message, both ways
                    [event] = await relay.events("globex", 1)
                    assert (event["type"], event["id"]) == ("message", thanks)
                    received = await relay.received(phone, BURST)
                    assert [m["id"] for m in received] == answers

                # the flooding device: BURST through (its start and two messages)
                dead = await relay.dead(FLOOD - BURST)
                assert {m.headers["x-relayd-reason"] for m in dead} == {"rate_limited"}
                assert {m.headers["x-relayd-queue"] for m in dead} == {"relayd.inbound"}
                # the flooding business: the first BURST replies delivered, in order, and
                # the flooding device told of each message of its own refused (issue 17)
                down = await relay.received(spam, BURST + FLOOD - BURST)
                delivered = [m for m in down if m["type"] == "message"]
                assert [m["id"] for m in delivered] == sent_down[:BURST]
                told = [m["body"] for m in down if m["type"] == "error"]
                assert told == [{"ref": ref, "code": "rate_limited"}
                                for ref in sent_up[BURST - 1:]]
                # ...and each of the others answered with a rate_limited error
                events = await relay.events("acme", FLOOD - 1)
                accepted = [e for e in events if e["type"] == "message"]
                errors = [e for e in events if e["type"] == "error"]
                assert len(accepted) == BURST - 1
                assert [e["ref"] for e in errors] == sent_down[BURST:]
                assert {e["code"] for e in errors} == {"rate_limited"}
                await relay.assert_empty(relay.device_queue(spam), relay.device_queue(phone),
                                         relay.inbox("acme"), relay.inbox("globex"),
                                         relay.settings.topology.dead_queue)
            finally:
                rabbitmqctl("delete_user", globex_user)


class TestFullInbox:
    async def test_a_full_inbox_holds_back_no_other_business(self, tmp_path: Path) -> None:
        """While acme's inbox is full and relayd holds the messages for it (as many as
        workers.prefetch), globex still gets its users' messages, those of a device whose
        message to acme is held included; and none of acme's is given up."""
        async with relay_in_vhost(
                tmp_path, workers={"prefetch": 4, "retry_initial_backoff": 0.5,
                                   "retry_max_backoff": 0.5, "max_attempts": 3},
                topology={"business_inbox_max_length": 1, "queue_type": "classic"}) as relay:
            await relay.add_business("acme")
            await relay.add_business("globex", amqp_user="globex-user")
            phones = [await relay.add_device(f"user-{i}", f"phone-{i}") for i in range(5)]
            await relay.start("inbound")
            to_acme = [await relay.send(phones[0], "acme", "start")]
            await relay.wait_depth(relay.inbox("acme"), 1)  # full from now on
            to_acme += [await relay.send(phone, "acme", "start") for phone in phones[1:]]
            calm = {await relay.send(phones[0], "globex", "start"),
                    await relay.send(phones[1], "globex", "start")}
            dead = await relay.queue(relay.settings.topology.dead_queue)
            events = await relay.queue(relay.inbox("globex"))
            order: list[str] = []
            arrived = asyncio.Event()

            def seen(what: str) -> Callable[[aio_pika.abc.AbstractIncomingMessage],
                                            Awaitable[None]]:
                async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                    await message.ack()
                    order.append(what)
                    if order.count("globex") == 2 or "dead" in order:
                        arrived.set()
                return on_message

            await dead.consume(seen("dead"))
            await events.consume(seen("globex"))
            await asyncio.wait_for(arrived.wait(), 60)
            assert order == ["globex", "globex"]
            # acme reads its inbox again: every message held for it arrives
            assert {e["id"] for e in await relay.events("acme", len(to_acme))} == set(to_acme)
            assert order == ["globex", "globex"]
            assert calm
