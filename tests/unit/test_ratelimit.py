"""Token buckets and the per-key rate limiter (relayd.ratelimit)."""

from __future__ import annotations

from hypothesis import example, given
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


RATE, BURST = 3.0, 60  # limits.device_rate and device_burst's defaults
MAX_AGE, SKEW = 7 * 86400.0, 300.0  # limits.max_age_seconds and clock_skew_seconds


class TestJudgedWhenSent:
    def test_a_backlog_sent_within_the_rate_drains_whole(self) -> None:
        """relayd stopped for 100 s while a device sent at half its rate: drained in one
        go, every message is allowed, because each is judged at its `ts`."""
        clock = Clock()
        limiter = RateLimiter(RATE, BURST, clock=clock, horizon_s=MAX_AGE, skew_s=SKEW)
        sent = [clock.now + i * 2 / RATE for i in range(150)]  # 100 s at half the rate
        clock.now = sent[-1] + 5.0
        assert all(limiter.allow("phone", ts) for ts in sent)

    def test_the_same_backlog_judged_when_drained_loses_messages(self) -> None:
        """What issue 13 saw: judged at drain time, the backlog beyond the burst is
        refused, though the device kept to its rate."""
        clock = Clock()
        limiter = RateLimiter(RATE, BURST, clock=clock)
        allowed = sum(limiter.allow("phone") for _ in range(150))
        assert allowed == BURST

    @FAST
    @given(gaps=st.lists(st.floats(1 / RATE, 10.0), max_size=300),
           drains=st.lists(st.floats(0.0, 30.0), max_size=300))
    def test_any_drain_schedule_of_an_honest_device(self, gaps: list[float],
                                                    drains: list[float]) -> None:
        """A device whose messages are at least 1/rate apart by `ts` loses none, however
        late and however bunched up relayd handles them (in order, within max_age)."""
        clock = Clock()
        limiter = RateLimiter(RATE, BURST, clock=clock, horizon_s=MAX_AGE, skew_s=SKEW)
        ts = clock.now
        for i, gap in enumerate(gaps):
            ts += gap
            clock.now = max(clock.now + (drains[i] if i < len(drains) else 0.0), ts - SKEW)
            assert limiter.allow("phone", ts)

    def test_a_flooder_is_still_refused(self) -> None:
        """Messages sent faster than the rate are refused beyond the burst, by `ts` too."""
        clock = Clock()
        limiter = RateLimiter(RATE, BURST, clock=clock, horizon_s=MAX_AGE, skew_s=SKEW)
        allowed = sum(limiter.allow("flood", clock.now + i / 100) for i in range(1000))
        assert allowed <= BURST + RATE * 10 + 1

    def test_a_quiet_device_keeps_its_bucket_for_the_horizon(self) -> None:
        """A bucket that refilled in real time is kept until no acceptable `ts` could find
        it short: otherwise a device could start afresh with an old `ts`."""
        clock = Clock()
        limiter = RateLimiter(RATE, BURST, clock=clock, horizon_s=MAX_AGE, skew_s=SKEW)
        start = clock.now
        assert all(limiter.allow("liar", start) for _ in range(BURST))
        assert not limiter.allow("liar", start)
        clock.now += 3600.0  # full again in real time, not at the oldest acceptable ts
        limiter.allow("other")
        assert len(limiter) == 2
        clock.now += MAX_AGE  # now full even at the oldest acceptable ts: forgotten
        limiter.allow("another")
        assert len(limiter) == 2  # "other" (still short a token) and "another"


