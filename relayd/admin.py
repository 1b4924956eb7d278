"""Operator actions that keep the store and the broker in step.

Each one is safe to re-run: registering what exists already, or removing what is gone,
changes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aio_pika.abc import AbstractChannel

from relayd import amqp, topology
from relayd.config import Settings
from relayd.store import Business, Device, Store


@asynccontextmanager
async def channel(settings: Settings) -> AsyncIterator[AbstractChannel]:
    connection = await amqp.connect(settings, "relayd-admin")
    try:
        yield await connection.channel()
    finally:
        await connection.close()


async def declare_all(settings: Settings, store: Store) -> int:
    """Declare the core topology and every registered business and device."""
    t = settings.topology
    specs = topology.core(t)
    for business in await store.businesses():
        specs += topology.business(t, business.id)
    for device in await store.devices():
        specs += topology.device(t, device.id)
    async with channel(settings) as ch:
        await topology.declare(ch, specs)
    return len(specs)


async def add_business(settings: Settings, store: Store, business: Business) -> bool:
    """Declare the business's exchange and inbox, then register it; False if it existed."""
    async with channel(settings) as ch:
        await topology.declare(ch, topology.core(settings.topology)
                               + topology.business(settings.topology, business.id))
    return await store.add_business(business)


async def remove_business(settings: Settings, store: Store, business_id: str) -> bool:
    """Unregister the business, then delete its inbox and exchange."""
    removed = await store.remove_business(business_id)
    async with channel(settings) as ch:
        await topology.delete_queue(ch, topology.business_inbox(settings.topology, business_id))
        await topology.delete_exchange(ch, topology.business_exchange(settings.topology,
                                                                      business_id))
    return removed


async def add_device(settings: Settings, store: Store, device: Device) -> bool:
    """Declare and bind the device's queue, then register it; False if it existed."""
    async with channel(settings) as ch:
        await topology.declare(ch, topology.core(settings.topology)
                               + topology.device(settings.topology, device.id))
    return await store.add_device(device)


async def remove_device(settings: Settings, store: Store, device_id: str) -> bool:
    """Stop sealing to the device at once, then delete its queue and what it holds."""
    removed = await store.remove_device(device_id)
    async with channel(settings) as ch:
        await topology.delete_queue(ch, topology.device_queue(settings.topology, device_id))
    return removed
