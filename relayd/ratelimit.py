"""Token buckets: how fast one business or one device may send, with room for bursts.

Pure: no I/O, and the clock is injected. The buckets live in one worker process, so when
N processes consume the same queue a sender can reach up to N times the configured rate.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """Holds up to `burst` tokens and gains `rate` per second; each message takes one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def take(self, now: float) -> bool:
        """Take one token if there is one; False means over the limit."""
        self._refill(now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def full(self, now: float) -> bool:
        """Refilled to the brim by `now`: a fresh bucket would behave the same."""
        return self.tokens + max(0.0, now - self.stamp) * self.rate >= self.burst


class RateLimiter:
    """One bucket per key (a business or a device id), in least-recently-used order.

    A key's bucket is forgotten once it has refilled, which changes nothing; beyond
    `max_keys` live buckets the least recently used one is forgotten anyway, to bound memory.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str) -> bool:
        """Count one message from `key`; False if it is over its limit."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._forget(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def _forget(self, now: float) -> None:
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if len(self._buckets) < self.max_keys and not oldest.full(now):
                return
            self._buckets.popitem(last=False)
