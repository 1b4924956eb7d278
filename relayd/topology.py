"""Every exchange, queue and binding relayd uses, declared in one place as data.

Declaring is idempotent: the same names with the same arguments are a no-op on the broker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractChannel, ExchangeType

from relayd.config import Topology
from relayd.opaque import device_token, inbox_token

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Exchange:
    name: str
    kind: ExchangeType


@dataclass(frozen=True, slots=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    exclusive: bool = False  # its declaring connection's alone, gone with it (not durable)


@dataclass(frozen=True, slots=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExchangeBinding:
    """`destination` gets what `source` routes (an exchange-to-exchange binding)."""

    destination: str
    source: str


Spec = Exchange | Queue | Binding | ExchangeBinding


def _work_queue(t: Topology, name: str) -> Queue:
    """inbound/outbound: durable, bounded, dead-lettering to relayd.dead."""
    arguments: dict[str, Any] = {
        "x-queue-type": t.queue_type,
        "x-dead-letter-exchange": t.dead_exchange,
        "x-max-length": t.queue_max_length,
        "x-overflow": "reject-publish",
    }
    if t.queue_type == "quorum":
        arguments["x-delivery-limit"] = t.delivery_limit
        arguments["x-dead-letter-strategy"] = "at-least-once"
    return Queue(name, arguments)


def shards(t: Topology) -> list[Spec]:
    """With topology.shards > 1: the shard queues of each direction, one active consumer
    each, fed by the router through the shard exchange (routing key = queue name)."""
    if t.shards == 1:
        return []
    specs: list[Spec] = [Exchange(t.shard_exchange, ExchangeType.DIRECT)]
    for base in (t.inbound_queue, t.outbound_queue):
        for k in range(t.shards):
            queue = _work_queue(t, f"{base}.{k}")
            queue.arguments["x-single-active-consumer"] = True
            specs += [queue, Binding(queue.name, t.shard_exchange, queue.name)]
    return specs


def core(t: Topology, identity_service: bool = False, push_wake: bool = False) -> list[Spec]:
    """What the relay needs before it consumes; the identity service's requests when one
    is configured (gdpr.identity_user); push wakes when they are on (wake.enabled)."""
    gdpr: list[Spec] = [
        Exchange(t.gdpr_exchange, ExchangeType.FANOUT),
        _work_queue(t, t.gdpr_queue),
        Binding(t.gdpr_queue, t.gdpr_exchange),
    ]
    return [
        Exchange(t.dead_exchange, ExchangeType.FANOUT),
        Queue(t.dead_queue, {"x-queue-type": t.queue_type,
                             "x-message-ttl": int(t.dead_message_ttl_days * DAY_MS),
                             # the oldest goes: refusing would stop the relay's work
                             "x-max-length": t.dead_queue_max_length,
                             "x-max-length-bytes": t.dead_queue_max_bytes,
                             "x-overflow": "drop-head"}),
        Binding(t.dead_queue, t.dead_exchange),
        Exchange(t.ingress_exchange, ExchangeType.DIRECT),
        _work_queue(t, t.inbound_queue),
        Binding(t.inbound_queue, t.ingress_exchange, t.inbound_routing_key),
        Exchange(t.replies_exchange, ExchangeType.TOPIC),
        _work_queue(t, t.outbound_queue),
        Binding(t.outbound_queue, t.replies_exchange, "#"),
        Exchange(t.devices_exchange, ExchangeType.DIRECT),
        *receipts(t),
        *(gdpr if identity_service else []),
        *(wake(t) if push_wake else []),
        *shards(t),
    ]


def receipts(t: Topology) -> list[Spec]:
    """Where receipts of business messages wait for relayd (relayd.receipts): the edge's,
    published to the ingress exchange when a device acknowledged a copy, and the copies
    that expired in a device queue, which the broker dead-letters to relayd.dead and
    relayd.expired picks out by the broker's own x-first-death-reason. No dead-letter
    exchange: a dead-lettered receipt would come back through relayd.dead."""
    arguments: dict[str, Any] = {"x-queue-type": t.queue_type,
                                 "x-max-length": t.queue_max_length,
                                 "x-overflow": "reject-publish"}
    return [
        Exchange(t.expired_exchange, ExchangeType.HEADERS),
        ExchangeBinding(t.expired_exchange, t.dead_exchange),
        Queue(t.receipts_queue, arguments),
        Binding(t.receipts_queue, t.ingress_exchange, t.receipts_routing_key),
        Binding(t.receipts_queue, t.expired_exchange,
                # "-with-x": a plain "all" ignores x- headers, and so would match all
                arguments={"x-match": "all-with-x", "x-first-death-reason": "expired"}),
    ]


VAULT_MAX_LENGTH = 10_000
VAULT_MESSAGE_TTL_MS = 60_000


def vault(t: Topology) -> Queue:
    """The key vault service's requests (relayd.vault). Declared by the service alone, on
    its own connection: exclusive, so one service answers and no other connection may
    consume it, and gone with its owner, so that while no service runs a host's request
    is returned unroutable at once and waits nowhere. Requests carry keys: the queue is
    not durable, bounded, and what waits in it expires (each request also carries its
    own, shorter, expiration)."""
    return Queue(t.vault_queue, {"x-queue-type": "classic", "x-max-length": VAULT_MAX_LENGTH,
                                 "x-overflow": "reject-publish",
                                 "x-message-ttl": VAULT_MESSAGE_TTL_MS}, exclusive=True)


def router_lock(entry_queue: str) -> str:
    """The exclusive queue whose owner routes `entry_queue` into its shards (relayd.route):
    the broker lets one connection declare it, and deletes it when that connection dies.
    Declared by the router itself, never here: it must not outlive its owner."""
    return f"{entry_queue}.router-lock"


def edge(t: Topology) -> list[Spec]:
    """What edge processes talk over: each binds a queue of its own (exclusive, named
    relayd.edge.<random>, which relayd's rights cover) to this exchange, to be asked to
    hand a device's queue back."""
    return [Exchange(t.edge_exchange, ExchangeType.FANOUT)]


def wake_pending(t: Topology) -> str:
    """The queue of notices "a message was queued for this device", relayd's own."""
    return f"{t.wake_queue}.pending"


def wake(t: Topology) -> list[Spec]:
    """Push wakes (relayd.wake): a fanout exchange for the operator's push service, and a
    bounded queue bound to it that the push service may read (the oldest wake goes first
    when it is full: a newer one says more); the notices for the one decider, which only
    relayd reads (a single active consumer; published through the default exchange)."""
    bounded = {"x-queue-type": "classic", "x-overflow": "drop-head",
               "x-max-length": t.wake_queue_max_length}
    return [Exchange(t.wake_exchange, ExchangeType.FANOUT),
            Queue(t.wake_queue, bounded), Binding(t.wake_queue, t.wake_exchange),
            Queue(wake_pending(t), {**bounded, "x-single-active-consumer": True})]


def business_exchange(t: Topology, business: str) -> str:
    return t.business_exchange.format(business=business)


def business_inbox(t: Topology, business: str, secret: bytes) -> str:
    """The business's inbox: named by its keyed token (relayd.opaque.inbox_token, `secret`
    the relay's opaque secret), never by its id, so that no other business can name it to
    read its depth or its consumers. `business add` tells the business the name."""
    return t.business_inbox.format(business=inbox_token(secret, business))


def device_queue(t: Topology, device: str, secret: bytes) -> str:
    """The device's queue: named by its keyed token (relayd.opaque.device_token, `secret`
    the relay's opaque secret), never by its id, so that no one can probe it by name."""
    return t.device_queue.format(device=device_token(secret, device))


def device_routing_key(device: str, secret: bytes) -> str:
    """The routing key of the device's binding to the devices exchange: its token too."""
    return device_token(secret, device)


def business(t: Topology, business_id: str, secret: bytes) -> list[Spec]:
    """A business's own exchange and its bounded inbox."""
    exchange, inbox = business_exchange(t, business_id), business_inbox(t, business_id, secret)
    return [
        Exchange(exchange, ExchangeType.FANOUT),
        Queue(inbox, {"x-queue-type": t.queue_type, "x-overflow": "reject-publish",
                      "x-max-length": t.business_inbox_max_length}),
        Binding(inbox, exchange),
    ]


def device(t: Topology, device_id: str, secret: bytes) -> list[Spec]:
    """A device's queue: undelivered messages expire after the TTL into relayd.dead.

    Classic, whatever `queue_type` says: a quorum queue per device costs a Raft group each.
    """
    queue = device_queue(t, device_id, secret)
    return [
        Queue(queue, {"x-queue-type": "classic", "x-overflow": "reject-publish",
                      "x-dead-letter-exchange": t.dead_exchange,
                      "x-max-length": t.device_queue_max_length,
                      "x-message-ttl": int(t.device_message_ttl_days * DAY_MS)}),
        Binding(queue, t.devices_exchange, device_routing_key(device_id, secret)),
    ]


async def declare(channel: AbstractChannel, specs: list[Spec]) -> None:
    for spec in specs:
        if isinstance(spec, Exchange):
            await channel.declare_exchange(spec.name, spec.kind, durable=True)
        elif isinstance(spec, Queue):
            await channel.declare_queue(spec.name, durable=not spec.exclusive,
                                        exclusive=spec.exclusive, arguments=spec.arguments)
        elif isinstance(spec, ExchangeBinding):
            destination = await channel.get_exchange(spec.destination, ensure=False)
            await destination.bind(spec.source)
        else:
            queue = await channel.get_queue(spec.queue, ensure=False)
            await queue.bind(spec.exchange, spec.routing_key, arguments=spec.arguments or None)


async def delete_queue(channel: AbstractChannel, name: str) -> None:
    """Delete a queue and what it holds; a queue that is gone already is fine."""
    await channel.queue_delete(name)


async def delete_exchange(channel: AbstractChannel, name: str) -> None:
    await channel.exchange_delete(name)


