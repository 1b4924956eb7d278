"""Which shard a lane belongs to, and which queues a worker consumes."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd import shard, topology
from relayd.config import Topology


class TestShardOf:
    @given(st.text(min_size=1, max_size=64), st.integers(min_value=1, max_value=1024))
    def test_in_range_and_stable(self, lane: str, shards: int) -> None:
        """A lane always maps to the same shard, inside 0..shards-1."""
        k = shard.shard_of(lane, shards)
        assert 0 <= k < shards
        assert shard.shard_of(lane, shards) == k

    def test_spreads_devices_evenly(self) -> None:
        """10,000 device lanes over 8 shards: no shard gets more than 10 % above its share."""
        counts = Counter(shard.shard_of(f"d:device-{i}", 8) for i in range(10_000))
        assert len(counts) == 8
        assert max(counts.values()) < 1.1 * 10_000 / 8

    @given(st.text(max_size=64), st.integers(min_value=2, max_value=1024))
    def test_the_edge_picks_the_routers_shard(self, device: str, shards: int) -> None:
        """The edge's queue for a device (device_shard) is the one the router forwards
        the device's lane to."""
        t = Topology(shards=shards)
        assert shard.device_shard(t, device) == shard.shard_queue(
            t, "inbound", shard.shard_of(shard.device_lane(device), shards))

    def test_a_devices_shard_never_changes_across_versions(self) -> None:
        """Pinned: an edge and a router of different relayd versions must agree during an
        upgrade, so the hash and the lane's form are part of the wire behaviour."""
        t = Topology(shards=16)
        assert [shard.device_shard(t, d) for d in ("phone", "dev-0", "laptop")] == [
            "relayd.inbound.12", "relayd.inbound.6", "relayd.inbound.2"]


class TestQueues:
    def test_one_shard_is_the_contract_queue(self) -> None:
        """By default a worker consumes the contract's own queue, as before sharding."""
        t = Topology()
        assert not shard.sharded(t, "inbound")
        assert not shard.sharded(t, "outbound")
        assert shard.entry_queue(t, "inbound") == "relayd.inbound"
        assert shard.entry_queue(t, "outbound") == "relayd.outbound"
        assert topology.shards(t) == []

    def test_shards_have_one_active_consumer_each(self) -> None:
        """With N shards each direction has N single-active-consumer queues, bound to the
        shard exchange by their own name."""
        t = Topology(shards=3)
        assert shard.sharded(t, "inbound")
        assert [shard.shard_queue(t, "inbound", k) for k in range(3)] == [
            f"relayd.inbound.{k}" for k in range(3)]
        specs = topology.shards(t)
        queues = [s for s in specs if isinstance(s, topology.Queue)]
        assert len(queues) == 6
        assert all(q.arguments["x-single-active-consumer"] for q in queues)
        bindings = {(b.queue, b.exchange, b.routing_key) for b in specs
                    if isinstance(b, topology.Binding)}
        assert ("relayd.outbound.2", "relayd.shards", "relayd.outbound.2") in bindings


class TestShare:
    @given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=12, unique=True),
           st.integers(min_value=1, max_value=64))
    def test_every_shard_once_evenly(self, members: list[str], shards: int) -> None:
        """Members seeing the same list, in any order, hold every shard exactly once
        between them, and no member holds more than one shard more than another."""
        shares = [shard.share(members[::-1], m, shards) for m in members]
        assert sorted(k for s in shares for k in s) == list(range(shards))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1

    def test_a_member_the_store_has_not_listed_yet_counts_itself(self) -> None:
        """A process always counts itself, even in a member list that lacks it."""
        assert shard.share([], "a", 3) == {0, 1, 2}
        assert len(shard.share(["b"], "a", 4)) == 2
        assert shard.share(["b"], "a", 4) == shard.share(["a", "b"], "a", 4)

    @given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=16, unique=True),
           st.text(min_size=1, max_size=8), st.integers(min_value=1, max_value=256))
    def test_a_join_moves_few_shards(self, members: list[str], newcomer: str,
                                     shards: int) -> None:
        """A member that joins takes its share, and moves at most a few times its share
        between the others (dealing round the sorted names moved nearly all)."""
        if newcomer in members:
            return
        before = shard.deal(tuple(sorted(members)), shards)
        after = shard.deal(tuple(sorted([*members, newcomer])), shards)
        moved = sum(a != b for a, b in zip(before, after, strict=True))
        assert after.count(newcomer) in (shards // (len(members) + 1),
                                         -(-shards // (len(members) + 1)))
        assert moved <= 4 * -(-shards // (len(members) + 1))

    @pytest.mark.parametrize(("n", "shards"), [(2, 4), (3, 12), (4, 16), (10, 64),
                                               (16, 256)])
    def test_join_and_leave_move_about_one_nth(self, n: int, shards: int) -> None:
        """Over 50 sets of member names like relayd's, a join or a leave moves on average
        less than twice the share of the member that comes or goes, where dealing round
        the sorted names moved nearly every shard (58 and 64 of 64 with 10 members)."""
        rng = random.Random(f"{n}/{shards}")
        joins, leaves = [], []
        for _ in range(50):
            names = [f"relay-{rng.randrange(100)}:{rng.randrange(1, 99_999)}:inbound-{i}"
                     for i in range(n)]
            before = shard.deal(tuple(sorted(names)), shards)
            joined = shard.deal(tuple(sorted([*names, "relay-new:1:inbound-0"])), shards)
            left = shard.deal(tuple(sorted(names[1:])), shards)
            joins.append(sum(a != b for a, b in zip(before, joined, strict=True)))
            leaves.append(sum(a != b for a, b in zip(before, left, strict=True)))
        assert statistics.mean(joins) < 2 * shards / (n + 1)
        assert statistics.mean(leaves) < 2 * shards / n
