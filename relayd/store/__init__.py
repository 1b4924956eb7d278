"""The relay's registry, behind one small interface.

SQLite is the embedded default (`sqlite:///path`); PostgreSQL (`postgresql://…`) serves
several relayd hosts at once. Every backend passes the same contract suite in
tests/integration/test_store_contract.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from relayd.crypto import Kem
from relayd.errors import ConfigError

if TYPE_CHECKING:
    from relayd.config import Settings

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
    created_ms: int | None = field(default=None, compare=False)  # None: the store's clock
    # Inside a backend only: the device id sealed under its user's key (relayd.store.pseudonym).
    sealed: bytes | None = field(default=None, compare=False, repr=False)


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


@dataclass(frozen=True, slots=True)
class UpClaim:
    """A user's message to a business, as Store.accept_up applies it in one transaction.

    `household`: the sender's user's devices, ordered by id, as the caller verified the
    message against (the sender's keys among them); the store checks it is still so."""

    household: tuple[Device, ...]
    device: str
    seq: int
    window: int  # limits.replay_window
    business: str
    kind: str
    redelivered: bool  # the broker marked it a redelivery: our own retry
    now_ms: int
    rotate_on_reopen: bool  # conversations.opaque_id_policy rotate_on_delete
    make_id: Callable[[int], str]  # a conversation's opaque id from its epoch
    echo_to: tuple[str, ...] = ()  # devices to allocate a down seq for, if accepted
    source: str = ""  # what the echo's seqs are allocated for (see allocate_seqs)


UpStatus = Literal["stale", "unknown_business", "replayed", "refused", "accepted"]


@dataclass(frozen=True, slots=True)
class UpOutcome:
    """What Store.accept_up did: `stale` (the household changed: read it again, nothing
    written), `unknown_business` (nothing written), `replayed` (claimed before, and not
    redelivered: nothing written), `refused` (by relayd.rules: the claim is kept,
    nothing else written) or `accepted` (claimed, the rules' write applied, and the
    seqs of `echo_to` allocated)."""

    status: UpStatus
    business: Business | None = None
    conversation: Conversation | None = None  # as it is after the message
    retry: bool = False  # it was claimed before: a redelivery of a message accepted
    refusal: tuple[str, str] | None = None  # (reason, detail) from relayd.rules
    seqs: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReplyClaim:
    """A business's reply, as Store.accept_reply applies it in one transaction.

    `business`: as the caller read it (by its AMQP user); the store checks it is still so.
    `source`: what the copies' down seqs are allocated for (see allocate_seqs)."""

    business: Business
    conversation: str
    kind: str
    redelivered: bool  # the broker marked it a redelivery: our own retry
    source: str
    now_ms: int


ReplyStatus = Literal["stale", "refused", "accepted"]


@dataclass(frozen=True, slots=True)
class ReplyOutcome:
    """What Store.accept_reply did: `stale` (the business is not as the caller read it:
    read it again; nothing written), `refused` (by relayd.rules.reply: nothing written)
    or `accepted` (the rules' write applied, and a down seq allocated for each of
    `devices`, the conversation's user's, ordered by id)."""

    status: ReplyStatus
    refusal: tuple[str, str] | None = None  # (reason, detail) from relayd.rules
    devices: tuple[Device, ...] = ()
    seqs: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UserData:
    """Everything the store holds about one user (message content is never stored)."""

    devices: list[Device]
    conversations: list[Conversation]
    highest_seq: dict[str, int]  # device -> highest up seq accepted (its replay window)
    next_seq: dict[str, int]  # device -> the next down seq it will be sent


@dataclass(frozen=True, slots=True)
class AuditRecord:
    at_ms: int
    action: str
    subject: str  # a business id, or a keyed reference (relayd.opaque.reference) of a user
    detail: dict[str, int | str | bool]


class Store(Protocol):
    """What the workers and the CLI need from storage; every method is one transaction.

    Every method raises only the store's errors: StoreUnavailableError (the database
    cannot be reached), TransientError("store_busy") (try again), StoreError (anything
    else); never a driver's own exception. The contract suite holds every backend to it.
    """

    async def close(self) -> None: ...

    async def migrate(self) -> tuple[int, int]:
        """Apply the migrations the schema lacks; return (version before, version now)."""

    async def add_business(self, business: Business) -> bool:
        """Register a business; False if it exists already (unchanged).

        In the same transaction, an audit record `business_add` with subject the business
        id and detail `{"first_party": ...}`.
        """

    async def business(self, business_id: str) -> Business | None: ...

    async def business_by_amqp_user(self, amqp_user: str) -> Business | None: ...

    async def businesses(self) -> list[Business]: ...

    async def remove_business(self, business_id: str) -> bool:
        """Unregister; when it existed, audit `business_remove` with `{"first_party": ...}`."""

    async def add_device(self, device: Device) -> bool:
        """Register a device, stamped with `created_ms` or else the store's clock; False if
        it exists already (unchanged)."""

    async def device(self, device_id: str) -> Device | None: ...

    async def devices_of(self, user: str) -> list[Device]: ...

    async def household(self, device_id: str) -> list[Device]:
        """The devices of the user who owns `device_id`, it included, ordered by id; empty
        if no such device. One read for the inbound path's sender and echo targets."""

    async def devices(self) -> list[Device]: ...

    async def remove_device(self, device_id: str) -> bool: ...

    async def conversation(self, conversation_id: str) -> Conversation | None: ...

    async def conversation_of(self, user: str, business: str) -> Conversation | None: ...

    async def business_and_conversation(
            self, business_id: str, user: str) -> tuple[Business | None, Conversation | None]:
        """The business, and `user`'s conversation with it, in one read; (None, None) if
        there is no such business."""

    async def open_conversation(self, user: str, business: str, now_ms: int,
                                rotate_on_reopen: bool,
                                make_id: Callable[[int], str]) -> Conversation:
        """Create the (user, business) conversation, or reopen it, or note activity on it,
        writing what relayd.rules.opening() decides for the row as it is in the same
        transaction (epoch, id, creation time; see there).
        """

    async def close_conversation(self, conversation_id: str, by: Party, now_ms: int) -> bool:
        """Close an open conversation; False if it was not open (nothing changed)."""

    async def accept_up(self, claim: UpClaim) -> UpOutcome:
        """Apply a user's message in one transaction: check the household is as the
        caller read it, find the business, claim (device, seq) (relayd.replay), apply
        relayd.rules.up to the conversation as it is (open, reopen, note activity or
        close it: as open_conversation and close_conversation do) and allocate the echo's
        down seqs (as allocate_seqs does). A crash leaves all of it or none."""

    async def accept_reply(self, claim: ReplyClaim) -> ReplyOutcome:
        """Apply a business's reply in one transaction: check the business is as the
        caller read it, apply relayd.rules.reply to the conversation as it is (closing
        it: as close_conversation does), and allocate a down seq for each device of the
        conversation's user (as allocate_seqs does). A crash leaves all of it or none."""

    async def claim_seq(self, device_id: str, seq: int, window: int) -> bool:
        """Accept (device, seq) once: True the first time, False for a replay or too old.

        An accepted claim stamps the device's replay state with the store's clock and the
        device's user; the state outlives the device (see prune and erase_user).
        """

    async def allocate_seqs(self, source: str, device_ids: Sequence[str],
                            now_ms: int) -> dict[str, int]:
        """The next down `seq` of each device for the message `source`.

        Asking again for the same source returns the same numbers, so a redelivered
        message never advances a device's seq twice.
        """

    async def claim_receipt(self, key: str, kind: str, now_ms: int) -> tuple[str, bool]:
        """Record that the business message `key` was `kind` (delivered or expired) unless
        something was recorded for it before; return the kind recorded first, and whether
        it is this call's. The first receipt of a message wins: one event per message."""

    async def members(self, role: str, member: str, ttl_ms: int) -> list[str]:
        """Mark `member` of `role` alive by the store's clock, forget the members of `role`
        not seen for `ttl_ms`, and return those alive, `member` included, sorted."""

    async def leave(self, role: str, member: str) -> None:
        """Forget `member` of `role` at once (it stops cleanly)."""

    async def export_user(self, user: str) -> UserData:
        """Everything held about `user`, devices and conversations ordered by id."""

    async def erase_user(self, user: str) -> dict[str, int]:
        """Delete the user's devices with their sent rows, the replay state of every device
        the user has had, and the user's closed conversations, in one transaction.

        An open conversation is left in place: its business must be told `close` first
        (relayd.gdpr does, then calls again). Returns the rows deleted per kind, as
        `devices`, `conversations`, `replay`, `sent`, and `open`: the open conversations left.
        When none is left, the user's key is destroyed too (relayd.store.pseudonym).
        """

    async def stale_conversations(self, before_ms: int) -> list[Conversation]:
        """The open conversations whose last activity (updated_ms) is before `before_ms`."""

    async def prune(self, *, conversations_before_ms: int, replay_before_ms: int,
                    sent_before_ms: int, audit_before_ms: int,
                    receipts_before_ms: int = 0) -> dict[str, int]:
        """Delete what retention lets go, each kind strictly before its cutoff:
        closed conversations by updated_ms, the replay state of devices that no longer
        exist by its last claim, sent rows by created_ms, audit records by at_ms, receipt
        claims by created_ms.

        Returns the rows deleted as `conversations`, `replay`, `sent`, `audit`, `receipts`.
        """

    async def add_audit(self, action: str, subject: str,
                        detail: Mapping[str, int | str | bool], at_ms: int) -> None:
        """Append an audit record; it must hold no content and no user or device id."""

    async def audit_log(self) -> list[AuditRecord]:
        """Every audit record, oldest first (ties in the order they were added)."""


class Vault(Protocol):
    """Where the per-user keys live (see relayd.store.pseudonym and docs/privacy.md).

    A person is a user's pseudonym with its key and its account id sealed under that key.
    """

    async def add_person(self, user: str, key: bytes, sealed: bytes) -> tuple[bytes, bytes]:
        """Give the pseudonym `user` a person unless it has one, and mark it seen now;
        return what is kept, which callers use: (key, sealed) as given, or the person it
        had, or (the vault service, relayd.vault) a key of the vault's own making with the
        same account id sealed under it."""

    async def import_person(self, user: str, key: bytes,
                            sealed: bytes) -> tuple[bytes, bytes]:
        """Keep this very (key, sealed) for `user` unless it has a person already; return
        what is kept. For moving keys between vaults (relayd.store.pseudonym.move_keys)."""

    async def people(self, users: Sequence[str]) -> dict[str, tuple[bytes, bytes]]:
        """The (key, sealed) of each pseudonym in `users` that has them."""

    async def forget_people(self, users: Sequence[str], *,
                            seen_before_ms: int | None = None) -> int:
        """Destroy the keys of `users`, so that nothing sealed under them opens again; with
        `seen_before_ms`, only those last added (add_person) before it (retention: a user
        who registers again meanwhile keeps the key). Return how many were destroyed."""

    async def all_people(self, seen_before_ms: int) -> list[str]:
        """Every pseudonym with a key, last added before `seen_before_ms`."""

    async def close(self) -> None: ...


class Backend(Store, Vault, Protocol):
    """A database as the pseudonymous layer sees it: user and device ids are pseudonyms,
    and a device row carries its sealed id."""

    async def held_people(self) -> set[str]:
        """The user pseudonyms that any row (device, conversation, replay state) names."""

    async def legacy_ids(self) -> tuple[set[str], dict[str, str | None]] | None:
        """None once the ids are pseudonyms; before that (a store written before schema 4),
        the users named anywhere, and every device id with its user (None: replay state
        only)."""

    async def pseudonymise(self, users: Mapping[str, str],
                           devices: Mapping[str, tuple[str, bytes | None]]) -> None:
        """In one transaction, rewrite every user and device id by the maps (a device id to
        its pseudonym and sealed id), drop the sent rows (their sources hold device ids),
        and mark the store converted."""


async def open_vault(key_vault: str, settings: Settings | None = None) -> Vault:
    """The key vault `key_vault` names: a `sqlite:///` file, or `amqp`, the vault service
    asked over the broker of `settings` (relayd.vault)."""
    if key_vault.startswith("sqlite:///"):
        return await open_backend(key_vault, migrate=True)
    if key_vault == "amqp" and settings is not None:
        from relayd.vault import AmqpVault

        return AmqpVault(settings)
    raise ConfigError({"store.key_vault": "must be sqlite:///PATH or amqp"})


async def open_store(url: str, *, secret: bytes, key_vault: str | None = None,
                     migrate: bool = True, pool_size: int = 10,
                     settings: Settings | None = None) -> Store:
    """The store that `url` names, its ids pseudonymised under `secret` (the relay's opaque
    secret) and its per-user keys in `key_vault` (open_vault; `settings` for `amqp`) or
    else in the store itself; the schema is migrated on open unless told not to.

    Raises StoreUnavailableError when the database cannot be reached or opened,
    StoreError when its schema is newer than this relayd knows.
    """
    from relayd.store.pseudonym import Pseudonymous

    backend = await open_backend(url, migrate=False, pool_size=pool_size)
    vault: Vault = backend
    if key_vault is not None:
        try:
            vault = await open_vault(key_vault, settings)
        except BaseException:
            await backend.close()
            raise
    store = Pseudonymous(backend, vault, secret)
    if migrate:
        try:
            await store.migrate()
        except BaseException:
            await store.close()
            raise
    return store


async def open_backend(url: str, *, migrate: bool = True, pool_size: int = 10) -> Backend:
    """The database that `url` names, as it is (no pseudonyms): for open_store, and for
    `store copy`, which moves rows as they are."""
    if url.startswith("sqlite:///"):
        from relayd.store.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///"), migrate=migrate)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from relayd.store.postgres import PostgresStore
        except ImportError:
            raise ConfigError({"store.url": "a postgresql:// store needs asyncpg: pip install"
                                            " 'relayd[postgres]'"}) from None
        return await PostgresStore.connect(url, migrate=migrate, pool_size=pool_size)
    raise ConfigError({"store.url": f"no store backend for {url.split(':', 1)[0]}"})
