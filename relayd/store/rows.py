"""What both stores share: the column lists they select, and rows made into values.

A row that cannot be made into a value (a KEM this relayd does not know, an audit
detail that is not a JSON object) raises StoreError, as every other failure of a store.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from relayd.crypto import Kem
from relayd.errors import StoreError
from relayd.store import AuditRecord, Business, Conversation, Device

# The ids of users and devices in these columns are pseudonyms (relayd.store.pseudonym).
CONVERSATION = "id, user_id, business_id, state, epoch, closed_by, created_ms, updated_ms"
CONVERSATION_JOINED = ", ".join(f"c.{column}" for column in CONVERSATION.split(", "))
DEVICE = "id, user_id, kem, enc_key, sign_key, created_ms, sealed"
BUSINESS = "id, amqp_user, first_party"
BUSINESS_JOINED = ", ".join(f"b.{column}" for column in BUSINESS.split(", "))
AUDIT = "at_ms, action, subject, detail"
_BUSINESS_COLUMNS = len(BUSINESS.split(", "))


def now_ms() -> int:
    """The store's clock, for the times a store stamps itself."""
    return time.time_ns() // 1_000_000


def conversation(row: Any) -> Conversation | None:
    return None if row is None else Conversation(*row)


def device(row: Any) -> Device:
    try:
        kem = Kem(row[2])
    except ValueError:
        raise StoreError("a device's kem is unknown to this relayd") from None
    return Device(row[0], row[1], kem, row[3], row[4], row[5], row[6])


def business(row: Any) -> Business:
    return Business(row[0], row[1], bool(row[2]))


def business_and_conversation(
        row: Any) -> tuple[Business | None, Conversation | None]:
    """A row (a tuple, or asyncpg's Record) of BUSINESS_JOINED then CONVERSATION_JOINED
    (NULLs without a conversation)."""
    if row is None:
        return None, None
    rest = row[_BUSINESS_COLUMNS:]
    return business(row), None if rest[0] is None else Conversation(*rest)


def detail(values: Mapping[str, int | str | bool]) -> str:
    return orjson.dumps(dict(values)).decode()


def audit(row: Any) -> AuditRecord:
    try:
        values = orjson.loads(row[3])
    except orjson.JSONDecodeError:
        values = None
    if not isinstance(values, dict):
        raise StoreError("an audit record's detail is not a JSON object")
    return AuditRecord(row[0], row[1], row[2], values)


def device_values(device: Device) -> tuple[Any, ...]:
    """The values of DEVICE for a new row."""
    return (device.id, device.user, device.kem.value, device.enc_key, device.sign_key,
            now_ms() if device.created_ms is None else device.created_ms, device.sealed)


def legacy_ids(user_rows: Iterable[Any], device_rows: Iterable[Any],
               replay_rows: Iterable[Any]) -> tuple[set[str], dict[str, str | None]]:
    """Backend.legacy_ids from (user id), (device id, user id) and (replay device id) rows."""
    devices: dict[str, str | None] = {row[0]: row[1] for row in device_rows}
    for row in replay_rows:
        devices.setdefault(row[0], None)
    return {row[0] for row in user_rows}, devices
