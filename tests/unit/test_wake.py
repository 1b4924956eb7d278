"""Push wake's pure parts (relayd.wake): the throttle and the event."""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.wake import Throttle, Waker, event
from tests.unit.helpers import FAST
from tests.unit.test_handlers import settings


class TestThrottle:
    def test_once_per_interval(self) -> None:
        """A device woken at t is not due again before t + interval, and is at it."""
        throttle = Throttle(60.0)
        assert throttle.due("phone", 0.0)
        throttle.woken("phone", 0.0)
        assert not throttle.due("phone", 59.9)
        assert throttle.due("laptop", 59.9)
        assert throttle.due("phone", 60.0)

    @FAST
    @given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]),
                              st.floats(0, 1000, allow_nan=False)), max_size=60))
    def test_never_two_wakes_within_an_interval(self, queued: list[tuple[str, float]]) -> None:
        """Whatever messages come when: the wakes of one device are an interval apart."""
        throttle, wakes = Throttle(10.0), []
        for device, now in sorted(queued, key=lambda q: q[1]):
            if throttle.due(device, now):
                throttle.woken(device, now)
                wakes.append((device, now))
        for device in "abc":
            times = [t for d, t in wakes if d == device]
            assert all(b - a >= 10.0 for a, b in itertools.pairwise(times))
        assert {d for d, _ in queued} == {d for d, _ in wakes}  # each woken at least once

    def test_forget_takes_a_wake_back(self) -> None:
        """A wake counted and then not sent leaves the device due."""
        throttle = Throttle(60.0)
        throttle.woken("phone", 0.0)
        throttle.forget("phone")
        assert throttle.due("phone", 1.0)


def test_the_event_says_who_and_how_many_and_nothing_else() -> None:
    """A wake is the device id and a count."""
    assert orjson.loads(event("alice-phone", 3)) == {"v": 1, "type": "wake",
                                                     "device": "alice-phone", "count": 3}


class Notice:
    """A notice as the decider gets it: it counts its acks."""

    def __init__(self, body: bytes) -> None:
        self.body, self.redelivered, self.acks = body, False, 0

    async def ack(self) -> None:
        self.acks += 1


class TestDecider:
    """Every notice is settled, whatever deciding it raised: one left unacked would hold
    the decider's channel until the broker's consumer timeout closed it."""

    @pytest.mark.parametrize("body", [b"{}", b"[]", b"not json", b'{"device": 1}'])
    async def test_a_notice_it_cannot_read_is_acked(self, tmp_path: Path, body: bytes) -> None:
        waker = Waker(settings(tmp_path), None)  # type: ignore[arg-type]
        notice = Notice(body)
        await waker._decide(notice)  # type: ignore[arg-type]
        assert notice.acks == 1

    async def test_a_probe_that_fails_is_acked(self, tmp_path: Path) -> None:
        waker = Waker(settings(tmp_path), None)  # type: ignore[arg-type]

        async def failing(device: str, queue: str) -> str:
            raise KeyError(device)
        waker._probe = failing  # type: ignore[method-assign]
        notice = Notice(orjson.dumps({"device": "phone", "queue": "q"}))
        await waker._decide(notice)  # type: ignore[arg-type]
        assert notice.acks == 1
        assert waker.throttle.due("phone", waker.clock())  # nothing was sent: due again


def test_a_device_is_forgotten_within_two_intervals() -> None:
    """The throttle keeps no device id much longer than its interval (an erased device's
    id leaves memory)."""
    throttle = Throttle(10.0)
    throttle.woken("gone", 0.0)
    throttle.woken("other", 25.0)
    assert "gone" not in throttle._woken
