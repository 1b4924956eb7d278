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


def management(settings: Settings) -> provision.Api | None:
    m = settings.amqp.management
    return provision.Api(m) if m is not None else None


async def declare_all(settings: Settings, store: Store, secret: bytes) -> int:
    """Declare the core topology and every registered business and device (`secret`: the
    relay's opaque secret, which names device queues)."""
    t = settings.topology
    specs = topology.core(t, settings.gdpr.identity_user is not None, settings.wake.enabled)
    for business in await store.businesses():
        specs += topology.business(t, business.id)
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


async def add_business(settings: Settings, store: Store, business: Business,
                       auth: provision.Auth | None = None) -> Onboarded:
    """Provision its user (with amqp.management), declare its exchange and inbox, register
    it; a new password user gets its password last, once everything else is in place."""
    m = settings.amqp.management
    api = provision.Api(m) if m else None
    grant = (provision.grant(settings, business.id, business.amqp_user, auth or m.auth)
             if m else None)
    changed = await asyncio.to_thread(provision.ensure, api, grant) if api and grant else []
    async with amqp.one_off(settings, _NAME) as ch:
        await topology.declare(ch, topology.core(settings.topology)
                               + topology.business(settings.topology, business.id))
    added = await store.add_business(business)
    password = (await asyncio.to_thread(provision.issue_password, api, grant)
                if api and grant else None)
    return Onboarded(added, changed + (["password"] if password else []), password)


@dataclass(frozen=True, slots=True)
class Offboarded:
    removed: bool  # was registered in the store
    user: str  # deleted, absent, not_ours, or unmanaged (no amqp.management)
    connections_closed: int = 0


async def remove_business(settings: Settings, store: Store, business_id: str) -> Offboarded:
    """Cut the business off (delete its user, close its connections), unregister it, then
    delete its inbox and exchange."""
    api = management(settings)
    business = await store.business(business_id)
    revoked = provision.Revoked("absent", 0)
    if api is not None and business is not None:
        revoked = await asyncio.to_thread(provision.revoke, api, business.amqp_user)
    removed = await store.remove_business(business_id)
    async with amqp.one_off(settings, _NAME) as ch:
        await topology.delete_queue(ch, topology.business_inbox(settings.topology, business_id))
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
    """Stop sealing to the device at once, then delete its queue and what it holds."""
    removed = await store.remove_device(device_id)
    async with amqp.one_off(settings, _NAME) as ch:
        await topology.delete_queue(ch, topology.device_queue(settings.topology, device_id,
                                                              secret))
    return removed


@dataclass(frozen=True, slots=True)
class Moved:
    queues: int  # legacy queues found, emptied into their new ones and deleted
    messages: int


async def move_legacy_device_queues(settings: Settings, store: Store, secret: bytes) -> Moved:
    """Upgrading from a relay that named device queues by device id: for each registered
    device whose queue of the old name exists, unbind it, move what it holds (as it is,
    persistent, each message acked only once the broker confirmed its copy) into the
    device's queue of the new name, and delete it. Safe to re-run; declare_all first."""
    t, queues, messages = settings.topology, 0, 0
    connection = await amqp.connect(settings, "relayd-admin")
    try:
        for device in await store.devices():
            legacy = t.device_queue.format(device=device.id)
            probe = await connection.channel()
            try:
                await probe.declare_queue(legacy, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue
            await probe.close()
            ch = await connection.channel(publisher_confirms=True, on_return_raises=True)
            queue = await ch.get_queue(legacy, ensure=False)
            await queue.unbind(t.devices_exchange, device.id)
            target = topology.device_queue(t, device.id, secret)
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                await ch.default_exchange.publish(aio_pika.Message(
                    message.body, headers=message.headers, content_type=message.content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=target,
                    mandatory=True)
                await message.ack()
                messages += 1
            await ch.queue_delete(legacy, if_empty=True)
            await ch.close()
            queues += 1
    finally:
        await connection.close()
    return Moved(queues, messages)
