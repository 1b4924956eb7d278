"""The per-device sliding window over `seq`: each (device, seq) is accepted once.

The window remembers the highest seq seen and, in a bitmap, which of the `size` seqs
below it were seen. A seq inside the window is accepted once, so moderate reordering is
fine; a seq below the window is rejected as too old, since it can no longer be checked.
Persisted as (high, bitmap bytes): bit i set means seq `high - i` was seen.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ReplayWindow:
    size: int
    high: int = 0
    bits: int = 0

    def accept(self, seq: int) -> bool:
        """Record `seq` and return True, or return False for a replay or a too-old seq."""
        if seq < 1:
            return False
        if seq > self.high:
            shift = seq - self.high
            kept = (self.bits << shift) & ((1 << self.size) - 1) if shift < self.size else 0
            self.bits = kept | 1
            self.high = seq
            return True
        offset = self.high - seq
        if offset >= self.size or self.bits >> offset & 1:
            return False
        self.bits |= 1 << offset
        return True

    def seen(self, seq: int) -> bool:
        """True if `seq` was accepted, or is too old to tell."""
        offset = self.high - seq
        return seq >= 1 and offset >= 0 and (offset >= self.size or bool(self.bits >> offset & 1))

    def to_bytes(self) -> bytes:
        return self.bits.to_bytes((self.size + 7) // 8, "little")

    @classmethod
    def from_bytes(cls, size: int, high: int, data: bytes) -> ReplayWindow:
        return cls(size, high, int.from_bytes(data, "little") & ((1 << size) - 1))
