"""The store's boundary: ids go in as pseudonyms, and what must be read back is sealed
under a key of each user's own, which erasure destroys (crypto-shredding).

Callers see the Store interface with real ids; the backend below never holds one:
- a user is a pseudonym, `opaque.pseudonym(secret, "user", id)`, and a device likewise
  (a keyed hash under the relay's opaque secret, which stays in the keys directory), so
  rows are found without the ids themselves;
- a person (one per user, in the Vault) holds a random key and the account id sealed
  under it (ChaCha20-Poly1305, bound to the pseudonym); each device row holds its device
  id sealed under its user's key;
- the sources of sent rows (a message id, or a device and its seq) are pseudonyms too.
Erasure deletes the rows and then the person: every copy of them anywhere (dead tuples,
WAL, replicas, backups) is then pseudonyms and ciphertext whose key no longer exists.

Since erasure deletes the rows before the person, a row whose person the vault does not
hold is not a state the store is ever left in: it means the vault is not the one that
sealed the row (restored from an older backup, a stale copy, keys still being moved). So
a read that meets one raises StoreUnavailableError (a worker holds its message and tries
it again, reading the rows again: a reader that raced an erasure then finds no row), and
no new person is made for a user whose device rows are sealed under a key the vault lacks
(it would seal new rows under a new key, and the old ones would never open again). A row
whose person exists but whose key does not open it (damage) reads as absent.

Each process keeps the people it has read in memory (the hot path reads devices on every
message), and reads a person again when its key no longer opens a row.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from relayd import log, opaque
from relayd.errors import StoreError, StoreUnavailableError, TransientError
from relayd.store import (
    AuditRecord,
    Backend,
    Business,
    Conversation,
    Device,
    Party,
    ReplyClaim,
    ReplyOutcome,
    UpClaim,
    UpOutcome,
    UserData,
    Vault,
    rows,
)

_NONCE = 12
_NOBODY_KEY, _NOBODY_SEALED = bytes(32), bytes(_NONCE + 16 + 32)  # the key does not open it
_CACHE = 65536
# How long a process keeps users' keys and opened ids in memory: after an erasure in
# another process, the erased user's key and ids leave this one's memory at its next read
# of the store this long after the cache was filled (docs/privacy.md).
CACHE_SECONDS = 60.0
_PERSON_GRACE_MS = 86_400_000
_log = log.get("relayd.store")
_EVER = 2 ** 62  # a seen_ms after every person's
_MOVE_CHUNK = 500


async def move_keys(source: Vault, target: Vault) -> tuple[int, int]:
    """Move every person of `source` (a store's own people table) into `target`, and
    destroy each in `source` once `target` keeps that very key. Return (moved, refused):
    a person `target` holds under another key stays where it is (what the store sealed
    under the first would no longer open)."""
    moved = refused = 0
    pseudonyms = await source.all_people(_EVER)
    for start in range(0, len(pseudonyms), _MOVE_CHUNK):
        held = await source.people(pseudonyms[start:start + _MOVE_CHUNK])
        done = []
        for pseudonym, (key, sealed) in held.items():
            if await target.import_person(pseudonym, key, sealed) == (key, sealed):
                done.append(pseudonym)
            else:
                refused += 1
        moved += await source.forget_people(done)
    if refused:
        _log.warning("keys_not_moved", refused=refused, moved=moved)
    return moved, refused


def seal(key: bytes, kind: str, pseudonym: str, value: str) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, value.encode(), _aad(kind, pseudonym))


def unseal(key: bytes, kind: str, pseudonym: str, sealed: bytes) -> str | None:
    """The sealed value, or None if it does not open under `key` (another key, or damage)."""
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:_NONCE], sealed[_NONCE:],
                                             _aad(kind, pseudonym)).decode()
    except (InvalidTag, ValueError):
        return None


def _aad(kind: str, pseudonym: str) -> bytes:
    return b"relayd/v1 sealed " + kind.encode() + b"\0" + pseudonym.encode()


def _held(keyless: set[str], kind: str, strict: bool) -> None:
    """StoreUnavailableError if rows were read whose person the vault does not hold (a
    listing of every row, not `strict`, leaves them out: one user's missing key must not
    stop it for everyone)."""
    if keyless:
        _log.warning("key_missing", rows=kind, users=len(keyless))
        if strict:
            raise StoreUnavailableError(
                "the key vault has no key for rows the store holds (docs/scaling.md)")


class Pseudonymous:
    """A Store over a Backend and a Vault (often the same database)."""

    def __init__(self, backend: Backend, vault: Vault, secret: bytes) -> None:
        self.backend = backend
        self.vault = vault
        self._secret = secret
        self._people: dict[str, tuple[bytes, str]] = {}  # pseudonym -> key, account id
        self._opened: dict[bytes, str] = {}  # a sealed device id -> the id, once opened
        self._absent: set[str] = set()  # pseudonyms of device ids looked up and not found
        self._cached_at = time.monotonic()

    def user_pseudonym(self, user: str) -> str:
        return self._pseudonym("user", user)

    def device_pseudonym(self, device: str) -> str:
        return self._pseudonym("device", device)

    def _pseudonym(self, kind: str, value: str) -> str:
        name = opaque.pseudonym if kind == "source" else opaque.person_pseudonym
        try:
            return name(self._secret, kind, value)
        except UnicodeEncodeError:  # as the backends fail on text they cannot encode
            raise StoreError(f"a {kind} id that cannot be encoded") from None

    async def close(self) -> None:
        await self.backend.close()
        if self.vault is not self.backend:
            await self.vault.close()

    async def migrate(self) -> tuple[int, int]:
        """Migrate the schema, then (once, for a store written before schema 4) rewrite
        every id as a pseudonym, giving each user a person; with a key vault apart from
        the store, move into it the keys the store still holds (move_keys)."""
        versions = await self.backend.migrate()
        if self.vault is not self.backend and await self.backend.all_people(_EVER):
            await move_keys(self.backend, self.vault)
        legacy = await self.backend.legacy_ids()
        if legacy is None:
            return versions
        users, devices = legacy
        names = {user: self.user_pseudonym(user) for user in users}
        keys = {user: (await self._person(user, names[user]))[0] for user in users}
        await self.backend.pseudonymise(names, {
            device: (self.device_pseudonym(device), None if user is None else
                     seal(keys[user], "device", self.device_pseudonym(device), device))
            for device, user in devices.items()})
        return versions

    async def _person(self, user: str, pseudonym: str) -> tuple[bytes, bytes]:
        """The user's person, made now if the vault has none, unless the user has device
        rows sealed already: then the vault lacks their key (see the module docstring), and
        a new one would leave them sealed for good. StoreUnavailableError, rather than
        StoreError: the request is right, the vault is not (yet); a worker holds it until
        the operator gives the store its vault back, and `relayd device add` says so."""
        if pseudonym not in await self.vault.people([pseudonym]) and any(
                row.sealed for row in await self.backend.devices_of(pseudonym)):
            _log.warning("key_missing", rows="devices", op="add_person")
            raise StoreUnavailableError(
                "the key vault has no key for a user whose rows exist (docs/scaling.md)")
        key = ChaCha20Poly1305.generate_key()
        return await self.vault.add_person(pseudonym, key,
                                           seal(key, "user", pseudonym, user))

    def _expire(self) -> None:
        """Forget every key and id held in memory, when they have been held CACHE_SECONDS
        (or there are too many): read again, an erased user's are not found."""
        now = time.monotonic()
        if (now - self._cached_at > CACHE_SECONDS or len(self._people) >= _CACHE
                or len(self._opened) >= _CACHE or len(self._absent) >= _CACHE):
            self._people.clear()
            self._opened.clear()
            self._absent.clear()
            self._cached_at = now

    async def _readable(self, pseudonyms: Sequence[str],
                        fresh: bool = False) -> dict[str, tuple[bytes, str]]:
        """The key and account id of each pseudonym that has a person, from this process's
        memory unless `fresh` (or not there)."""
        self._expire()
        wanted = set(pseudonyms)
        asked = sorted(wanted if fresh else wanted - self._people.keys())
        if asked:
            people = await self.vault.people(asked)
            for pseudonym in asked:  # a person gone from the vault (erased) goes here too
                self._people.pop(pseudonym, None)
            for pseudonym, (key, sealed) in people.items():
                user = unseal(key, "user", pseudonym, sealed)
                if user is not None:
                    self._people[pseudonym] = key, user
        return {p: self._people[p] for p in wanted if p in self._people}

    async def _devices(self, found: Sequence[Device], strict: bool = True) -> list[Device]:
        """The rows with their real ids, leaving out those that no longer open."""
        return [device for _, device in await self._opened_rows(found, strict)]

    async def _opened_rows(self, found: Sequence[Device],
                           strict: bool = True) -> list[tuple[str, Device]]:
        """Each row that opens, as (its pseudonym, the device with its real ids); a row
        whose person the vault lacks raises StoreUnavailableError (_held). A key held in
        memory that no longer opens a row (the user was erased and came back) is read
        again."""
        self._expire()
        opened: dict[int, tuple[str, Device]] = {}
        keyless: set[str] = set()
        for fresh in (False, True):
            left = [(i, r) for i, r in enumerate(found) if i not in opened and r.sealed]
            if not left:
                keyless = set()
                break
            people = await self._readable([r.user for _, r in left], fresh)
            keyless = {row.user for _, row in left} - people.keys()
            for i, row in left:
                if row.user in people and row.sealed is not None:
                    key, user = people[row.user]
                    device = self._opened.get(row.sealed) or unseal(
                        key, "device", row.id, row.sealed)
                    if device is not None:
                        self._opened[row.sealed] = device
                        opened[i] = row.id, Device(device, user, row.kem, row.enc_key,
                                                   row.sign_key, row.created_ms)
        _held(keyless, "devices", strict)
        return [opened[i] for i in sorted(opened)]

    async def _conversation(self, row: Conversation | None) -> Conversation | None:
        if row is None:
            return None
        return (await self._conversations([row]))[0]

    async def _conversations(self, found: Sequence[Conversation],
                             strict: bool = True) -> list[Conversation]:
        wanted = [c.user for c in found]
        people = await self._readable(wanted)
        if people.keys() < set(wanted):  # read again, not from memory: then it is missing
            people = await self._readable(wanted, fresh=True)
        _held(set(wanted) - people.keys(), "conversations", strict)
        return [replace(c, user=people[c.user][1]) for c in found if c.user in people]

    # Businesses hold no personal data: passed through as they are.

    async def add_business(self, business: Business) -> bool:
        return await self.backend.add_business(business)

    async def business(self, business_id: str) -> Business | None:
        return await self.backend.business(business_id)

    async def business_by_amqp_user(self, amqp_user: str) -> Business | None:
        return await self.backend.business_by_amqp_user(amqp_user)

    async def businesses(self) -> list[Business]:
        return await self.backend.businesses()

    async def remove_business(self, business_id: str) -> bool:
        return await self.backend.remove_business(business_id)

    async def add_device(self, device: Device) -> bool:
        """Register the device under its user's key. An erasure of the user that destroys
        the key in between would leave a row nothing opens: then the row goes and the
        registration is tried again, with a new key."""
        user, pseudonym = self.user_pseudonym(device.user), self.device_pseudonym(device.id)
        for _ in range(3):
            key, _ = await self._person(device.user, user)
            added = await self.backend.add_device(replace(
                device, id=pseudonym, user=user,
                sealed=seal(key, "device", pseudonym, device.id)))
            kept = await self.vault.people([user])
            if not added or (user in kept and kept[user][0] == key):
                return added
            await self.backend.remove_device(pseudonym)
        raise TransientError("store_busy", "the user was erased at each try to add a device")

    async def device(self, device_id: str) -> Device | None:
        pseudonym = self.device_pseudonym(device_id)
        row = await self.backend.device(pseudonym)
        if row is None:
            await self._as_if_found(pseudonym)
            return None
        opened = await self._devices([row])
        return opened[0] if opened else None

    async def _as_if_found(self, pseudonym: str) -> None:
        """For a device id no row has, the work that reading a registered one does, and
        remembered as long: the vault asked for a person (none has a device's pseudonym),
        a sealed account id and a sealed device id opened. So the edge's login takes as
        long for an unknown device as for a registered one (docs/protocol.md section 12)."""
        self._expire()
        if pseudonym in self._absent:
            return
        await self.vault.people([pseudonym])
        for kind in ("user", "device"):
            unseal(_NOBODY_KEY, kind, pseudonym, _NOBODY_SEALED)
        self._absent.add(pseudonym)

    async def devices_of(self, user: str) -> list[Device]:
        found = await self._devices(await self.backend.devices_of(self.user_pseudonym(user)))
        return sorted(found, key=lambda d: d.id)

    async def household(self, device_id: str) -> list[Device]:
        found = await self._devices(await self.backend.household(
            self.device_pseudonym(device_id)))
        return sorted(found, key=lambda d: d.id)

    async def devices(self) -> list[Device]:
        found = await self._devices(await self.backend.devices(), strict=False)
        return sorted(found, key=lambda d: (d.user, d.id))

    async def remove_device(self, device_id: str) -> bool:
        return await self.backend.remove_device(self.device_pseudonym(device_id))

    async def conversation(self, conversation_id: str) -> Conversation | None:
        return await self._conversation(await self.backend.conversation(conversation_id))

    async def conversation_of(self, user: str, business: str) -> Conversation | None:
        return await self._conversation(await self.backend.conversation_of(
            self.user_pseudonym(user), business))

    async def business_and_conversation(
            self, business_id: str, user: str) -> tuple[Business | None, Conversation | None]:
        business, conversation = await self.backend.business_and_conversation(
            business_id, self.user_pseudonym(user))
        return business, None if conversation is None else replace(conversation, user=user)

    async def open_conversation(self, user: str, business: str, now_ms: int,
                                rotate_on_reopen: bool,
                                make_id: Callable[[int], str]) -> Conversation:
        pseudonym = self.user_pseudonym(user)
        if pseudonym not in self._people:  # known here: it has a person (see _readable)
            key, _ = await self._person(user, pseudonym)
            self._people[pseudonym] = key, user
        opened = await self.backend.open_conversation(pseudonym, business, now_ms,
                                                      rotate_on_reopen, make_id)
        return replace(opened, user=user)

    async def close_conversation(self, conversation_id: str, by: Party, now_ms: int) -> bool:
        return await self.backend.close_conversation(conversation_id, by, now_ms)

    async def accept_up(self, claim: UpClaim) -> UpOutcome:
        names = {self.device_pseudonym(d): d for d in claim.echo_to}
        household = sorted((Device(self.device_pseudonym(d.id), self.user_pseudonym(d.user),
                                   d.kem, d.enc_key, d.sign_key) for d in claim.household),
                           key=lambda d: d.id)  # as the backend orders it
        outcome = await self.backend.accept_up(replace(
            claim, household=tuple(household), device=self.device_pseudonym(claim.device),
            echo_to=tuple(names),  # the source names the echo's seqs: none, no name
            source=self._pseudonym("source", claim.source) if names else ""))
        user = next((d.user for d in claim.household if d.id == claim.device), None)
        conversation = outcome.conversation
        return replace(
            outcome, seqs={names[d]: seq for d, seq in outcome.seqs.items() if d in names},
            conversation=None if conversation is None or user is None else replace(
                conversation, user=user))

    async def accept_reply(self, claim: ReplyClaim) -> ReplyOutcome:
        outcome = await self.backend.accept_reply(
            replace(claim, source=self._pseudonym("source", claim.source)))
        if outcome.status != "accepted":
            return outcome
        opened = sorted(await self._opened_rows(outcome.devices), key=lambda r: r[1].id)
        return replace(outcome, devices=tuple(device for _, device in opened), seqs={
            device.id: outcome.seqs[row] for row, device in opened if row in outcome.seqs})

    async def claim_seq(self, device_id: str, seq: int, window: int) -> bool:
        return await self.backend.claim_seq(self.device_pseudonym(device_id), seq, window)

    async def allocate_seqs(self, source: str, device_ids: Sequence[str],
                            now_ms: int) -> dict[str, int]:
        names = {self.device_pseudonym(d): d for d in device_ids}
        seqs = await self.backend.allocate_seqs(self._pseudonym("source", source),
                                                list(names), now_ms)
        return {names[pseudonym]: seq for pseudonym, seq in seqs.items()}

    async def claim_receipt(self, key: str, kind: str, now_ms: int) -> tuple[str, bool]:
        # `key` is a hash of a business and its message id already: no id to hide
        return await self.backend.claim_receipt(key, kind, now_ms)

    async def members(self, role: str, member: str, ttl_ms: int) -> list[str]:
        return await self.backend.members(role, member, ttl_ms)

    async def leave(self, role: str, member: str) -> None:
        await self.backend.leave(role, member)

    async def export_user(self, user: str) -> UserData:
        held = await self.backend.export_user(self.user_pseudonym(user))
        # what opens: a row whose key the vault lacks names no id anyone can read, and
        # erasure (relayd.gdpr, which reads this first) must delete such rows too
        devices = await self._devices(held.devices, strict=False)
        names = {self.device_pseudonym(d.id): d.id for d in devices}
        return UserData(
            sorted(devices, key=lambda d: d.id),
            [replace(c, user=user) for c in held.conversations],
            {names[d]: seq for d, seq in held.highest_seq.items() if d in names},
            {names[d]: seq for d, seq in held.next_seq.items() if d in names})

    async def erase_user(self, user: str) -> dict[str, int]:
        """Delete the rows, and once no conversation is left open, destroy the user's key:
        whatever copy of the rows remains anywhere no longer opens."""
        pseudonym = self.user_pseudonym(user)
        counts = await self.backend.erase_user(pseudonym)
        if counts["open"] == 0:
            await self.vault.forget_people([pseudonym])
            self._people.pop(pseudonym, None)
            self._opened.clear()  # rare: nothing of an erased user opens from memory
        return counts

    async def stale_conversations(self, before_ms: int) -> list[Conversation]:
        return await self._conversations(await self.backend.stale_conversations(before_ms),
                                         strict=False)

    async def prune(self, *, conversations_before_ms: int, replay_before_ms: int,
                    sent_before_ms: int, audit_before_ms: int,
                    receipts_before_ms: int = 0) -> dict[str, int]:
        """Also destroy the keys of people no row names any longer, except those added in
        the last day: a device being registered has its person before its row (and one
        added during the pass is not forgotten: forget_people's seen_before_ms)."""
        counts = await self.backend.prune(
            conversations_before_ms=conversations_before_ms, replay_before_ms=replay_before_ms,
            sent_before_ms=sent_before_ms, audit_before_ms=audit_before_ms,
            receipts_before_ms=receipts_before_ms)
        held = await self.backend.held_people()
        recent = rows.now_ms() - _PERSON_GRACE_MS
        gone = [p for p in await self.vault.all_people(recent) if p not in held]
        # only those still not seen since: one who registers meanwhile (add_person marks
        # the old key seen, and it is reused) keeps the key the new rows are sealed under
        await self.vault.forget_people(gone, seen_before_ms=recent)
        for pseudonym in gone:
            self._people.pop(pseudonym, None)
        if gone:
            self._opened.clear()
        return counts

    async def add_audit(self, action: str, subject: str,
                        detail: Mapping[str, int | str | bool], at_ms: int) -> None:
        await self.backend.add_audit(action, subject, detail, at_ms)

    async def audit_log(self) -> list[AuditRecord]:
        return await self.backend.audit_log()
