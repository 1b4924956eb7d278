"""A shard handed back: what started finishes, its acks are written, then the channel
closes (which returns the rest, in order, to the queue)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from relayd import config
from relayd.route import Shards


class Recorder:
    """The consumer, channel and subscription of one held shard, recording their calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float | None]] = []
        self.handing_back = False

    async def drain(self, deadline_s: float) -> int:
        self.calls.append(("drain", deadline_s))
        return 0

    async def flushed(self, deadline_s: float) -> None:
        self.calls.append(("flushed", deadline_s))

    async def close(self) -> None:
        self.calls.append(("close", None))


def shards(tmp_path: Path) -> Shards:
    settings = config.parse({"amqp": {"url": "amqp://relayd@localhost"},
                             "store": {"url": f"sqlite:///{tmp_path}/relayd.db"},
                             "keys": {"dir": str(tmp_path / "keys")},
                             "topology": {"shards": 4}}, environ={})
    return Shards(cast(Any, None), settings, "inbound", cast(Any, None), "m",
                  lambda queue: cast(Any, None), asyncio.Event())


async def test_acks_are_written_before_the_channel_closes(tmp_path: Path) -> None:
    """Closing the channel first would return what was settled but not yet acked on the
    wire to the queue, and the next holder would handle it again."""
    s, r = shards(tmp_path), Recorder()
    await s._release(1, cast(Any, r), cast(Any, r), cast(Any, r), 2.0)
    assert [name for name, _ in r.calls] == ["drain", "flushed", "close"]
    assert r.handing_back
    drain, flushed = r.calls[0][1], r.calls[1][1]
    assert drain is not None
    assert flushed is not None
    assert 0 < flushed <= drain <= 2.0  # one deadline for both


async def test_a_fenced_shard_with_no_lease_left_still_flushes(tmp_path: Path) -> None:
    """With the lease already over, nothing waits, but the calls still come in order."""
    s, r = shards(tmp_path), Recorder()
    await s._release(1, cast(Any, r), cast(Any, r), cast(Any, r), 0.0)
    assert r.calls == [("drain", 0.0), ("flushed", 0.0), ("close", None)]
