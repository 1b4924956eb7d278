"""Push wake (relayd.wake) on a real broker, with a real edge: a device that no edge
connection reads is woken once per interval, one that is connected never, and a wake
carries the device and a count, nothing else."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson
import pytest
from prometheus_client import REGISTRY

from relayd import amqp, config, topology, wake
from tests.integration.edge_harness import put_down, running
from tests.integration.harness import WAIT, Relay, relay_in_vhost

ALICE = "alice@example.org"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "push_wake.py"
SECRET = "the parcel is under the mat"
OUTCOMES = ("sent", "online", "throttled", "empty", "gone", "skipped", "failed", "dropped")


def decided() -> dict[str, float]:
    """relayd_wakes_total by outcome, in this process (the workers run here)."""
    return {o: REGISTRY.get_sample_value("relayd_wakes_total", {"outcome": o}) or 0.0
            for o in OUTCOMES}


async def until_decided(before: dict[str, float], count: int) -> dict[str, float]:
    """Until `count` more messages queued for devices have had their wake decided; the
    outcomes since `before`."""
    async with asyncio.timeout(WAIT):  # a counter in this process: no event to wait on
        while sum(decided().values()) - sum(before.values()) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return {o: decided()[o] - before[o] for o in OUTCOMES if decided()[o] > before[o]}


async def wakes(relay: Relay) -> list[dict[str, object]]:
    """Every wake in relayd.wake now (after every decision was counted, all there are)."""
    queue = relay.settings.topology.wake_queue
    messages = await relay.take(queue, await relay.depth(queue))
    for message in messages:
        assert not message.headers
        assert (message.content_type, message.type) == ("application/json", "wake")
        assert SECRET.encode() not in message.body
    return [orjson.loads(m.body) for m in messages]


class TestPushWake:
    async def test_offline_once_per_interval_online_never(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Four messages for an offline phone in one interval: one wake; two more in the
        next interval: one more. Its user's laptop, connected to the edge, gets the same
        replies and no wake."""
        now = [1000.0]
        monkeypatch.setattr(wake, "monotonic", lambda: now[0])
        async with relay_in_vhost(tmp_path, wake={"enabled": True, "interval": 60}) as relay:
            await relay.add_business("acme")
            await relay.add_device(ALICE, "alice-phone")
            laptop = await relay.add_device(ALICE, "alice-laptop")
            await relay.start()
            async with running(relay) as edge:
                connected = await edge.login(laptop)
                before = decided()
                await relay.send(laptop, "acme", "start", {"text": SECRET})  # echo: phone
                [start] = await relay.events("acme", 1)
                for _ in range(3):  # to both
                    await relay.reply("acme", start["conversation"], "message",
                                      {"text": SECRET})
                # the laptop's notices: online, or throttled when decided at once
                outcomes = await until_decided(before, 1 + 3 + 3)
                assert outcomes["sent"] == 1
                assert outcomes.keys() <= {"sent", "throttled", "online"}
                [first] = await wakes(relay)
                assert first.keys() == {"v", "type", "device", "count"}
                assert (first["v"], first["type"], first["device"]) == (1, "wake",
                                                                       "alice-phone")
                assert 1 <= first["count"] <= 4  # type: ignore[operator]

                now[0] += 60  # the next interval
                before = decided()
                for _ in range(2):
                    await relay.reply("acme", start["conversation"], "message",
                                      {"text": SECRET})
                outcomes = await until_decided(before, 2 + 2)
                assert outcomes["sent"] == 1
                assert outcomes.keys() <= {"sent", "throttled", "online"}
                [second] = await wakes(relay)
                assert second["device"] == "alice-phone"
                assert second["count"] >= 5  # type: ignore[operator]  # nothing was read
                await connected.close()

    async def test_off_by_default(self, relay: Relay) -> None:
        """Without wake.enabled, no wake is decided and relayd.wake is not declared."""
        await relay.add_business("acme")
        phone = await relay.add_device(ALICE, "alice-phone")
        await relay.start()
        before = decided()
        await relay.send(phone, "acme", "start", {"text": SECRET})
        [start] = await relay.events("acme", 1)
        await relay.reply("acme", start["conversation"], "message", {"text": "hi"})
        await relay.received(phone, 1)
        assert decided() == before
        assert not await relay.exists(relay.settings.topology.wake_queue)

    async def test_the_example_push_service_pushes(self, tmp_path: Path) -> None:
        """examples/push_wake.py reads the wake of an offline device and pushes to its
        token, with the count and nothing else."""
        async with relay_in_vhost(tmp_path, wake={"enabled": True}) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device(ALICE, "alice-phone")
            await relay.start()
            await relay.send(phone, "acme", "start", {"text": SECRET})
            [start] = await relay.events("acme", 1)
            await relay.reply("acme", start["conversation"], "message", {"text": SECRET})
            await relay.wait_depth(relay.settings.topology.wake_queue, 1)
            process = await asyncio.create_subprocess_exec(
                sys.executable, str(EXAMPLE), "--url", relay.settings.amqp.url,
                stdout=asyncio.subprocess.PIPE)
            try:
                assert process.stdout is not None
                line = await asyncio.wait_for(process.stdout.readline(), WAIT)
            finally:
                process.terminate()
                await asyncio.wait_for(process.wait(), WAIT)
            assert line.decode() == "push to apns:1f0c…: 1 new message\n"
            assert await relay.depth(relay.settings.topology.wake_queue) == 0

    async def test_a_removed_device_costs_the_decider_nothing(self, relay: Relay) -> None:
        """A notice for a device whose queue is gone (a failed passive declare closes
        the channel it is made on) costs the device decided beside it nothing."""
        settings = relay.settings.model_copy(update={"wake": config.Wake(enabled=True)})
        await topology.declare(relay.channel, topology.wake(settings.topology))
        phone = await relay.add_device(ALICE, "alice-phone")
        await put_down(relay, phone, [b"sealed"])
        decider = wake.Waker(settings, relay.connection)
        await decider.open()
        try:
            before = decided()
            notice = amqp.Publisher(relay.channel, relay.settings, b"").notice
            decider.queued(notice, "removed", relay.settings.topology.device_queue
                           .format(device="removed"))
            decider.queued(notice, "alice-phone", relay.device_queue(phone))
            assert await until_decided(before, 2) == {"gone": 1, "sent": 1}
            [woken] = await wakes(relay)
            assert woken == {"v": 1, "type": "wake", "device": "alice-phone", "count": 1}
        finally:
            await decider.close()
