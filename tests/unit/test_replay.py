"""The per-device replay window (relayd.replay.ReplayWindow)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.replay import ReplayWindow
from tests.unit.helpers import FAST

SIZE = 64


class TestReplayWindow:
    def test_first_seq_accepted_then_replay_rejected(self) -> None:
        """A seq is accepted the first time and rejected every time after."""
        window = ReplayWindow(SIZE)
        assert window.accept(1)
        assert not window.accept(1)
        assert not window.accept(1)

    @pytest.mark.parametrize("seq", [0, -1, -(2**70)])
    def test_seq_below_one_rejected(self, seq: int) -> None:
        """A seq below 1 is never accepted, even by an empty window."""
        window = ReplayWindow(SIZE)
        assert not window.accept(seq)
        assert window.high == 0

    def test_reordered_seqs_accepted_once_each(self) -> None:
        """Seqs arriving out of order inside the window are each accepted once."""
        window = ReplayWindow(SIZE)
        assert [window.accept(s) for s in (5, 3, 4, 1, 2)] == [True] * 5
        assert [window.accept(s) for s in (1, 2, 3, 4, 5)] == [False] * 5

    def test_seq_size_minus_one_below_high_accepted_once(self) -> None:
        """The oldest seq still in the window (high - (size - 1)) is accepted exactly once."""
        window = ReplayWindow(SIZE)
        high = 1000
        assert window.accept(high)
        assert window.accept(high - (SIZE - 1))
        assert not window.accept(high - (SIZE - 1))

    def test_seq_size_below_high_rejected(self) -> None:
        """A seq exactly `size` below high is outside the window and rejected unseen."""
        window = ReplayWindow(SIZE)
        high = 1000
        assert window.accept(high)
        assert not window.accept(high - SIZE)
        assert window.seen(high - SIZE)

    def test_advance_by_size_minus_one_keeps_old_seq_remembered(self) -> None:
        """After high moves up by size - 1, the old high is still remembered as seen."""
        window = ReplayWindow(SIZE)
        assert window.accept(10)
        assert window.accept(10 + SIZE - 1)
        assert not window.accept(10)
        assert window.accept(11)

    def test_big_jump_clears_bitmap(self) -> None:
        """A jump of size or more forgets every bit; old seqs then fall out of the window."""
        window = ReplayWindow(SIZE)
        for seq in range(1, 11):
            assert window.accept(seq)
        assert window.accept(10 + SIZE)
        assert window.bits == 1
        assert window.high == 10 + SIZE
        assert not window.accept(10)  # now exactly `size` below high: too old
        assert window.accept(11)  # size - 1 below high: inside, never seen by this window

    def test_seen_reports_accepted_and_too_old(self) -> None:
        """seen() is true for accepted and too-old seqs, false for unseen ones in the window."""
        window = ReplayWindow(SIZE)
        window.accept(100)
        window.accept(98)
        assert window.seen(100)
        assert window.seen(98)
        assert not window.seen(99)
        assert not window.seen(101)
        assert window.seen(100 - SIZE)
        assert not window.seen(0)

    def test_persisted_form_round_trip_preserves_behaviour(self) -> None:
        """A window rebuilt from (size, high, to_bytes()) accepts and rejects as the original."""
        window = ReplayWindow(SIZE)
        for seq in (200, 150, 199, 137, 180):
            window.accept(seq)
        restored = ReplayWindow.from_bytes(SIZE, window.high, window.to_bytes())
        assert restored == window
        assert len(window.to_bytes()) == SIZE // 8
        probes = [200, 199, 198, 150, 137, 136, 180, 181, 201, 200 - SIZE, 265, 202]
        assert [restored.accept(s) for s in probes] == [window.accept(s) for s in probes]

    def test_from_bytes_ignores_bits_beyond_size(self) -> None:
        """Persisted bytes with bits above `size` do not mark seqs outside the window."""
        restored = ReplayWindow.from_bytes(8, 100, b"\x01\xff")
        assert restored.bits == 1
        assert not restored.accept(100)
        assert restored.accept(99)

    @FAST
    @given(size=st.sampled_from([64, 65, 128]),
           seqs=st.lists(st.integers(-2, 400), max_size=200),
           restore_at=st.integers(0, 200))
    def test_agrees_with_reference_model(self, size: int, seqs: list[int],
                                         restore_at: int) -> None:
        """accept() matches a set-of-seen model with 'reject if seq <= high - size',
        also across a to_bytes/from_bytes round trip part-way through."""
        window = ReplayWindow(size)
        accepted: set[int] = set()
        high = 0
        for i, seq in enumerate(seqs):
            if i == restore_at:
                window = ReplayWindow.from_bytes(size, window.high, window.to_bytes())
            expected = seq >= 1 and seq not in accepted and seq > high - size
            assert window.accept(seq) == expected, (i, seq)
            if expected:
                accepted.add(seq)
                high = max(high, seq)
            assert window.high == high

    @FAST
    @given(size=st.sampled_from([64, 100]),
           deltas=st.lists(st.integers(-102, 102), max_size=150))
    def test_agrees_with_reference_model_near_the_edges(self, size: int,
                                                        deltas: list[int]) -> None:
        """accept() matches the reference model for seqs drawn around the current high."""
        window = ReplayWindow(size)
        accepted: set[int] = set()
        high = 0
        for delta in deltas:
            seq = high + delta
            expected = seq >= 1 and seq not in accepted and seq > high - size
            assert window.accept(seq) == expected, (high, seq)
            if expected:
                accepted.add(seq)
                high = max(high, seq)
