"""relayd.amqp's own publish frames (Outlet, publish_method, encode_properties): the bytes
pamqp would write, publishes counted in the order they are written even when the write
queue is full, and nothing left waiting when the channel closes. The broker's side of
the same is tests/integration/test_publisher.py."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import inspect
from typing import Any, cast

import aiormq
import pamqp.frame
import pytest
from aiormq.abc import ChannelFrame
from hypothesis import given
from hypothesis import strategies as st
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from relayd import amqp

_short = st.text(max_size=90)
_values = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | _short | st.binary(
    max_size=8) | st.floats(allow_nan=False) | st.builds(object)
_tables = st.none() | st.dictionaries(st.text(min_size=1, max_size=10), _values, max_size=4)


def pamqp_properties(kwargs: dict[str, Any]) -> bytes | type[Exception]:
    """What pamqp makes of these properties: its encoding, or the error it raises."""
    try:
        return Basic.Properties(**kwargs).marshal()
    except amqp.UNENCODABLE as exc:
        return type(exc)


class TestEncoding:
    @given(content_type=st.none() | _short, headers=_tables,
           delivery_mode=st.sampled_from([None, 1, 2, 3]), correlation_id=st.none() | _short,
           message_id=st.text(max_size=300), message_type=st.none() | _short)
    def test_properties_encode_as_pamqp_encodes_them(self, **kwargs: Any) -> None:
        """encode_properties gives pamqp's bytes, and refuses what pamqp refuses."""
        kwargs["message_id"] = kwargs["message_id"] or "m"  # the publisher always sets one
        expected = pamqp_properties(kwargs)
        if isinstance(expected, bytes):
            assert amqp.encode_properties(**kwargs) == expected
        else:
            with pytest.raises(amqp.UNENCODABLE):
                amqp.encode_properties(**kwargs)

    @given(exchange=st.sampled_from(["", "relayd.devices", "relayd.business.acme", "bad name"]),
           routing_key=st.text(max_size=300), mandatory=st.booleans())
    def test_the_publish_method_is_pamqps(self, exchange: str, routing_key: str,
                                          mandatory: bool) -> None:
        """publish_method gives pamqp's method frame payload, and refuses what pamqp or
        aiormq refuse (an exchange name pamqp rejects, a routing key over 255)."""
        try:
            frame = Basic.Publish(exchange=exchange, routing_key=routing_key,
                                  mandatory=mandatory)
            marshalled = pamqp.frame.marshal(frame, 1)
            assert len(routing_key) <= 255
        except (TypeError, ValueError, AssertionError):
            with pytest.raises((TypeError, ValueError)):
                amqp.publish_method(exchange, routing_key, mandatory)
            return
        assert amqp.publish_method(exchange, routing_key, mandatory) == marshalled[7:-1]