class TestClockCorrected:
    @FAST
    @given(ahead=st.floats(0.0, SKEW), count=st.integers(1, 600))
    @example(ahead=SKEW, count=450)
    def test_a_device_whose_clock_is_corrected_loses_nothing(self, ahead: float,
                                                             count: int) -> None:
        """A device whose clock ran up to the skew ahead, then was set right, and which
        then sends at half its rate, in real time: every message is allowed."""
        clock = Clock()
        limiter = RateLimiter(RATE, BURST, clock=clock, horizon_s=MAX_AGE, skew_s=SKEW)
        assert limiter.allow("phone", clock.now + ahead)  # before the correction
        for _ in range(count):
            clock.now += 2 / RATE
            assert limiter.allow("phone", clock.now)

    @FAST
    @given(sends=st.lists(st.tuples(st.floats(1 / RATE, 10.0), st.floats(0.0, 30.0)),
                          max_size=300),
           stall=st.tuples(st.integers(0, 300), st.floats(0.0, 3600.0)),
           steps=st.lists(st.tuples(st.integers(0, 300), st.floats(-SKEW, SKEW)),
                          max_size=BURST - 1))
    @example(sends=[(2 / RATE, 0.0)] * 300, stall=(150, 100.0), steps=[(1, SKEW), (2, 0.0)])
    def test_clock_steps_and_a_backlog_together(
            self, sends: list[tuple[float, float]], stall: tuple[int, float],
            steps: list[tuple[int, float]]) -> None:
        """A device that sends at most at its rate in real time, whose clock is set to
        anything within the skew, back or forward, fewer times than its burst, and whose
        messages relayd handles in order on any schedule, an outage included, loses none:
        judged by `ts`, a backlog still drains whole after its clock was set back."""
        clock = Clock()
        limiter = RateLimiter(RATE, BURST, clock=clock, horizon_s=MAX_AGE, skew_s=SKEW)
        offsets, sent, offset = dict(steps), clock.now, 0.0
        for i, (gap, drain) in enumerate(sends):
            sent += gap  # the real time the device sent message i
            offset = offsets.get(i, offset)  # its clock, set at message i
            clock.now = max(clock.now + drain + (stall[1] if i == stall[0] else 0.0), sent)
            assert limiter.allow("phone", sent + offset), i


class TestLyingDevice:
    """A device that picks any `ts` the freshness rules accept, [now - max_age, now +
    skew]. A small max_age here, so that the window is crossed many times."""

    AGE, AHEAD = 60.0, 5.0

    def test_cannot_buy_the_window_twice_by_waiting(self) -> None:
        """The reset attack: walk `ts` up from the oldest acceptable time to the latest
        (the window's gain, once), wait until the bucket is full in real time and let other
        traffic make the limiter forget, then walk up from the oldest time again: refused."""
        clock = Clock()
        limiter = RateLimiter(RATE, BURST, clock=clock, horizon_s=self.AGE, skew_s=self.AHEAD)

        def walk() -> int:
            start = clock.now - self.AGE
            return sum(limiter.allow("liar", start + i / RATE)
                       for i in range(int((self.AGE + self.AHEAD) * RATE)))

        assert walk() == int((self.AGE + self.AHEAD) * RATE)
        clock.now += BURST / RATE  # full again, in real time
        limiter.allow("other")
        assert walk() <= BURST + RATE * BURST / RATE  # what waiting earned, no more

    @FAST
    @given(steps=st.lists(st.tuples(st.floats(0.0, 100.0), st.integers(0, 40),
                                    st.floats(0.0, 1.0)), max_size=80),
           others=st.booleans())
    def test_gains_at_most_the_freshness_window(
            self, steps: list[tuple[float, int, float]], others: bool) -> None:
        """However it orders its lies, it gets at most burst + rate x (elapsed + max_age +
        skew) messages through, while other devices' traffic makes the limiter forget
        buckets."""
        clock = Clock()
        start = clock.now
        limiter = RateLimiter(RATE, BURST, clock=clock, horizon_s=self.AGE, skew_s=self.AHEAD)
        allowed = 0
        for advance, count, where in steps:
            clock.now += advance
            low, high = clock.now - self.AGE, clock.now + self.AHEAD
            for i in range(count):
                lie = low + (high - low) * ((where + i * 0.37) % 1.0)
                allowed += limiter.allow("liar", lie)
            if others:
                limiter.allow(f"other-{advance}", clock.now)
        elapsed = clock.now - start
        assert allowed <= BURST + RATE * (elapsed + self.AGE + self.AHEAD) + 1e-6
