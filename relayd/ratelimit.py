"""Token buckets: how fast one business or one device may send, with room for bursts.

Pure: no I/O, and the clock is injected. The buckets live in one worker process, so when
N processes consume the same queue a sender can reach up to N times the configured rate.

A message can be judged at the time it is handled (a business reply) or at the time its
sender says it sent it (a device's signed `ts`). The second keeps a backlog whole: after
an outage, messages sent within the rate are still within it however fast the backlog
drains. A bucket's time follows how far the sender's clock moved on, never back, and
never past the relay's clock by more than the skew it accepts: so a clock set back costs
an honest sender nothing, and docs/protocol.md (Rate limits) says what a device that lies
about `ts` can gain.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """Holds up to `burst` tokens and gains `rate` per second of its own time; each
    message takes one.

    Its time (`stamp`) moves on as far as the sender's clock moved on since the sender's
    previous message (`last`), never back, and never past the `until` the caller allows. A
    sender's clock set back gains nothing at that step, and costs nothing after it.
    """

    __slots__ = ("burst", "last", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = self.last = now

    def _refill(self, now: float, until: float) -> None:
        step = min(max(0.0, now - self.last), max(0.0, until - self.stamp))
        self.tokens = min(self.burst, self.tokens + step * self.rate)
        self.stamp += step
        self.last = now

    def take(self, now: float, until: float = math.inf) -> bool:
        """Take one token if there is one; False means over the limit. A time earlier
        than the previous one refills nothing."""
        self._refill(now, until)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def full(self, now: float) -> bool:
        """Refilled to the brim by `now`, and its time not past it: from `now` on, a
        fresh bucket would allow no less."""
        return self.stamp <= now and self.tokens + (now - self.stamp) * self.rate >= self.burst


class RateLimiter:
    """One bucket per key (a business or a device id), in least-recently-used order.

    `allow(key, at)` judges a message at time `at` on the clock's scale, when given (the
    time its sender sent it), else at the clock's now. Such times may lag the clock by up
    to `horizon_s` (limits.max_age_seconds) and lead it by up to `skew_s`
    (limits.clock_skew_seconds): others are refused before they get here. A bucket's time
    never passes the clock's now + `skew_s`, so that a sender whose `at` goes back and
    forth gains no more than one that only moves on. A key's bucket is forgotten once it
    is full at the oldest time a message may still carry (a fresh one allows no less, and
    gains no more than the window bound); beyond `max_keys` live buckets the least
    recently used one is forgotten anyway, to bound memory.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000, horizon_s: float = 0.0, skew_s: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.horizon_s = horizon_s
        self.skew_s = skew_s
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, at: float | None = None) -> bool:
        """Count one message from `key`, sent at `at` (default: now); False if it is over
        its limit."""
        now = self._clock()
        when = now if at is None else at
        bucket = self._buckets.get(key)
        if bucket is None:
            self._forget(now - self.horizon_s)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, when)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(when, now + self.skew_s)

    def _forget(self, oldest: float) -> None:
        while self._buckets:
            first = next(iter(self._buckets.values()))
            if len(self._buckets) < self.max_keys and not first.full(oldest):
                return
            self._buckets.popitem(last=False)