class FakeChannel:
    """The part of an aiormq.Channel an Outlet uses: its write queue is the connection's."""

    def __init__(self, queue_size: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.number = 3
        self.write_queue: asyncio.Queue[ChannelFrame] = asyncio.Queue(queue_size)
        self.confirmations: dict[int, asyncio.Future[object]] = {}
        self.message_id_delivery_tag: dict[str, int] = {}
        self.max_content_size = 10
        self.delivery_tag = 0
        self._close_exception: BaseException | None = None
        self._Channel__close_event = asyncio.Event()  # aiormq's, set once a close began
        self._closing = self.loop.create_future()
        self.closing = self._closing

    @property
    def is_closed(self) -> bool:
        return self._closing.done()


def written(frames: list[ChannelFrame]) -> list[tuple[str, int, Any]]:
    """The frames in these ChannelFrames' payloads, decoded by pamqp."""
    out: list[tuple[str, int, Any]] = []
    for frame in frames:
        data = frame.payload
        while data:
            used, channel, decoded = pamqp.frame.unmarshal(data)
            data = data[used:]
            if isinstance(decoded, Basic.Publish):
                out.append(("publish", channel, decoded.routing_key))
            elif isinstance(decoded, ContentHeader):
                out.append(("header", channel, decoded.properties.message_id))
            else:
                assert isinstance(decoded, ContentBody)
                out.append(("body", channel, decoded.value))
    return out


def publish(outlet: amqp.Outlet, key: str, body: bytes) -> Any:
    return outlet.publish(amqp.publish_method("", key, True), amqp.encode_properties(
        content_type=None, headers=None, delivery_mode=2, correlation_id=None,
        message_id=key, message_type=None), body, key)


class TestOutlet:
    async def test_one_turns_publishes_go_out_together_in_order(self) -> None:
        """The publishes of one turn are one ChannelFrame; their frames, split at the
        frame size, in publish order; their delivery tags count them in that order."""
        channel = FakeChannel(10)
        outlet = amqp.Outlet(cast(aiormq.Channel, channel))
        confirmed = [publish(outlet, f"k{i}", body) for i, body in
                     enumerate([b"", b"short", b"x" * 25])]
        await asyncio.sleep(0)
        assert channel.write_queue.qsize() == 1
        assert written([channel.write_queue.get_nowait()]) == [
            ("publish", 3, "k0"), ("header", 3, "k0"),
            ("publish", 3, "k1"), ("header", 3, "k1"), ("body", 3, b"short"),
            ("publish", 3, "k2"), ("header", 3, "k2"),
            ("body", 3, b"x" * 10), ("body", 3, b"x" * 10), ("body", 3, b"x" * 5)]
        assert channel.message_id_delivery_tag == {"k0": 1, "k1": 2, "k2": 3}
        for tag in (1, 2, 3):
            channel.confirmations.pop(tag).set_result(Basic.Ack(delivery_tag=tag))
        assert [cast(Basic.Ack, await c).delivery_tag for c in confirmed] == [1, 2, 3]
        assert channel.message_id_delivery_tag == {}  # forgotten once confirmed

    async def test_a_full_write_queue_keeps_the_order(self) -> None:
        """While the write queue is full, later turns' publishes wait behind the earlier
        ones and reach it in the order their tags were counted."""
        channel = FakeChannel(1)
        channel.write_queue.put_nowait(ChannelFrame(payload=b"", should_close=False))
        outlet = amqp.Outlet(cast(aiormq.Channel, channel))
        keys, waiting = [], []
        for turn in range(3):
            for i in range(2):
                keys.append(f"t{turn}-{i}")
                waiting.append(asyncio.ensure_future(publish(outlet, keys[-1], b"b")))
            await asyncio.sleep(0)
        taken = [channel.write_queue.get_nowait()]  # the filler
        while len(taken) < 4:
            taken.append(await asyncio.wait_for(channel.write_queue.get(), 1))
        order = [key for kind, _, key in written(taken[1:]) if kind == "publish"]
        assert order == keys
        assert [channel.message_id_delivery_tag[k] for k in keys] == list(range(1, 7))
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    async def test_a_backlog_never_follows_the_close_ok(self) -> None:
        """A backlog waiting for room in the write queue: the writer takes a frame and,
        in the same turn, the broker's channel.close comes in and aiormq queues its
        close-ok. The backlog then writes nothing after it (the broker would close the
        whole connection)."""
        channel = FakeChannel(2)
        for _ in range(2):
            channel.write_queue.put_nowait(ChannelFrame(payload=b"", should_close=False))
        outlet = amqp.Outlet(cast(aiormq.Channel, channel))
        waiting = asyncio.ensure_future(publish(outlet, "after", b"b"))
        await asyncio.sleep(0.01)  # flushed into the backlog, which waits for room
        channel.write_queue.get_nowait()  # the writer takes one frame; in the same turn:
        channel._close_exception = aiormq.exceptions.ChannelNotFoundEntity("gone")
        channel.write_queue.put_nowait(ChannelFrame(payload=b"CLOSE-OK", should_close=False))
        channel._Channel__close_event.set()
        out = []
        for _ in range(5):
            await asyncio.sleep(amqp.DRAIN_POLL_S)
            while not channel.write_queue.empty():
                out.append(channel.write_queue.get_nowait().payload)
        assert out == [b"", b"CLOSE-OK"]
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)

    async def test_a_close_relayd_began_stops_the_writes(self) -> None:
        """aiormq sends channel.close itself when an RPC on the channel was cancelled:
        from then on the outlet counts as closed and a flush writes nothing."""
        channel = FakeChannel(10)
        outlet = amqp.Outlet(cast(aiormq.Channel, channel))
        waiting = asyncio.ensure_future(publish(outlet, "k", b"b"))
        channel._Channel__close_event.set()
        assert outlet.closed
        await asyncio.sleep(0.01)
        assert channel.write_queue.empty()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)

    async def test_closing_fails_every_open_confirm_and_writes_nothing_more(self) -> None:
        """When the channel closes, every publish still waiting raises the reason, and
        what was not in the write queue yet never is."""
        channel = FakeChannel(1)
        channel.write_queue.put_nowait(ChannelFrame(payload=b"", should_close=False))
        outlet = amqp.Outlet(cast(aiormq.Channel, channel))
        waiting = [asyncio.ensure_future(publish(outlet, f"k{i}", b"b")) for i in range(3)]
        await asyncio.sleep(0)
        reason = aiormq.exceptions.ChannelNotFoundEntity("no exchange")
        channel._closing.set_exception(reason)
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 1)
        assert results == [reason] * 3
        channel.write_queue.get_nowait()  # the filler: room for the backlog, were it kept
        await asyncio.sleep(0)
        assert channel.write_queue.empty()


class TestAiormqPins:
    def test_aiormq_is_the_version_the_outlet_was_checked_against(self) -> None:
        """relayd.amqp's Outlet and consume() use aiormq's channel internals (see the
        comment above amqp.publish_method). On another aiormq version, read its Channel
        (basic_publish, _reader, _on_deliver_frame, _on_confirm_frame, _on_return_frame)
        again, run tests/integration/test_publisher.py, then add the version here."""
        assert importlib.metadata.version("aiormq") in {"7.2.4"}
        assert {f.name for f in dataclasses.fields(ChannelFrame)} == {
            "payload", "should_close", "drain_future"}
        for method in ("_on_deliver_frame", "_get_frame", "_read_content"):
            assert callable(getattr(aiormq.Channel, method))
        # Outlet.closed reads the close event aiormq sets when a close begins, either side
        assert "self.__close_event: asyncio.Event" in inspect.getsource(aiormq.Channel)
        assert amqp._CLOSE_EVENT == "_Channel__close_event"
