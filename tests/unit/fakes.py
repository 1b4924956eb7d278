"""Stand-ins for the broker side, so that the consumer and the handlers run without one."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

_bodies = itertools.count()


@dataclass
class FakeDelivery:
    """A delivery (relayd.amqp.Delivery) that records how it was settled; `fail` maps a
    settle call to the exception it raises (once)."""

    body: bytes = field(default_factory=lambda: f"body-{next(_bodies)}".encode())
    headers: dict[str, Any] | None = None
    user_id: str | None = None
    routing_key: str | None = ""
    exchange: str | None = ""
    redelivered: bool | None = False
    timestamp: datetime | None = None
    content_type: str | None = None
    message_id: str | None = None
    type: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    fail: dict[str, Exception] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)  # every settle call, failed or not
    settled: list[str] = field(default_factory=list)  # the ones that went through

    async def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail.pop(name)
        self.settled.append(name)

    def ack(self) -> Awaitable[None]:
        return self._call("ack")

    def nack(self, *, requeue: bool) -> Awaitable[None]:
        return self._call("requeue" if requeue else "drop")

    def reject(self, *, requeue: bool) -> Awaitable[None]:
        return self._call("reject_requeue" if requeue else "reject")


@dataclass
class RecordingSink:
    """Everything the handlers publish, as (target, ...) tuples, in order."""

    sent: list[tuple[Any, ...]] = field(default_factory=list)
    receipts: list[str | None] = field(default_factory=list)  # each device copy's token

    async def to_business(self, business: str, body: bytes, message_id: str,
                          kind: str) -> None:
        self.sent.append(("business", business, body, message_id, kind))

    async def to_device(self, device: str, sealed: bytes, receipt: str | None = None) -> None:
        self.sent.append(("device", device, sealed))
        self.receipts.append(receipt)

    async def to_shard(self, queue: str, body: bytes, headers: dict[str, Any],
                       content_type: str) -> None:
        self.sent.append(("shard", queue, body, headers, content_type))

    async def delete_device_queue(self, device: str) -> None:
        self.sent.append(("delete", device))

    async def declare_device_queue(self, device: str) -> None:
        self.sent.append(("declare", device))

    async def answer(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        self.sent.append(("answer", reply_to, correlation_id, body))

    async def dead_letter(self, delivery: Any, queue: str, reason: str) -> None:
        self.sent.append(("dead", queue, reason))

    def of(self, target: str) -> list[tuple[Any, ...]]:
        return [s for s in self.sent if s[0] == target]
