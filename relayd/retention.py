"""Storage limitation (Art. 5(1)(e)): keep nothing longer than its purpose needs.

One pass, enforce(), in this order (periods in the `retention` config section):
- open conversations idle for `inactive_conversation_days` expire: their business and the
  user's devices are told `close` (confirmed) before the store closes the conversation,
  on the user's behalf (so rotate_on_delete gives the user a new id when they return);
  one that cannot be told now is counted as `failed` and retried by the next pass;
- closed conversations are deleted `closed_conversation_days` after they closed;
- the replay state of a device that no longer exists goes `replay_state_days` after its
  last use, sent rows after `sent_days`, audit records after `audit_days`.
Undelivered device messages and dead letters expire in the broker itself
(`topology.device_message_ttl_days`, `topology.dead_message_ttl_days`).

enforce() returns what it removed as a dict of counts: the metric.
"""

from __future__ import annotations

import asyncio
import contextlib

from aio_pika.abc import AbstractConnection

from relayd import amqp, gdpr, log
from relayd.config import Settings
from relayd.deliver import Sink, fan_out, now_ms
from relayd.errors import TransientError
from relayd.keys import KeyRing
from relayd.store import Store
from relayd.topology import DAY_MS

_log = log.get("relayd.retention")


async def enforce(settings: Settings, store: Store, keyring: KeyRing, sink: Sink,
                  now: int) -> dict[str, int]:
    """One retention pass as of `now` (unix ms); return the counts of what it removed."""
    r = settings.retention

    def before(days: float) -> int:
        return now - int(days * DAY_MS)

    expired = failed = 0
    for conversation in await store.stale_conversations(before(r.inactive_conversation_days)):
        event_id = gdpr.close_id("expire", conversation)
        try:
            if await store.business(conversation.business) is not None:
                await gdpr.tell_close(sink, conversation, "expire")
            await fan_out(store, keyring, sink, await store.devices_of(conversation.user),
                          f"expire:{event_id}", event_id, conversation.business, "close", {})
        except TransientError as exc:
            _log.warning("expire_failed", reason=exc.reason)
            failed += 1
            continue
        expired += await store.close_conversation(conversation.id, "user", now)
    pruned = await store.prune(conversations_before_ms=before(r.closed_conversation_days),
                               replay_before_ms=before(r.replay_state_days),
                               sent_before_ms=before(r.sent_days),
                               audit_before_ms=before(r.audit_days),
                               # a claim outlives every copy of its message in a device
                               # queue (their TTL), so no copy expiring later is reported
                               receipts_before_ms=before(
                                   settings.topology.device_message_ttl_days + 1))
    return {"expired": expired, "failed": failed, **pruned}


async def retention_loop(settings: Settings, store: Store, keyring: KeyRing, sink: Sink,
                         *until: asyncio.Event) -> None:
    """A pass every `retention.interval_seconds` until one of `until` is set; a failed pass
    is logged and the next one retries (every step is idempotent). A failure never stops
    the relay."""
    while not any(event.is_set() for event in until):
        try:
            counts = await enforce(settings, store, keyring, sink, now_ms())
            _log.info("retention", **counts)
        except TransientError as exc:
            _log.warning("retention_failed", reason=exc.reason)
        except Exception as exc:  # the type only: a message may quote stored data
            _log.error("retention_failed", reason="internal_error", error=type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(amqp.wait_any(*until), settings.retention.interval_seconds)


async def serve(settings: Settings, store: Store, keyring: KeyRing,
                stop: asyncio.Event) -> None:
    """retention_loop on a connection of its own, reconnecting whenever it is lost."""
    async def session(connection: AbstractConnection, lost: asyncio.Event) -> None:
        channel = await amqp.open_channel(connection)
        sink = amqp.Publisher(channel, settings, keyring.opaque_secret)
        await retention_loop(settings, store, keyring, sink, stop, lost)

    await amqp.keep_connected(settings, "relayd-retention", "retention", stop, session)
