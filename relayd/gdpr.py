"""The data subject's rights the relay serves: erasure (Art. 17) and access (Art. 15).

erase() keeps the store as its to-do list and empties it last, so a crash at any point
leaves what a re-run needs to finish the job:
1. delete the user's device queues, and the undelivered messages in them;
2. tell the business of each open conversation `close` (confirmed by the broker; a
   business no longer registered has no one to tell), then close it in the store;
3. in one transaction, delete the devices, their replay state and sent rows, and the
   closed conversations, then delete their queues again. An edge login reads the store
   twice, before it attaches the device's stream (declaring the queue if it is missing)
   and after (relayd.edge.server.Door._recheck); the edge and this second delete cover
   the two orders of that second read and this transaction. A login whose second read
   comes after the transaction finds the device gone: the edge refuses it (4401) and
   deletes the queue it declared again itself. A login whose second read came before it
   (its attach after step 1) holds a queue the edge declared again: the second delete
   removes it, which cancels the edge's consumer and closes the session (4401). A
   conversation a device reopened meanwhile is still open, so steps 1-3 run again (a
   few rounds at most). Once none is left, the store destroys the user's key, so no
   copy of those rows anywhere opens again (relayd.store.pseudonym);
4. write an audit record: a keyed reference of the user and the counts, nothing else.
A re-run sends an interrupted close again under the same id, so the business can
de-duplicate it.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from relayd import log, opaque, payload
from relayd.amqp import Delivery
from relayd.config import Settings
from relayd.consume import Work, retried
from relayd.crypto import fingerprint
from relayd.deliver import Sink, now_ms
from relayd.errors import PermanentError, TransientError
from relayd.keys import KeyRing, KeySource
from relayd.store import Conversation, Store

CLOSE_NAMESPACE = uuid.UUID("9c1d7a52-3f0e-4d8b-b6a1-2e5f8c0d4a77")
ROUNDS = 3
_log = log.get("relayd.gdpr")


class ErasureSink(Sink, Protocol):
    """A Sink that can also delete a device's queue (amqp.Publisher is one)."""

    def delete_device_queue(self, device: str) -> Awaitable[None]: ...


def close_id(reason: str, conversation: Conversation) -> str:
    """The same id for the same close of the same conversation, so a re-run de-duplicates."""
    return str(uuid.uuid5(CLOSE_NAMESPACE,
                          f"{reason}:{conversation.id}:{conversation.updated_ms}"))


async def tell_close(sink: Sink, conversation: Conversation, reason: str) -> None:
    """Send the conversation's business `close`, in the shape of a user's close."""
    event_id = close_id(reason, conversation)
    await sink.to_business(conversation.business, payload.business_event(
        "close", conversation.id, event_id, now_ms(), {}), event_id, "close")


async def erase(store: Store, keyring: KeyRing, sink: ErasureSink, user: str,
                via: str) -> dict[str, int]:
    """Erase everything held about `user` (see the module docstring); return the counts."""
    totals: Counter[str] = Counter()
    for _ in range(ROUNDS):
        held = await store.export_user(user)
        for device in held.devices:
            await sink.delete_device_queue(device.id)
        for conversation in held.conversations:
            if conversation.state == "open":
                if await store.business(conversation.business) is not None:
                    await tell_close(sink, conversation, "erase")
                await store.close_conversation(conversation.id, "user", now_ms())
                totals["closed"] += 1
        counts = await store.erase_user(user)
        for device in held.devices:  # again: a login the edge let in since step 1 (step 3)
            await sink.delete_device_queue(device.id)
        totals.update({k: v for k, v in counts.items() if k != "open"})
        if counts["open"] == 0:
            break
    else:
        raise TransientError("erase_raced", "the user's conversations kept reopening")
    reference = opaque.reference(keyring.opaque_secret, "user", user)
    detail = {k: totals[k] for k in ("devices", "conversations", "closed", "replay", "sent")}
    await store.add_audit("erase", reference, {**detail, "via": via}, now_ms())
    _log.info("erased", user_ref=reference, via=via, **detail)
    return detail


async def export(store: Store, user: str) -> dict[str, Any]:
    """Everything held about `user`, as JSON-ready data."""
    held = await store.export_user(user)
    return {
        "user": user,
        "devices": [{
            "device": d.id, "kem": d.kem.value, "enc_key_fingerprint": fingerprint(d.enc_key),
            "sign_key_fingerprint": fingerprint(d.sign_key), "created_ms": d.created_ms,
            "highest_seq_received": held.highest_seq.get(d.id),
            "next_seq_to_send": held.next_seq.get(d.id),
        } for d in held.devices],
        "conversations": [{
            "business": c.business, "conversation": c.id, "state": c.state, "epoch": c.epoch,
            "created_ms": c.created_ms, "updated_ms": c.updated_ms, "closed_by": c.closed_by,
        } for c in held.conversations],
        "messages": "not stored: the relay keeps no message content, only forwards it",
    }


@dataclass(frozen=True, slots=True)
class EraseRequest:
    user: str
    id: str


class Erasure:
    """Erase requests over AMQP from the identity service (`gdpr.identity_user`), known
    only by the broker-validated user_id; anything else is dead-lettered."""

    def __init__(self, settings: Settings, store: Store, keys: KeySource,
                 sink: ErasureSink) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys
        self.sink = sink

    def prepare(self, delivery: Delivery) -> tuple[str | None, Work]:
        request = self.parse(delivery.body, delivery.user_id)
        again = bool(delivery.redelivered)
        return "u:" + request.user, retried(lambda again, _: self.handle(request, again), again)

    def parse(self, body: bytes, amqp_user: str | None) -> EraseRequest:
        if not amqp_user or amqp_user != self.settings.gdpr.identity_user:
            raise PermanentError("unauthenticated", "erase requests come from gdpr.identity_user")
        try:
            data = payload.loads(body)
        except ValueError as exc:
            raise PermanentError("malformed", str(exc)) from None
        if (not isinstance(data, dict) or data.keys() != {"v", "type", "user", "id"}
                or not payload.is_version(data["v"]) or data["type"] != "erase"
                or not payload.is_user_id(data["user"])
                or not isinstance(data["id"], str) or len(data["id"]) != 36):
            raise PermanentError("malformed", 'expected {"v":1, "type":"erase", "user", "id"}')
        try:
            return EraseRequest(data["user"], str(uuid.UUID(data["id"])))
        except ValueError:
            raise PermanentError("malformed", "id is a UUID") from None

    async def handle(self, request: EraseRequest, redelivered: bool) -> str:
        await erase(self.store, self.keys(), self.sink, request.user, via="amqp")
        return "erase"
