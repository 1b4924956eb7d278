"""The relay's registry, behind one small interface.

SQLite is the embedded default (`sqlite:///path`). Every backend passes the same contract
suite in tests/integration/test_store_contract.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from relayd.crypto import Kem

ConversationState = Literal["open", "closed"]
Party = Literal["user", "business"]


@dataclass(frozen=True, slots=True)
class Business:
    id: str
    amqp_user: str
    first_party: bool = False


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    user: str
    kem: Kem
    enc_key: bytes  # raw HPKE public key
    sign_key: bytes  # raw Ed25519 public key


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str  # the opaque id the business knows
    user: str
    business: str
    state: ConversationState
    epoch: int
    closed_by: Party | None
    created_ms: int
    updated_ms: int


class Store(Protocol):
    """What the workers and the CLI need from storage; every method is one transaction."""

    async def close(self) -> None: ...

    async def add_business(self, business: Business) -> bool:
        """Register a business; False if it exists already (unchanged)."""

    async def business(self, business_id: str) -> Business | None: ...

    async def business_by_amqp_user(self, amqp_user: str) -> Business | None: ...

    async def businesses(self) -> list[Business]: ...

    async def remove_business(self, business_id: str) -> bool: ...

    async def add_device(self, device: Device) -> bool:
        """Register a device; False if it exists already (unchanged)."""

    async def device(self, device_id: str) -> Device | None: ...

    async def devices_of(self, user: str) -> list[Device]: ...

    async def devices(self) -> list[Device]: ...

    async def remove_device(self, device_id: str) -> bool: ...

    async def conversation(self, conversation_id: str) -> Conversation | None: ...

    async def conversation_of(self, user: str, business: str) -> Conversation | None: ...

    async def open_conversation(self, user: str, business: str, now_ms: int,
                                rotate_on_reopen: bool,
                                make_id: Callable[[int], str]) -> Conversation:
        """Create the (user, business) conversation, or reopen it, or note activity on it.

        A conversation the user closed gets epoch + 1 (so a new id) when it reopens and
        `rotate_on_reopen` is set.
        """

    async def close_conversation(self, conversation_id: str, by: Party, now_ms: int) -> bool:
        """Close an open conversation; False if it was not open (nothing changed)."""

    async def claim_seq(self, device_id: str, seq: int, window: int) -> bool:
        """Accept (device, seq) once: True the first time, False for a replay or too old."""

    async def allocate_seqs(self, source: str, device_ids: Sequence[str],
                            now_ms: int) -> dict[str, int]:
        """The next down `seq` of each device for the message `source`.

        Asking again for the same source returns the same numbers, so a redelivered
        message never advances a device's seq twice.
        """


def open_store(url: str) -> Store:
    """The backend that `url` names; the schema is migrated on open."""
    if url.startswith("sqlite:///"):
        from relayd.store.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///"))
    raise ValueError(f"no store backend for {url.split(':', 1)[0]}")
