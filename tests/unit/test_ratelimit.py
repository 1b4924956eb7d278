"""Token buckets and the per-key rate limiter (relayd.ratelimit)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relayd.ratelimit import RateLimiter, TokenBucket
from tests.unit.helpers import FAST


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestTokenBucket:
    def test_burst_then_refused(self) -> None:
        """A fresh bucket lets exactly `burst` messages through at once, then refuses."""
        bucket = TokenBucket(rate=1.0, burst=3, now=0.0)
        assert [bucket.take(0.0) for _ in range(5)] == [True, True, True, False, False]

    def test_refills_at_rate(self) -> None:
        """An empty bucket gains `rate` tokens per second: half a second at 4/s is two."""
        bucket = TokenBucket(rate=4.0, burst=2, now=0.0)
        assert [bucket.take(0.0), bucket.take(0.0)] == [True, True]
        assert not bucket.take(0.1)
        assert [bucket.take(0.6) for _ in range(3)] == [True, True, False]

    def test_refill_capped_at_burst(self) -> None:
        """However long it was idle, a bucket holds no more than `burst` tokens."""
        bucket = TokenBucket(rate=10.0, burst=2, now=0.0)
        assert [bucket.take(3600.0) for _ in range(3)] == [True, True, False]

    def test_clock_going_back_adds_nothing(self) -> None:
        """An earlier timestamp than the last one neither refills nor breaks the bucket."""
        bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
        assert bucket.take(10.0)
        assert not bucket.take(5.0)
        assert bucket.take(11.0)

    @FAST
    @given(rate=st.floats(0.01, 100), burst=st.integers(1, 50),
           steps=st.lists(st.floats(0, 5), max_size=200))
    def test_never_more_than_burst_plus_rate_times_elapsed(
            self, rate: float, burst: int, steps: list[float]) -> None:
        """Over any run, the messages let through are at most burst + rate x elapsed."""
        bucket, now, allowed = TokenBucket(rate, burst, 0.0), 0.0, 0
        for step in steps:
            now += step
            allowed += bucket.take(now)
        assert allowed <= burst + rate * now + 1e-6


class TestRateLimiter:
    def test_keys_have_separate_buckets(self) -> None:
        """One key using up its burst leaves another key's untouched."""
        clock = Clock()
        limiter = RateLimiter(rate=0.5, burst=2, clock=clock)
        assert [limiter.allow("flood") for _ in range(4)] == [True, True, False, False]
        assert [limiter.allow("calm") for _ in range(2)] == [True, True]

    def test_uses_injected_clock(self) -> None:
        """Moving the injected clock refills the bucket; nothing else does."""
        clock = Clock()
        limiter = RateLimiter(rate=1.0, burst=1, clock=clock)
        assert limiter.allow("k")
        assert not limiter.allow("k")
        clock.now += 1.0
        assert limiter.allow("k")

    def test_refilled_buckets_are_forgotten(self) -> None:
        """A bucket that has refilled is dropped when a new key arrives: memory stays small."""
        clock = Clock()
        limiter = RateLimiter(rate=1.0, burst=2, clock=clock)
        for key in ("a", "b", "c"):
            limiter.allow(key)
        clock.now += 5.0
        limiter.allow("d")
        assert len(limiter) == 1

    def test_empty_buckets_are_kept(self) -> None:
        """A bucket still short of tokens is kept, so a flooder cannot reset it."""
        clock = Clock()
        limiter = RateLimiter(rate=0.001, burst=1, clock=clock)
        assert limiter.allow("flood")
        assert limiter.allow("other")
        assert not limiter.allow("flood")
        assert len(limiter) == 2

    def test_bounded_number_of_keys(self) -> None:
        """Beyond max_keys live buckets the least recently used is forgotten."""
        clock = Clock()
        limiter = RateLimiter(rate=0.001, burst=1, clock=clock, max_keys=3)
        for key in ("a", "b", "c", "d", "e"):
            assert limiter.allow(key)
        assert len(limiter) == 3
        assert not limiter.allow("e")
