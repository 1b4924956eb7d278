"""Operator actions that keep the store and the broker in step.

Each one is safe to re-run: registering what exists already, or removing what is gone,
changes nothing. With `amqp.management` configured, a business's RabbitMQ user is
provisioned and revoked too (relayd.provision); the HTTP calls run in a thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aio_pika
import aiormq

from relayd import amqp, provision, topology
from relayd.config import Settings
from relayd.errors import ConfigError
from relayd.store import Business, Device, Store

_NAME = "relayd-admin"  # the connection's name, as the broker shows it
_LET_GO_TRIES = 50  # x 0.2 s: how long a move waits for a legacy queue's consumer to go


def management(settings: Settings) -> provision.Api | None:
    m = settings.amqp.management
    return provision.Api(m) if m is not None else None


async def declare_all(settings: Settings, store: Store, secret: bytes) -> int:
    """Declare the core topology and every registered business and device (`secret`: the
    relay's opaque secret, which names business inboxes and device queues)."""
    t = settings.topology
    specs = topology.core(t, settings.gdpr.identity_user is not None, settings.wake.enabled)
    for business in await store.businesses():
        specs += topology.business(t, business.id, secret)
    for device in await store.devices():
        specs += topology.device(t, device.id, secret)
    async with amqp.one_off(settings, _NAME) as ch:
        await topology.declare(ch, specs)
    return len(specs)


@dataclass(frozen=True, slots=True)
class Onboarded:
    added: bool  # newly registered in the store
    provisioned: list[str] = field(default_factory=list)  # what changed on the broker
    password: str | None = field(default=None, repr=False)  # issued now: hand over once


async def add_business(settings: Settings, store: Store, business: Business, secret: bytes,
                       auth: provision.Auth | None = None) -> Onboarded:
    """Provision its user (with amqp.management), declare its exchange and inbox, register
    it; a new password user gets its password last, once everything else is in place."""
    m = settings.amqp.management
    api = provision.Api(m) if m else None
    grant = (provision.grant(settings, business.id, business.amqp_user, auth or m.auth, secret)
             if m else None)
    changed = await asyncio.to_thread(provision.ensure, api, grant) if api and grant else []
    async with amqp.one_off(settings, _NAME) as ch:
        await topology.declare(ch, topology.core(settings.topology)
                               + topology.business(settings.topology, business.id, secret))
    added = await store.add_business(business)
    password = (await asyncio.to_thread(provision.issue_password, api, grant)
                if api and grant else None)
    return Onboarded(added, changed + (["password"] if password else []), password)


@dataclass(frozen=True, slots=True)
class Offboarded:
    removed: bool  # was registered in the store
    user: str  # deleted, absent, not_ours, or unmanaged (no amqp.management)
    connections_closed: int = 0


async def remove_business(settings: Settings, store: Store, business_id: str,
                          secret: bytes) -> Offboarded:
    """Cut the business off (delete its user, close its connections), unregister it, then
    delete its inbox and exchange."""
    api = management(settings)
    business = await store.business(business_id)
    revoked = provision.Revoked("absent", 0)
    if api is not None and business is not None:
        revoked = await asyncio.to_thread(provision.revoke, api, business.amqp_user)
    removed = await store.remove_business(business_id)
    async with amqp.one_off(settings, _NAME) as ch:
        await topology.delete_queue(ch, topology.business_inbox(settings.topology, business_id,
                                                                secret))
        await topology.delete_exchange(ch, topology.business_exchange(settings.topology,
                                                                      business_id))
    return Offboarded(removed, revoked.user if api else "unmanaged", revoked.connections_closed)


async def rotate_credentials(settings: Settings, store: Store, business_id: str) -> str | None:
    """A new password for the business's user; None if no such business is registered."""
    api = management(settings)
    if api is None:
        raise ConfigError({"amqp.management": "is required to rotate credentials"})
    business = await store.business(business_id)
    if business is None:
        return None
    return await asyncio.to_thread(provision.rotate, api, business.amqp_user)


async def add_device(settings: Settings, store: Store, device: Device, secret: bytes) -> bool:
    """Declare and bind the device's queue, then register it; False if it existed."""
    async with amqp.one_off(settings, _NAME) as ch:
        await topology.declare(ch, topology.core(settings.topology)
                               + topology.device(settings.topology, device.id, secret))
    return await store.add_device(device)


async def remove_device(settings: Settings, store: Store, device_id: str, secret: bytes) -> bool:
    """Stop sealing to the device at once, then delete its queue and what it holds. In
    this order: an edge login that still read the device after attaching its stream has
    its consumer cancelled by the delete (relayd.edge.server.Door._recheck)."""
    removed = await store.remove_device(device_id)
    async with amqp.one_off(settings, _NAME) as ch:
        await topology.delete_queue(ch, topology.device_queue(settings.topology, device_id,
                                                              secret))
    return removed


@dataclass(frozen=True, slots=True)
class Moved:
    queues: int  # legacy queues found, emptied into their new ones and deleted
    messages: int
    in_use: int = 0  # legacy queues emptied but left in place: a consumer held messages


async def _move(connection: aio_pika.abc.AbstractConnection, legacy: str, exchange: str,
                old_key: str, new_key: str) -> tuple[int, bool] | None:
    """Unbind queue `legacy` from `exchange` (routing key `old_key`), move what it holds
    (as it is, persistent, each message acked only once the broker confirmed its copy)
    through `exchange` under `new_key`, to the queue bound there now, and delete it. The
    exchange, not the default one, which relayd's own user may not write to. None if there
    is no such queue; else (messages moved, whether it was deleted).

    A consumer may hold messages of it, unacked: they come back when it goes. One being
    cut off (business connections closed) is waited for, up to about ten seconds; a queue
    still consumed then is left, emptied and unbound, to move on a later run. Quorum
    queues refuse `if-empty`: the check is a passive declare, and nothing can reach the
    queue after it, since nothing is bound to it and nobody but relayd may write into a
    queue directly (the default exchange)."""
    probe = await connection.channel()
    try:
        await probe.declare_queue(legacy, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    await probe.close()
    ch = await connection.channel(publisher_confirms=True, on_return_raises=True)
    queue = await ch.get_queue(legacy, ensure=False)
    await queue.unbind(exchange, old_key)
    through = await ch.get_exchange(exchange, ensure=False)
    moved = 0
    for _ in range(_LET_GO_TRIES):
        left = (await ch.declare_queue(legacy, passive=True)).declaration_result
        if not (left.message_count or left.consumer_count):
            await ch.queue_delete(legacy)
            await ch.close()
            return moved, True
        # No more than were there: should anything still route here, this ends.
        for _ in range(left.message_count or 0):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            await through.publish(aio_pika.Message(
                message.body, headers=message.headers, content_type=message.content_type,
                message_id=message.message_id, type=message.type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=new_key,
                mandatory=True)
            await message.ack()
            moved += 1
        if not left.message_count:
            await asyncio.sleep(0.2)  # the broker offers no event for a consumer's going
    await ch.close()
    return moved, False


async def _move_all(settings: Settings, moves: list[tuple[str, str, str, str]]) -> Moved:
    queues = messages = in_use = 0
    connection = await amqp.connect(settings, _NAME)
    try:
        for legacy, exchange, old_key, new_key in moves:
            done = await _move(connection, legacy, exchange, old_key, new_key)
            if done is not None:
                messages += done[0]
                queues += done[1]
                in_use += not done[1]
    finally:
        await connection.close()
    return Moved(queues, messages, in_use)


async def move_legacy_device_queues(settings: Settings, store: Store, secret: bytes) -> Moved:
    """Upgrading from a relay that named device queues by device id: for each registered
    device whose queue of the old name exists, unbind it, move what it holds into the
    device's queue of the new name, and delete it. Safe to re-run; declare_all first."""
    t = settings.topology
    return await _move_all(settings, [
        (t.device_queue.format(device=d.id), t.devices_exchange, d.id,
         topology.device_routing_key(d.id, secret)) for d in await store.devices()])


async def move_legacy_business_inboxes(settings: Settings, store: Store,
                                       secret: bytes) -> Moved:
    """Upgrading from a relay that named business inboxes by business id, with relayd
    stopped: for each registered business whose inbox of the old name exists, first (with
    amqp.management) let its user read its new inbox only and close its connections, so
    that what it had not acked goes back; then unbind the old inbox, move what it holds
    into the new one, in order, and delete it. Safe to re-run; declare_all first."""
    t, api = settings.topology, management(settings)
    moves = []
    for business in await store.businesses():
        legacy = t.business_inbox.format(business=business.id)
        if api is not None:
            await asyncio.to_thread(provision.regrant, api, settings, business.id,
                                    business.amqp_user, secret)
        moves.append((legacy, topology.business_exchange(t, business.id), "", ""))
    return await _move_all(settings, moves)
