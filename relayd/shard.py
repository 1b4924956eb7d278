"""Ordered scale-out: each direction split into `topology.shards` queues, one consumer each.

With one shard (the default) the relay consumes the contract's queues directly. With N,
those queues become entry queues: one router per direction (an exclusive consumer, held by
one relayd process, taken over by another when it dies) reads them in order and forwards
each message, untouched, to shard queue `<queue>.<k>` with k = hash(lane) % N, acking
only once the broker confirmed the copy. The lane is the device going in (the router opens
the envelope to learn it) and the conversation going out. Each shard queue has a single
active consumer (x-single-active-consumer), so one lane is handled by one process at a
time, in order, even while two processes briefly both believe a shard is theirs.

The shards are shared out by relayd, not by the broker: every process of a role marks
itself alive in the store every `topology.shard_member_ttl / 3` seconds and consumes its
share (see share()) of the shards among the members alive. A process that stops leaves
at once; one that dies is forgotten after `shard_member_ttl`, and its shards move to the
others. docs/scaling.md weighs this against the alternatives.

This module holds the pure part (which shard, which queue, what a forwarded message
says); relayd.route runs the routers and consumes the shards.
"""

from __future__ import annotations

import functools
import hashlib

from relayd.amqp import FORWARDED_USER_HEADER, Delivery
from relayd.config import Topology

USER_HEADER = FORWARDED_USER_HEADER  # the broker-validated user_id of a forwarded reply
ROUTING_KEY_HEADER = "x-relayd-routing-key"  # the routing key it was published with
REDELIVERED_HEADER = "x-relayd-redelivered"  # the router got it redelivered: maybe a retry


def shard_of(lane: str, shards: int) -> int:
    """The shard of a lane, the same in every process and on every host."""
    return int.from_bytes(hashlib.blake2b(lane.encode(), digest_size=8).digest(), "big") % shards


def device_lane(device: str) -> str:
    """What a device's inbound messages are sharded by: the device (a worker's lanes
    within the shard are finer: relayd.inbound.lane)."""
    return "d:" + device


def device_shard(t: Topology, device: str) -> str:
    """The inbound shard queue of `device`'s messages: where the router forwards them, and
    where the edge publishes those of the device it logged in (topology.shards > 1)."""
    return shard_queue(t, "inbound", shard_of(device_lane(device), t.shards))


def entry_queue(t: Topology, role: str) -> str:
    return {"inbound": t.inbound_queue, "outbound": t.outbound_queue,
            "gdpr": t.gdpr_queue}[role]


def sharded(t: Topology, role: str) -> bool:
    """Whether `role`'s queue is split (erase requests never are: they are rare)."""
    return t.shards > 1 and role in ("inbound", "outbound")


def shard_queue(t: Topology, role: str, k: int) -> str:
    return f"{entry_queue(t, role)}.{k}"


def share(members: list[str], member: str, shards: int) -> set[int]:
    """The shards `member` consumes, out of `deal(members + [member], shards)`."""
    ranked = tuple(sorted(set(members) | {member}))
    return {k for k, owner in enumerate(deal(ranked, shards)) if owner == member}


@functools.lru_cache(maxsize=8)
def deal(members: tuple[str, ...], shards: int) -> tuple[str, ...]:
    """The owner of each shard: rendezvous hashing with bounded loads.

    Every (member, shard) pair has a weight, a hash of both. Taking the pairs from the
    heaviest down, a shard goes to the member of its pair unless that member is full:
    every member gets shards // n, and the first shards % n to fill up one more. So no
    member holds more than one shard more than another, and since a shard's weights do
    not depend on who else is alive, a member that joins or leaves moves few shards
    besides its own share (about 1.4 times that share on average: tests/unit/test_shard.py),
    where dealing round the sorted names moved nearly all of them.
    Every process seeing the same members makes the same deal.
    """
    floor, extra = divmod(shards, len(members))
    load = dict.fromkeys(members, 0)
    owner: dict[int, str] = {}
    for _, k, m in sorted(((_weight(m, k), k, m) for k in range(shards) for m in members),
                          reverse=True):
        if k in owner or load[m] > floor or (load[m] == floor and not extra):
            continue
        if load[m] == floor:
            extra -= 1
        owner[k] = m
        load[m] += 1
    return tuple(owner[k] for k in range(shards))


def _weight(member: str, k: int) -> int:
    digest = hashlib.blake2b(f"{member}\0{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _forwarded(message: Delivery, t: Topology) -> bool:
    """True if the router put this message in its shard: only then are its headers ours."""
    return t.shards > 1 and message.exchange == t.shard_exchange


def origin(message: Delivery, t: Topology) -> tuple[str | None, str]:
    """The (user_id, routing key) a business published a reply with."""
    if _forwarded(message, t):
        headers = message.headers or {}
        user, key = headers.get(USER_HEADER), headers.get(ROUTING_KEY_HEADER)
        return (user if isinstance(user, str) else None), (key if isinstance(key, str) else "")
    return message.user_id, message.routing_key or ""


def redelivered(message: Delivery, t: Topology) -> bool:
    """True if this delivery may repeat one handled before (here or before the router)."""
    return bool(message.redelivered) or (
        _forwarded(message, t) and bool((message.headers or {}).get(REDELIVERED_HEADER)))
