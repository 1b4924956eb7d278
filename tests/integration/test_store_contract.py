"""The store contract: every backend must pass these same cases."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from relayd import rules
from relayd.crypto import Kem
from relayd.errors import RelaydError, StoreError, StoreUnavailableError
from relayd.payload import is_user_id
from relayd.replay import ReplayWindow
from relayd.store import (
    AuditRecord,
    Business,
    Conversation,
    Device,
    ReplyClaim,
    Store,
    UpClaim,
    UpOutcome,
    open_store,
    pseudonym,
)
from relayd.store.pseudonym import Pseudonymous
from relayd.store.sqlite import MIGRATIONS
from tests.support import postgres

BACKENDS = ["sqlite", "postgresql"]
SECRET = b"o" * 32  # the relay's opaque secret, which the store's pseudonyms are keyed by


@pytest.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty store of each backend: a SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/relayd.db"
    else:
        async with postgres.database() as url:
            yield url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    backend = await open_store(store_url, secret=SECRET)
    yield backend
    await backend.close()


def device(device_id: str, user: str = "u1", created_ms: int | None = None) -> Device:
    return Device(device_id, user, Kem.X25519, b"e" * 32, b"s" * 32, created_ms)


async def set_version(store_url: str, version: int) -> None:
    """Mark the schema as at `version`, as a relayd of that schema would have."""
    if store_url.startswith("sqlite:///"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            db.execute(f"PRAGMA user_version = {version}")
        return
    conn = await asyncpg.connect(store_url)
    try:
        await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
    finally:
        await conn.close()


async def get_version(store_url: str) -> int:
    if store_url.startswith("sqlite:///"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])
    conn = await asyncpg.connect(store_url)
    try:
        return int(await conn.fetchval("SELECT max(version) FROM schema_version"))
    finally:
        await conn.close()


def latest(store_url: str) -> int:
    """The schema version this relayd migrates the backend of `store_url` to."""
    from relayd.store.postgres import MIGRATIONS as PG_MIGRATIONS

    return len(MIGRATIONS if store_url.startswith("sqlite:///") else PG_MIGRATIONS)


def make_id(user: str, business: str) -> Callable[[int], str]:
    return lambda epoch: f"{user}-{business}-{epoch}".ljust(32, "x")[:32]


async def users(store: Store, count: int) -> list[tuple[Device, ...]]:
    """acme, and `count` users u0, u1... of one device each (d0, d1...): their households."""
    await store.add_business(ACME)
    households = []
    for i in range(count):
        await store.add_device(device(f"d{i}", f"u{i}"))
        households.append(tuple(await store.household(f"d{i}")))
    return households


class TestBusinesses:
    async def test_add_is_idempotent_and_lookups_work(self, store: Store) -> None:
        """A business is added once, found by id and by AMQP user, listed and removed."""
        assert await store.add_business(Business("acme", "acme-user"))
        assert not await store.add_business(Business("acme", "acme-user"))
        assert await store.business("acme") == Business("acme", "acme-user", False)
        assert await store.business_by_amqp_user("acme-user") == Business("acme", "acme-user")
        assert await store.business_by_amqp_user("nobody") is None
        assert [b.id for b in await store.businesses()] == ["acme"]
        assert await store.remove_business("acme")
        assert not await store.remove_business("acme")
        assert await store.business("acme") is None

    async def test_first_party_flag_round_trips(self, store: Store) -> None:
        """The first-party mark is stored and read back."""
        await store.add_business(Business("desk", "desk-user", first_party=True))
        found = await store.business("desk")
        assert found is not None
        assert found.first_party

    async def test_add_and_remove_are_audited(self, store: Store) -> None:
        """Adding and removing a business each leave one audit record with the first-party mark."""
        await store.add_business(Business("desk", "desk-user", first_party=True))
        await store.add_business(Business("desk", "desk-user", first_party=True))
        await store.add_business(Business("acme", "acme-user"))
        await store.remove_business("desk")
        await store.remove_business("desk")
        log = await store.audit_log()
        assert [(r.action, r.subject, r.detail) for r in log] == [
            ("business_add", "desk", {"first_party": True}),
            ("business_add", "acme", {"first_party": False}),
            ("business_remove", "desk", {"first_party": True}),
        ]
        assert log[0].at_ms <= log[1].at_ms <= log[2].at_ms
        assert log[0].at_ms > 1_700_000_000_000  # the store's clock, in unix milliseconds


class TestDevices:
    async def test_devices_by_user(self, store: Store) -> None:
        """Devices are found by id and by user, and removal takes them out of both."""
        assert await store.add_device(device("d1", "u1"))
        assert not await store.add_device(device("d1", "u1"))
        await store.add_device(device("d2", "u1"))
        await store.add_device(device("d3", "u2"))
        assert await store.device("d1") == device("d1", "u1")
        assert [d.id for d in await store.devices_of("u1")] == ["d1", "d2"]
        assert await store.remove_device("d1")
        assert await store.device("d1") is None
        assert [d.id for d in await store.devices_of("u1")] == ["d2"]
        assert len(await store.devices()) == 2

    async def test_household(self, store: Store) -> None:
        """A device's household is its user's devices, it included; none for a stranger."""
        for name, user in (("phone", "u1"), ("laptop", "u1"), ("tablet", "u2")):
            await store.add_device(device(name, user))
        assert [d.id for d in await store.household("phone")] == ["laptop", "phone"]
        assert [d.id for d in await store.household("tablet")] == ["tablet"]
        assert await store.household("nobody") == []

    async def test_business_and_conversation(self, store: Store) -> None:
        """One read gives the business and the user's conversation with it, if any."""
        acme = Business("acme", "acme-user")
        await store.add_business(acme)
        assert await store.business_and_conversation("acme", "u1") == (acme, None)
        opened = await store.open_conversation("u1", "acme", 1, False, make_id("u1", "acme"))
        assert await store.business_and_conversation("acme", "u1") == (acme, opened)
        assert await store.business_and_conversation("acme", "u2") == (acme, None)
        assert await store.business_and_conversation("other", "u1") == (None, None)

    async def test_creation_time(self, store: Store) -> None:
        """A device keeps the creation time it was given, or else gets the store's clock."""
        await store.add_device(device("d1", created_ms=1234))
        await store.add_device(device("d2"))
        first, second = await store.devices_of("u1")
        assert first.created_ms == 1234
        assert second.created_ms is not None
        assert second.created_ms > 1_700_000_000_000
        found = await store.device("d1")
        assert found is not None
        assert found.created_ms == 1234


class TestConversations:
    async def test_open_close_reopen_stable(self, store: Store) -> None:
        """Opening creates, notes activity, closes once, and reopens with the same id."""
        ids = make_id("u1", "acme")
        opened = await store.open_conversation("u1", "acme", 1000, False, ids)
        assert (opened.state, opened.epoch, opened.created_ms) == ("open", 0, 1000)
        again = await store.open_conversation("u1", "acme", 2000, False, ids)
        assert (again.id, again.updated_ms, again.created_ms) == (opened.id, 2000, 1000)
        assert await store.conversation(opened.id) == again
        assert await store.close_conversation(opened.id, "user", 3000)
        assert not await store.close_conversation(opened.id, "user", 3001)
        closed = await store.conversation_of("u1", "acme")
        assert closed is not None
        assert (closed.state, closed.closed_by, closed.updated_ms) == ("closed", "user", 3000)
        reopened = await store.open_conversation("u1", "acme", 4000, False, ids)
        assert (reopened.id, reopened.state, reopened.closed_by) == (opened.id, "open", None)

    async def test_rotate_on_reopen_after_user_close(self, store: Store) -> None:
        """With rotation, a conversation the user closed reopens under a new epoch and id."""
        ids = make_id("u1", "acme")
        first = await store.open_conversation("u1", "acme", 1, True, ids)
        assert 0 <= first.epoch < 2**62
        assert first.id == ids(first.epoch)
        await store.close_conversation(first.id, "user", 2)
        second = await store.open_conversation("u1", "acme", 3, True, ids)
        assert second.epoch == first.epoch + 1
        assert second.id != first.id
        assert await store.conversation(first.id) is None
        await store.close_conversation(second.id, "business", 4)
        third = await store.open_conversation("u1", "acme", 5, True, ids)
        assert (third.epoch, third.id) == (second.epoch, second.id)  # no rotation

    async def test_fresh_conversation_after_its_row_is_gone(self, store: Store) -> None:
        """Once the row is deleted, stable gives the same id again and rotation a new one."""
        async def fresh(rotate: bool) -> str:
            opened = await store.open_conversation("u1", "acme", 1, rotate, lambda e: f"{e:032}")
            await store.close_conversation(opened.id, "user", 2)
            assert (await store.erase_user("u1"))["conversations"] == 1
            return opened.id

        assert await fresh(False) == await fresh(False) == f"{0:032}"
        assert len({await fresh(True) for _ in range(3)}) == 3


class TestReplay:
    async def test_claim_once(self, store: Store) -> None:
        """Each (device, seq) is claimed once, reordering inside the window is fine."""
        assert await store.claim_seq("d1", 5, 64)
        assert not await store.claim_seq("d1", 5, 64)
        assert await store.claim_seq("d1", 3, 64)
        assert await store.claim_seq("d2", 5, 64)
        assert await store.claim_seq("d1", 200, 64)
        assert not await store.claim_seq("d1", 136, 64)  # fell out of the window
        assert await store.claim_seq("d1", 137, 64)


def up(store_household: tuple[Device, ...], seq: int, kind: str = "message", *,
       device_id: str = "d1", business: str = "acme", redelivered: bool = False,
       now_ms: int = 1_000, echo_to: tuple[str, ...] = (),
       make: Callable[[int], str] | None = None) -> UpClaim:
    """An UpClaim of `device_id` (user u1) as the inbound path makes one."""
    return UpClaim(store_household, device_id, seq, 64, business, kind, redelivered, now_ms,
                   False, make or make_id("u1", business), echo_to, f"up:{device_id}:{seq}")


class TestAcceptUp:
    """Store.accept_up: claim, conversation rules and echo seqs in one transaction."""

    @pytest.fixture
    async def household(self, store: Store) -> tuple[Device, ...]:
        await store.add_business(Business("acme", "acme-user"))
        for name in ("d1", "d2"):
            await store.add_device(device(name, created_ms=1))
        return tuple(await store.household("d1"))

    async def test_opens_claims_and_allocates(self, store: Store,
                                              household: tuple[Device, ...]) -> None:
        """A first message opens the conversation, claims its seq and numbers the echo."""
        outcome = await store.accept_up(up(household, 1, "start", echo_to=("d2",)))
        assert outcome.status == "accepted"
        assert outcome.business == Business("acme", "acme-user")
        assert outcome.conversation == await store.conversation_of("u1", "acme")
        assert not outcome.retry
        assert dict(outcome.seqs) == {"d2": 1}
        assert not await store.claim_seq("d1", 1, 64)

    async def test_claims_in_hand_at_once_each_have_their_own_outcome(
            self, store: Store) -> None:
        """Messages of many users claimed at once (together in one statement on
        PostgreSQL, one commit on SQLite) each get their own outcome; one that fails (here
        it would open its conversation under an id another user's conversation has) fails
        alone, writing nothing, and costs the others nothing."""
        households = await users(store, 8)
        taken = await store.accept_up(up(households[7], 1, "start", device_id="d7",
                                         make=make_id("u7", "acme")))
        assert taken.conversation is not None

        def claim(i: int) -> UpClaim:
            make = (lambda _: taken.conversation.id) if i == 3 else make_id(f"u{i}", "acme")
            return up(households[i], 1, "start", device_id=f"d{i}", make=make)

        outcomes = await asyncio.gather(*(store.accept_up(claim(i)) for i in range(7)),
                                        return_exceptions=True)
        assert isinstance(outcomes[3], RelaydError), outcomes[3]
        for i, outcome in enumerate(outcomes):
            if i != 3:
                assert isinstance(outcome, UpOutcome), outcome
                assert outcome.status == "accepted"
                assert outcome.conversation == await store.conversation_of(f"u{i}", "acme")
        assert await store.conversation_of("u3", "acme") is None
        again = await store.accept_up(up(households[3], 1, "start", device_id="d3",
                                         make=make_id("u3", "acme")))
        assert again.status == "accepted"  # its seq was not claimed by the failed attempt

    async def test_replayed_and_redelivered(self, store: Store,
                                            household: tuple[Device, ...]) -> None:
        """The same seq again is `replayed`, unless the broker redelivered it: then it is
        a retry, with the same echo seqs."""
        await store.accept_up(up(household, 1, "start", echo_to=("d2",)))
        assert (await store.accept_up(up(household, 1, "start"))).status == "replayed"
        again = await store.accept_up(up(household, 1, "start", redelivered=True,
                                         echo_to=("d2",)))
        assert (again.status, again.retry, dict(again.seqs)) == ("accepted", True, {"d2": 1})

    async def test_refused_by_the_rules_keeps_the_claim(self, store: Store,
                                                        household: tuple[Device, ...]) -> None:
        """A message into a conversation the user closed is refused; its seq stays used."""
        await store.accept_up(up(household, 1, "start"))
        assert (await store.accept_up(up(household, 2, "close"))).status == "accepted"
        closed = await store.conversation_of("u1", "acme")
        assert closed is not None
        assert (closed.state, closed.closed_by) == ("closed", "user")
        refused = await store.accept_up(up(household, 3, "reaction"))
        assert (refused.status, refused.refusal) == ("refused", (
            "conversation_closed", "the conversation is closed"))
        assert not await store.claim_seq("d1", 3, 64)

    async def test_stale_household_or_unknown_business_writes_nothing(
            self, store: Store, household: tuple[Device, ...]) -> None:
        """A household that changed since it was read, or a business that does not
        exist: nothing claimed, nothing opened."""
        changed = (household[0], Device("d2", "u1", Kem.X25519, b"e" * 32, b"t" * 32))
        assert (await store.accept_up(up(changed, 1, "start"))).status == "stale"
        assert (await store.accept_up(up(household, 1, "start", business="nobody"))
                ).status == "unknown_business"
        assert await store.conversation_of("u1", "acme") is None
        assert await store.claim_seq("d1", 1, 64)

    async def test_a_failure_after_the_claim_undoes_the_claim(
            self, store: Store, household: tuple[Device, ...]) -> None:
        """One transaction (issue 15): when opening the conversation fails, the claim
        is not kept either, so the redelivery is a first time and opens it."""
        def broken(epoch: int) -> str:
            raise RuntimeError("the id cannot be made")

        with pytest.raises(StoreError):
            await store.accept_up(up(household, 1, "start", make=broken))
        assert await store.conversation_of("u1", "acme") is None
        outcome = await store.accept_up(up(household, 1, "start", redelivered=True))
        assert (outcome.status, outcome.retry) == ("accepted", False)


ACME = Business("acme", "acme-user")


def reply_claim(conversation: str, kind: str = "message", *, business: Business = ACME,
                redelivered: bool = False, source: str = "reply:acme:r1",
                now_ms: int = 2_000) -> ReplyClaim:
    """A ReplyClaim as the outbound path makes one."""
    return ReplyClaim(business, conversation, kind, redelivered, source, now_ms)


class TestAcceptReply:
    """Store.accept_reply: business check, conversation rules and seqs in one transaction."""

    @pytest.fixture
    async def conversation(self, store: Store) -> Conversation:
        await store.add_business(ACME)
        await store.add_business(Business("other", "other-user"))
        for name in ("d2", "d1"):
            await store.add_device(device(name, created_ms=1))
        await store.add_device(device("x1", user="u2", created_ms=1))
        return await store.open_conversation("u1", "acme", 1_000, False, make_id("u1", "acme"))

    async def test_allocates_a_seq_per_device_of_the_user(
            self, store: Store, conversation: Conversation) -> None:
        """Every device of the conversation's user, in id order, gets its next seq; the
        same source again gets the same seqs (a retry), another source the next ones."""
        outcome = await store.accept_reply(reply_claim(conversation.id))
        assert outcome.status == "accepted"
        assert outcome.refusal is None
        assert outcome.devices == tuple(await store.devices_of("u1"))
        assert [d.id for d in outcome.devices] == ["d1", "d2"]
        assert dict(outcome.seqs) == {"d1": 1, "d2": 1}
        again = await store.accept_reply(reply_claim(conversation.id, redelivered=True))
        assert dict(again.seqs) == {"d1": 1, "d2": 1}
        after = await store.accept_reply(reply_claim(conversation.id, source="reply:acme:r2"))
        assert dict(after.seqs) == {"d1": 2, "d2": 2}
        assert await store.allocate_seqs("reply:acme:r1", ["d1", "d2"], 3) == {"d1": 1, "d2": 1}

    async def test_a_close_is_written_and_its_retry_delivered(
            self, store: Store, conversation: Conversation) -> None:
        """A close closes the conversation (by the business); its own retry is delivered
        again with the same seqs, and any other reply after it is refused."""
        closed = await store.accept_reply(reply_claim(conversation.id, "close"))
        assert (closed.status, dict(closed.seqs)) == ("accepted", {"d1": 1, "d2": 1})
        now = await store.conversation(conversation.id)
        assert now is not None
        assert (now.state, now.closed_by, now.updated_ms) == ("closed", "business", 2_000)
        retry = await store.accept_reply(reply_claim(conversation.id, "close",
                                                     redelivered=True))
        assert (retry.status, dict(retry.seqs)) == ("accepted", {"d1": 1, "d2": 1})
        refused = await store.accept_reply(reply_claim(conversation.id,
                                                       source="reply:acme:r2"))
        assert (refused.status, refused.refusal) == ("refused", (
            "conversation_closed", "the conversation is closed"))

    async def test_refusals_write_nothing(self, store: Store,
                                          conversation: Conversation) -> None:
        """A reply to no conversation, to another business's, or a close from another
        business: refused as relayd.rules says, no seq allocated, nothing closed."""
        unknown = await store.accept_reply(reply_claim("n" * 32))
        assert (unknown.status, unknown.refusal) == ("refused", (
            "unknown_conversation", "no such conversation"))
        theirs = await store.accept_reply(reply_claim(
            conversation.id, "close", business=Business("other", "other-user")))
        assert (theirs.status, theirs.refusal) == ("refused", (
            "not_your_conversation", "this conversation is not yours"))
        assert (theirs.devices, dict(theirs.seqs)) == ((), {})
        assert conversation == await store.conversation(conversation.id)
        assert await store.allocate_seqs("m", ["d1", "d2"], 3) == {"d1": 1, "d2": 1}

    async def test_a_business_not_as_read_is_stale(self, store: Store,
                                                    conversation: Conversation) -> None:
        """A business that is gone, or whose AMQP user or first-party flag changed since
        the caller read it: `stale`, nothing written."""
        for changed in (Business("acme", "someone-else"), Business("acme", "acme-user", True),
                        Business("gone", "acme-user")):
            outcome = await store.accept_reply(reply_claim(conversation.id, "close",
                                                           business=changed))
            assert outcome.status == "stale"
        assert conversation == await store.conversation(conversation.id)
        assert await store.allocate_seqs("m", ["d1"], 3) == {"d1": 1}

    async def test_a_user_without_devices(self, store: Store) -> None:
        """Accepted, with nothing to number."""
        await store.add_business(ACME)
        conversation = await store.open_conversation("u9", "acme", 1_000, False,
                                                     make_id("u9", "acme"))
        outcome = await store.accept_reply(reply_claim(conversation.id))
        assert (outcome.status, outcome.devices, dict(outcome.seqs)) == ("accepted", (), {})


class TestSeqs:
    async def test_allocation_is_per_device_and_idempotent(self, store: Store) -> None:
        """Down seqs count per device from 1, and the same source gets the same numbers."""
        await store.add_device(device("d1"))
        await store.add_device(device("d2"))
        assert await store.allocate_seqs("m1", ["d1", "d2"], 1) == {"d1": 1, "d2": 1}
        assert await store.allocate_seqs("m2", ["d1"], 2) == {"d1": 2}
        assert await store.allocate_seqs("m1", ["d1", "d2"], 3) == {"d1": 1, "d2": 1}
        assert await store.allocate_seqs("m3", ["d2", "gone"], 4) == {"d2": 2}

    async def test_a_retry_reuses_its_seqs_and_a_removed_device_gets_none(
            self, store: Store) -> None:
        """Allocating again for the same source gives each device the seq it had; a
        device added since gets its next one, and a device removed gets none."""
        for name in ("d1", "d2", "d3"):
            await store.add_device(device(name))
        assert await store.allocate_seqs("m0", ["d1", "d2", "d3"], 1) == {
            "d1": 1, "d2": 1, "d3": 1}
        assert await store.allocate_seqs("m1", ["d1", "d2"], 2) == {"d1": 2, "d2": 2}
        assert await store.remove_device("d2")
        await store.add_device(device("d4"))
        again = await store.allocate_seqs("m1", ["d1", "d2", "d3", "d4"], 3)
        assert again == {"d1": 2, "d3": 2, "d4": 1}
        assert await store.allocate_seqs("m1", ["d4", "d3", "d1"], 4) == again
        assert await store.allocate_seqs("m2", ["d1", "d3", "d4"], 5) == {
            "d1": 3, "d3": 3, "d4": 2}


RACE = """
import asyncio, sys
from relayd.store import open_store
async def main():
    store = await open_store(sys.argv[1], secret=b"o" * 32, pool_size=4)
    mine = {action}
    print(mine)
    await store.close()
asyncio.run(main())
"""
CLAIMS = RACE.format(action='[s for s in range(1, 201) if await store.claim_seq("d1", s, 1024)]')
ALLOCATIONS = RACE.format(action='[await store.allocate_seqs(f"m{n}", ["d1", "d2"], n)'
                          ' for n in range(1, 51)]')
CLOSES = RACE.format(action='sum([await store.close_conversation(sys.argv[2], "user", n)'
                     ' for n in range(20)])')
OPENS = RACE.format(action='[(await store.open_conversation("u1", "acme", n, True,'
                    ' lambda e: str(e).ljust(32, "x"))).epoch for n in range(20)]')


ACCEPTS = """
import asyncio, sys
from relayd.errors import TransientError
from relayd.store import UpClaim, open_store
async def accept(store, household, seq):
    for _ in range(100):
        try:
            outcome = await store.accept_up(UpClaim(household, "d1", seq, 1024, "acme",
                "start", False, seq, False, lambda e: "c".ljust(32, "x"), ("d2",), str(seq)))
            return outcome.status == "accepted"
        except TransientError:  # store_busy: a lost race, tried again
            await asyncio.sleep(0.01)
    raise AssertionError("never settled")
async def main():
    store = await open_store(sys.argv[1], secret=b"o" * 32, pool_size=4)
    household = tuple(await store.household("d1"))
    print([s for s in range(1, 51) if await accept(store, household, s)])
    await store.close()
asyncio.run(main())
"""


def race(script: str, *args: str, processes: int = 4) -> list[Any]:
    """Run `script` in several processes at once; return what each printed."""
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
             for _ in range(processes)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return [eval(out) for out in outputs]  # noqa: S307 - our own scripts print literals


class TestProcesses:
    """Several processes (as on several hosts) change the same rows at once."""

    async def test_each_seq_is_claimed_once(self, store: Store, store_url: str) -> None:
        """Four processes racing for the same seqs: each seq is won by exactly one."""
        won = [s for mine in race(CLAIMS, store_url) for s in mine]
        assert sorted(won) == list(range(1, 201))

    async def test_allocations_are_idempotent_across_processes(self, store: Store,
                                                               store_url: str) -> None:
        """Racing allocations of the same sources agree, and each device counts 1..50."""
        await store.add_device(device("d1"))
        await store.add_device(device("d2"))
        results = race(ALLOCATIONS, store_url)
        assert all(r == results[0] for r in results)
        assert results[0] == [{"d1": n, "d2": n} for n in range(1, 51)]
        assert await store.allocate_seqs("m51", ["d1"], 51) == {"d1": 51}

    async def test_a_close_is_applied_once(self, store: Store, store_url: str) -> None:
        """Many racing closes of one conversation: exactly one of them closes it."""
        opened = await store.open_conversation("u1", "acme", 1, False, make_id("u1", "acme"))
        assert sum(race(CLOSES, store_url, opened.id)) == 1

    async def test_racing_messages_are_each_accepted_once(self, store: Store,
                                                          store_url: str) -> None:
        """Processes applying the same messages at once: each is accepted by exactly one,
        one conversation is opened, and each message's echo gets one seq."""
        await store.add_business(Business("acme", "acme-user"))
        await store.add_device(device("d1"))
        await store.add_device(device("d2"))
        won = [s for mine in race(ACCEPTS, store_url) for s in mine]
        assert sorted(won) == list(range(1, 51))
        assert await store.allocate_seqs("51", ["d2"], 51) == {"d2": 51}
        conversation = await store.conversation_of("u1", "acme")
        assert conversation is not None
        assert conversation.epoch == 0

    async def test_racing_opens_make_one_conversation(self, store: Store,
                                                      store_url: str) -> None:
        """Processes opening the same conversation at once all get the same one."""
        results = race(OPENS, store_url)
        assert len({epoch for r in results for epoch in r}) == 1
        conversation = await store.conversation_of("u1", "acme")
        assert conversation is not None
        assert conversation.state == "open"


class TestMembers:
    """The processes alive, among which relayd.shard shares the shards out."""

    async def test_alive_members_sorted_per_role(self, store: Store) -> None:
        """Each call marks its member alive and lists the role's live members, sorted."""
        assert await store.members("inbound", "b", 60_000) == ["b"]
        assert await store.members("inbound", "a", 60_000) == ["a", "b"]
        assert await store.members("outbound", "c", 60_000) == ["c"]
        assert await store.members("inbound", "b", 60_000) == ["a", "b"]

    async def test_silent_members_are_forgotten(self, store: Store) -> None:
        """A member not seen for the ttl is dropped; marking it again brings it back."""
        await store.members("inbound", "old", 60_000)
        await asyncio.sleep(0.05)
        assert await store.members("inbound", "new", 10) == ["new"]
        assert await store.members("inbound", "old", 60_000) == ["new", "old"]

    async def test_leave(self, store: Store) -> None:
        """A member that leaves is gone at once; an unknown one leaving changes nothing."""
        await store.members("inbound", "a", 60_000)
        await store.leave("inbound", "a")
        await store.leave("inbound", "never-joined")
        assert await store.members("inbound", "b", 60_000) == ["b"]


class TestMigrations:
    async def test_migrations_are_versioned(self, store_url: str) -> None:
        """A new store migrates from 0; opening it again applies nothing twice."""
        first = await open_store(store_url, secret=SECRET, migrate=False)
        before, now = await first.migrate()
        await first.close()
        assert before == 0
        assert now >= 1
        second = await open_store(store_url, secret=SECRET)
        assert await second.migrate() == (now, now)
        await second.close()

    async def test_a_newer_schema_is_refused(self, store_url: str) -> None:
        """A database migrated by a newer relayd is refused, with StoreError, and left
        as it was."""
        first = await open_store(store_url, secret=SECRET)
        _, now = await first.migrate()
        await first.close()
        await set_version(store_url, now + 1)
        with pytest.raises(StoreError, match="newer than this relayd knows"):
            await open_store(store_url, secret=SECRET)
        with pytest.raises(StoreError, match="newer than this relayd knows"):
            await (await open_store(store_url, secret=SECRET, migrate=False)).migrate()
        assert await get_version(store_url) == now + 1


class TestFailures:
    """A failure inside a store surfaces as the store's own error, never the driver's."""

    async def test_an_argument_the_driver_cannot_send(self, store: Store) -> None:
        """A lone surrogate (no encoding of it exists) in a read, a registration and a
        claim raises StoreError, and the store goes on working."""
        for call in (lambda: store.device("\udcff"),
                     lambda: store.add_business(Business("\udcff", "x")),
                     lambda: store.claim_seq("\udcff", 1, 64)):
            with pytest.raises(StoreError):
                await call()
        assert await store.add_device(device("d1"))
        assert await store.device("d1") == device("d1")


class TestExport:
    async def test_everything_held_about_one_user(self, store: Store) -> None:
        """Devices, conversations and seq counters of the user, and nothing of anyone else."""
        await store.add_device(device("d1", "u1", created_ms=10))
        await store.add_device(device("d2", "u1", created_ms=20))
        await store.add_device(device("d3", "u2", created_ms=30))
        await store.claim_seq("d1", 7, 64)
        await store.claim_seq("d3", 9, 64)
        await store.allocate_seqs("m1", ["d1", "d2", "d3"], 1)
        await store.allocate_seqs("m2", ["d2"], 2)
        acme = await store.open_conversation("u1", "acme", 100, False, make_id("u1", "acme"))
        globex = await store.open_conversation("u1", "globex", 200, False,
                                               make_id("u1", "globex"))
        await store.close_conversation(globex.id, "business", 300)
        await store.open_conversation("u2", "acme", 400, False, make_id("u2", "acme"))
        data = await store.export_user("u1")
        assert data.devices == [device("d1"), device("d2")]
        assert [d.created_ms for d in data.devices] == [10, 20]
        closed = await store.conversation(globex.id)
        assert data.conversations == sorted([acme, closed], key=lambda c: c.id)
        assert data.highest_seq == {"d1": 7}
        assert data.next_seq == {"d1": 2, "d2": 3}

    async def test_unknown_user(self, store: Store) -> None:
        """A user the store has never seen has nothing to export."""
        data = await store.export_user("nobody")
        assert (data.devices, data.conversations, data.highest_seq, data.next_seq) == (
            [], [], {}, {})


# Edges of what a user id may be (relayd.payload.is_user_id): every control character
# but NUL, the longest, the widest code points, and what looks like SQL or a pattern.
USER_IDS = ["\x01\x1f\x7f", "é" * 1024, "\U0010ffff\ufffe", "%_\\", "'); DROP TABLE x; --",
            "\u2028 \u00a0", "a" * 1024]


class TestAnyUserId:
    @pytest.mark.parametrize("user", USER_IDS, ids=range(len(USER_IDS)))
    async def test_every_user_id_the_rule_accepts_is_held(self, store: Store,
                                                          user: str) -> None:
        """A user id that relayd.payload.is_user_id accepts is stored, found, exported and
        erased by every backend like any other, never a StoreError (issue 13: an erase
        request whose user held NUL raised one on PostgreSQL, retried until
        internal_error)."""
        assert is_user_id(user)
        await store.add_device(device("d1", user))
        assert [d.id for d in await store.devices_of(user)] == ["d1"]
        assert [d.id for d in (await store.export_user(user)).devices] == ["d1"]
        assert (await store.erase_user(user))["devices"] == 1
        assert await store.export_user(user) == await store.export_user("nobody")


class TestErase:
    async def test_erase_leaves_open_conversations_for_the_caller(self, store: Store) -> None:
        """Erasure deletes all but open conversations, which wait for their close."""
        for d in (device("d1"), device("d2"), device("gone"), device("d9", "u2")):
            await store.add_device(d)
        for d in ("d1", "d2", "gone", "d9"):
            await store.claim_seq(d, 1, 64)
        await store.remove_device("gone")  # its replay state outlives it
        await store.allocate_seqs("m1", ["d1", "d2", "d9"], 1)
        await store.allocate_seqs("m2", ["d1"], 2)
        acme = await store.open_conversation("u1", "acme", 1, False, make_id("u1", "acme"))
        globex = await store.open_conversation("u1", "globex", 1, False, make_id("u1", "globex"))
        await store.close_conversation(globex.id, "user", 2)
        theirs = await store.open_conversation("u2", "acme", 1, False, make_id("u2", "acme"))

        assert await store.erase_user("u1") == {"devices": 2, "sent": 3, "replay": 3,
                                                "conversations": 1, "open": 1}
        assert await store.devices_of("u1") == []
        assert await store.conversation(globex.id) is None
        assert await store.conversation(acme.id) == acme
        await store.close_conversation(acme.id, "user", 3)
        assert await store.erase_user("u1") == {"devices": 0, "sent": 0, "replay": 0,
                                                "conversations": 1, "open": 0}
        assert await store.export_user("u1") == await store.export_user("nobody")
        assert await store.erase_user("u1") == {"devices": 0, "sent": 0, "replay": 0,
                                                "conversations": 0, "open": 0}

        assert [d.id for d in await store.devices()] == ["d9"]
        assert await store.conversation(theirs.id) == theirs
        assert not await store.claim_seq("d9", 1, 64)
        assert await store.allocate_seqs("m1", ["d9"], 9) == {"d9": 1}
        assert await store.claim_seq("d1", 1, 64)  # no replay state was left
        assert await store.claim_seq("gone", 1, 64)


class TestRetention:
    async def test_stale_conversations_are_open_and_inactive(self, store: Store) -> None:
        """Only open conversations whose last activity is strictly before the cutoff."""
        old = await store.open_conversation("u1", "acme", 100, False, make_id("u1", "acme"))
        edge = await store.open_conversation("u2", "acme", 200, False, make_id("u2", "acme"))
        shut = await store.open_conversation("u3", "acme", 50, False, make_id("u3", "acme"))
        await store.close_conversation(shut.id, "business", 60)
        assert await store.stale_conversations(200) == [old]
        assert await store.stale_conversations(201) == [old, edge]
        assert await store.stale_conversations(100) == []

    async def test_prune_each_kind_before_its_cutoff(self, store: Store) -> None:
        """Each kind goes strictly before its cutoff; open conversations and live state stay."""
        await store.add_device(device("d1"))
        await store.add_device(device("gone"))
        await store.claim_seq("d1", 1, 64)
        await store.claim_seq("gone", 1, 64)
        await store.remove_device("gone")
        await store.allocate_seqs("m1", ["d1"], 100)
        await store.allocate_seqs("m2", ["d1"], 200)
        closed = await store.open_conversation("u1", "acme", 100, False, make_id("u1", "acme"))
        await store.close_conversation(closed.id, "user", 150)
        still_open = await store.open_conversation("u1", "globex", 10, False,
                                                   make_id("u1", "globex"))
        await store.add_audit("erase", "ref1", {"devices": 1}, 1000)
        await store.add_audit("erase", "ref2", {"devices": 2}, 2000)
        await store.claim_receipt("r1", "delivered", 100)
        nothing = {"conversations": 0, "replay": 0, "sent": 0, "audit": 0, "receipts": 0}

        assert await store.prune(conversations_before_ms=150, replay_before_ms=0,
                                 sent_before_ms=100, audit_before_ms=1000,
                                 receipts_before_ms=100) == nothing
        assert await store.prune(conversations_before_ms=151, replay_before_ms=2**62,
                                 sent_before_ms=101, audit_before_ms=1001,
                                 receipts_before_ms=101) == {
            "conversations": 1, "replay": 1, "sent": 1, "audit": 1, "receipts": 1}
        assert await store.claim_receipt("r1", "expired", 300) == ("expired", True)
        assert await store.conversation(closed.id) is None
        assert await store.conversation(still_open.id) == still_open
        assert not await store.claim_seq("d1", 1, 64)  # a live device keeps its window
        assert await store.claim_seq("gone", 1, 64)
        assert await store.allocate_seqs("m2", ["d1"], 300) == {"d1": 2}
        assert [r.subject for r in await store.audit_log() if r.action == "erase"] == ["ref2"]
        assert await store.prune(conversations_before_ms=151, replay_before_ms=0,
                                 sent_before_ms=101, audit_before_ms=1001) == nothing


class TestReceipts:
    async def test_the_first_receipt_of_a_message_wins(self, store: Store) -> None:
        """The first claim of a message is recorded and reported as this call's; every
        later one, of either kind, gets the first kind back and is not its own."""
        assert await store.claim_receipt("m1", "delivered", 10) == ("delivered", True)
        assert await store.claim_receipt("m1", "delivered", 20) == ("delivered", False)
        assert await store.claim_receipt("m1", "expired", 30) == ("delivered", False)
        assert await store.claim_receipt("m2", "expired", 30) == ("expired", True)
        assert await store.claim_receipt("m2", "delivered", 40) == ("expired", False)

    async def test_concurrent_claims_have_one_winner(self, store: Store) -> None:
        """Many claims of one message at once (devices acknowledging together): exactly
        one is the first."""
        claims = await asyncio.gather(*(store.claim_receipt("m", kind, 1) for kind in
                                        ["delivered", "expired"] * 8))
        assert sum(first for _, first in claims) == 1
        assert len({kind for kind, _ in claims}) == 1


class TestAudit:
    async def test_records_come_back_in_order(self, store: Store) -> None:
        """Audit records are returned oldest first with their detail as given."""
        await store.add_audit("erase", "b", {"devices": 2, "note": "x", "flag": True}, 20)
        await store.add_audit("erase", "a", {}, 10)
        await store.add_audit("prune", "c", {"sent": 1}, 20)
        assert await store.audit_log() == [
            AuditRecord(10, "erase", "a", {}),
            AuditRecord(20, "erase", "b", {"devices": 2, "note": "x", "flag": True}),
            AuditRecord(20, "prune", "c", {"sent": 1}),
        ]


USER, PHONE = "marked-account-5e1f", "marked-phone-77c2"  # found by a scan, if left anywhere


async def write_version_3(store_url: str) -> None:
    """A store as a relayd of schema 3 left it: ids in the clear, a removed device's replay
    state, a sent row, an open conversation."""
    rows = f"""
        INSERT INTO devices (id, user_id, kem, enc_key, sign_key, next_seq, created_ms)
            VALUES ('{PHONE}', '{USER}', 'X25519', {{e}}, {{s}}, 4, 10),
                   ('laptop', '{USER}', 'X25519', {{e}}, {{s}}, 1, 20),
                   ('other', 'someone', 'X25519', {{e}}, {{s}}, 1, 30);
        INSERT INTO replay (device_id, high, bits, updated_ms, user_id)
            VALUES ('{PHONE}', 5, {{b}}, 1, '{USER}'), ('old-phone', 9, {{b}}, 1, '{USER}');
        INSERT INTO sent (source, device_id, seq, created_ms) VALUES ('up:{PHONE}:1', 'laptop',
            1, 1);
        INSERT INTO conversations (id, user_id, business_id, state, epoch, closed_by,
            created_ms, updated_ms) VALUES ('{"c" * 32}', '{USER}', 'acme', 'open', 0, NULL,
            1, 2);
    """  # noqa: S608 - constants of this test
    window = ReplayWindow(64)
    window.accept(5)
    bits = window.to_bytes().hex()
    if store_url.startswith("sqlite:///"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            for script in MIGRATIONS[:3]:
                db.executescript(script)
            db.executescript(rows.format(e="x'" + "65" * 32 + "'", s="x'" + "73" * 32 + "'",
                                         b=f"x'{bits}'") + "PRAGMA user_version = 3;")
        db.close()
        return
    from relayd.store.postgres import MIGRATIONS as PG_MIGRATIONS

    conn = await asyncpg.connect(store_url)
    try:
        await conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                           " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        for number, script in enumerate(PG_MIGRATIONS[:3], start=1):
            await conn.execute(script)
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number)
        await conn.execute(rows.format(e="'\\x" + "65" * 32 + "'::bytea",
                                       s="'\\x" + "73" * 32 + "'::bytea", b=f"'\\x{bits}'::bytea"))
    finally:
        await conn.close()


async def set_seen(store_url: str, seen_ms: int) -> None:
    if store_url.startswith("sqlite:///"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            db.execute("UPDATE people SET seen_ms = ?", (seen_ms,))
        db.close()
        return
    conn = await asyncpg.connect(store_url)
    try:
        await conn.execute("UPDATE people SET seen_ms = $1", seen_ms)
    finally:
        await conn.close()


async def raw_text(store_url: str) -> bytes:
    """Every row of every table of the store, as the database returns it."""
    if store_url.startswith("sqlite:///"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master"
                                               " WHERE type = 'table'")]
            found = repr([db.execute(f"SELECT * FROM {t}").fetchall()  # noqa: S608 - schema
                          for t in tables])
        db.close()
        return found.encode()
    conn = await asyncpg.connect(store_url)
    try:
        tables = [r[0] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]
        return repr([list(map(tuple, await conn.fetch(f"SELECT * FROM {t}")))  # noqa: S608
                     for t in tables]).encode()
    finally:
        await conn.close()


class TestPseudonyms:
    async def test_no_id_is_held_in_the_clear(self, store: Store, store_url: str) -> None:
        """A store in use holds the user's account id and device ids in no row, in any
        table: pseudonyms, and what only the user's key opens."""
        await store.add_device(device(PHONE, USER))
        await store.claim_seq(PHONE, 1, 64)
        await store.allocate_seqs(f"up:{PHONE}:1", [PHONE], 1)
        await store.open_conversation(USER, "acme", 1, False, make_id("u", "acme"))
        held = await raw_text(store_url)
        assert b"marked" not in held
        assert await store.household(PHONE) == [device(PHONE, USER)]

    async def test_a_version_3_store_is_converted(self, store_url: str) -> None:
        """A store written by schema 3 is rewritten once into pseudonyms and sealed ids, and
        every operation works on it as before: lookups, replay state (of a removed
        device too), seqs, export, erase. Migrating again changes nothing."""
        await write_version_3(store_url)
        store = await open_store(store_url, secret=SECRET)
        try:
            assert b"marked" not in await raw_text(store_url)
            assert await store.migrate() == (latest(store_url), latest(store_url))
            assert [d.id for d in await store.household("laptop")] == ["laptop", PHONE]
            phone = await store.device(PHONE)
            assert phone is not None
            assert (phone.user, phone.created_ms, phone.enc_key) == (USER, 10, b"e" * 32)
            conversation = await store.conversation("c" * 32)
            assert conversation is not None
            assert conversation.user == USER
            assert await store.business_and_conversation("acme", USER) == (None, None)
            await store.add_business(Business("acme", "acme-user"))
            assert (await store.business_and_conversation("acme", USER))[1] == conversation
            assert not await store.claim_seq(PHONE, 5, 64)
            assert await store.claim_seq(PHONE, 6, 64)
            assert await store.allocate_seqs("m", [PHONE], 3) == {PHONE: 4}
            held = await store.export_user(USER)
            assert held.highest_seq == {PHONE: 6}
            assert [d.id for d in held.devices] == ["laptop", PHONE]
            await store.close_conversation(conversation.id, "user", 3)
            assert await store.erase_user(USER) == {"devices": 2, "sent": 1, "replay": 2,
                                                    "conversations": 1, "open": 0}
            assert [d.user for d in await store.devices()] == ["someone"]
        finally:
            await store.close()
        again = await open_store(store_url, secret=SECRET)
        assert await again.migrate() == (latest(store_url), latest(store_url))
        assert [d.id for d in await again.devices()] == ["other"]
        await again.close()

    async def test_prune_destroys_the_keys_of_people_no_row_names(
            self, store: Store, store_url: str) -> None:
        """A user with no row left loses its key to retention, though not in its first day
        (a device being registered has its person before its row); a user with a row
        keeps it."""
        assert isinstance(store, Pseudonymous)
        await store.add_device(device(PHONE, USER))
        await store.add_device(device("d9", "u9"))
        await store.remove_device(PHONE)
        everyone = 2**62
        cutoffs = {"conversations_before_ms": 0, "replay_before_ms": 0, "sent_before_ms": 0,
                   "audit_before_ms": 0}
        await store.prune(**cutoffs)
        assert len(await store.vault.all_people(everyone)) == 2
        await set_seen(store_url, 0)  # as if registered long ago
        await store.prune(**cutoffs)
        assert await store.vault.all_people(everyone) == [store.user_pseudonym("u9")]
        assert [d.id for d in await store.devices()] == ["d9"]

    async def test_a_device_added_while_its_user_is_erased_stays_readable(
            self, store: Store) -> None:
        """When an erasure destroys the user's key between the key's creation and the
        device's row (another process), the registration is made again under a new key:
        the device is found, not a row nothing opens."""
        assert isinstance(store, Pseudonymous)
        vault, erasures = store.vault, []

        class ErasedMeanwhile:
            """The store's vault, but the first key it gives is destroyed at once."""

            def __getattr__(self, name: str) -> Any:
                return getattr(vault, name)

            async def add_person(self, user: str, key: bytes,
                                 sealed: bytes) -> tuple[bytes, bytes]:
                kept = await vault.add_person(user, key, sealed)
                if not erasures:
                    erasures.append(user)
                    await vault.forget_people([user])
                return kept

        racing = Pseudonymous(store.backend, ErasedMeanwhile(), SECRET)  # type: ignore[arg-type]
        assert await racing.add_device(device(PHONE, USER))
        assert erasures == [store.user_pseudonym(USER)]
        assert await store.device(PHONE) == device(PHONE, USER)
        assert [d.id for d in await racing.devices()] == [PHONE]

    async def test_an_unknown_device_costs_the_reads_of_a_registered_one(
            self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        """Looking up an id no device has takes as many backend and vault calls, and
        opens as many sealed values, as looking up a registered one, in a fresh process
        and then from its memory: the edge's login does the same work for both
        (docs/protocol.md section 12)."""
        assert isinstance(store, Pseudonymous)
        await store.add_device(device(PHONE, USER))
        calls: list[str] = []
        opening = pseudonym.unseal

        def unseal(*args: Any) -> str | None:
            calls.append("unseal")
            return opening(*args)

        class Counted:
            def __init__(self, part: object) -> None:
                self.part = part

            def __getattr__(self, name: str) -> Any:
                calls.append(name)
                return getattr(self.part, name)

        monkeypatch.setattr(pseudonym, "unseal", unseal)

        async def work(device_id: str) -> list[list[str]]:
            fresh = Pseudonymous(Counted(store.backend), Counted(store.vault),  # type: ignore[arg-type]
                                 SECRET)
            done = []
            for _ in range(2):
                calls.clear()
                await fresh.device(device_id)
                done.append(list(calls))
            return done

        registered = await work(PHONE)
        assert registered[0] == ["device", "people", "unseal", "unseal"]
        assert await work("nobody") == registered

    async def test_erased_rows_no_longer_open(self, store: Store) -> None:
        """After erasure, a copy of the user's device row taken before it (as in a backup)
        does not open with the store's own code: the user's key is gone (the read is held:
        a row without its key is what a wrong vault looks like), and a new one does not
        open it either."""
        assert isinstance(store, Pseudonymous)
        await store.add_device(device(PHONE, USER))
        copy = await store.backend.devices()
        assert [d.id for d in await store._devices(copy)] == [PHONE]
        await store.erase_user(USER)
        with pytest.raises(StoreUnavailableError):
            await store._devices(copy)
        other = Pseudonymous(store.backend, store.vault, SECRET)  # no memory of the user
        with pytest.raises(StoreUnavailableError):
            await other._devices(copy)
        await store.add_device(device(PHONE, USER))  # back again: a new key
        assert await other._devices(copy) == []

    async def test_rows_whose_key_the_vault_lacks_are_held_not_absent(
            self, store: Store) -> None:
        """A vault without the key of a user whose rows exist (an older backup, a stale
        copy) makes the hot path's reads raise StoreUnavailableError, and makes no new key
        for the user; given its key back, the rows open again as they were."""
        assert isinstance(store, Pseudonymous)
        await store.add_device(device(PHONE, USER))
        opened = await store.open_conversation(USER, "acme", 1, False, make_id(USER, "acme"))
        pseudonym = store.user_pseudonym(USER)
        kept = (await store.vault.people([pseudonym]))[pseudonym]
        await store.vault.forget_people([pseudonym])  # as a vault restored from before it
        other = Pseudonymous(store.backend, store.vault, SECRET)  # no memory of the user
        for read in (other.device(PHONE), other.household(PHONE), other.devices_of(USER),
                     other.conversation(opened.id),
                     other.conversation_of(USER, "acme"),
                     other.add_device(device("tablet", USER)),
                     other.open_conversation(USER, "other", 2, False, make_id(USER, "o"))):
            with pytest.raises(StoreUnavailableError):
                await read
        assert await store.vault.people([pseudonym]) == {}  # no new key was made
        # listings of every row leave them out, rather than stop for everyone
        assert await other.devices() == []
        assert await other.stale_conversations(2**62) == []
        assert (await other.export_user(USER)).devices == []  # nothing opens to export
        assert await store.backend.device(other.device_pseudonym("tablet")) is None
        await store.vault.import_person(pseudonym, *kept)  # the right vault, back
        assert await other.household(PHONE) == [device(PHONE, USER)]
        assert await other.conversation(opened.id) == opened
        assert await other.add_device(device("tablet", USER))
        assert [d.id for d in await other.devices_of(USER)] == [PHONE, "tablet"]

    async def test_a_user_whose_key_is_lost_for_good_is_erased_and_registers_again(
            self, store: Store) -> None:
        """When the key is lost for good, erasing the user deletes the rows nothing opens,
        and the user then registers again under a new key."""
        assert isinstance(store, Pseudonymous)
        await store.add_device(device(PHONE, USER))
        await store.vault.forget_people([store.user_pseudonym(USER)])
        other = Pseudonymous(store.backend, store.vault, SECRET)
        assert (await other.erase_user(USER))["devices"] == 1
        assert await other.add_device(device(PHONE, USER))
        assert await other.household(PHONE) == [device(PHONE, USER)]

    async def test_a_read_that_raced_an_erasure_finds_nothing_when_tried_again(
            self, store: Store) -> None:
        """A reader that read a user's row just before another process erased the user
        finds no key: it is held (StoreUnavailableError), and read again it finds no row."""
        assert isinstance(store, Pseudonymous)
        await store.add_device(device(PHONE, USER))
        other = Pseudonymous(store.backend, store.vault, SECRET)
        read = await store.backend.household(other.device_pseudonym(PHONE))
        await store.erase_user(USER)
        with pytest.raises(StoreUnavailableError):
            await other._devices(read)
        assert await other.household(PHONE) == []
        assert await other.device(PHONE) is None

    async def test_retention_keeps_a_key_reused_by_a_registration_meanwhile(
            self, store: Store, store_url: str) -> None:
        """A user with no rows and an old key who registers a device between retention's
        listing of the vault and its forget keeps the key the new row is sealed under."""
        assert isinstance(store, Pseudonymous)
        await store.add_device(device(PHONE, USER))
        await store.remove_device(PHONE)
        await set_seen(store_url, 0)  # an old key, no row
        vault = store.vault

        class RegisteredMeanwhile:
            """The store's vault, but the user registers once the vault has been listed."""

            def __getattr__(self, name: str) -> Any:
                return getattr(vault, name)

            async def all_people(self, seen_before_ms: int) -> list[str]:
                listed = await vault.all_people(seen_before_ms)
                await store.add_device(device(PHONE, USER))
                return listed

        racing = Pseudonymous(store.backend, RegisteredMeanwhile(), SECRET)  # type: ignore[arg-type]
        await racing.prune(conversations_before_ms=0, replay_before_ms=0, sent_before_ms=0,
                           audit_before_ms=0)
        assert await vault.all_people(2**62) == [store.user_pseudonym(USER)]
        other = Pseudonymous(store.backend, vault, SECRET)
        assert await other.device(PHONE) == device(PHONE, USER)
        await set_seen(store_url, 0)  # and with no row and an old key, it goes
        await store.remove_device(PHONE)
        await store.prune(conversations_before_ms=0, replay_before_ms=0, sent_before_ms=0,
                          audit_before_ms=0)
        assert await vault.all_people(2**62) == []

    async def test_another_process_forgets_an_erased_user(
            self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        """A process that read a user's key and ids keeps them no longer than
        CACHE_SECONDS after another process erased the user: its next read drops them."""
        assert isinstance(store, Pseudonymous)
        await store.add_device(device(PHONE, USER))
        other = Pseudonymous(store.backend, store.vault, SECRET)  # another worker
        assert [d.id for d in await other.household(PHONE)] == [PHONE]
        assert store.user_pseudonym(USER) in other._people
        await store.erase_user(USER)
        monkeypatch.setattr("relayd.store.pseudonym.CACHE_SECONDS", 0.0)
        assert await other.household(PHONE) == []
        assert store.user_pseudonym(USER) not in other._people
        assert USER not in {user for _, user in other._people.values()}
        assert PHONE not in other._opened.values()


class TestReplyRuleInSql:
    """relayd_reply_rule, PostgreSQL's copy of relayd.rules.reply, answers as it does."""

    async def test_every_case_agrees_with_rules_reply(self) -> None:
        """Every state a conversation can be in (none, another business's, open, closed
        by either party), every reply type, first run or retry: the same write, refusal
        and detail."""
        states: list[tuple[str, str, str | None] | None] = [
            None, *((business, state, by) for business in ("acme", "other")
                    for state, by in (("open", None), ("closed", "user"),
                                      ("closed", "business")))]
        kinds = ["message", "close", "typing", "reaction", "anything"]
        async with postgres.database() as url:
            await (await open_store(url, secret=SECRET)).close()  # migrated
            conn = await asyncpg.connect(url)
            try:
                for current in states:
                    for kind in kinds:
                        for retry in (False, True):
                            row = Conversation("c" * 32, "u1", current[0], current[1], 0,
                                               current[2], 1, 1) if current else None  # type: ignore[arg-type]
                            want = rules.reply(row, "acme", kind, retry)
                            got = await conn.fetchrow(
                                "SELECT * FROM relayd_reply_rule($1, $2, $3, $4, $5, $6, $7)",
                                current is not None, *(current or (None, None, None)),
                                "acme", kind, retry)
                            assert tuple(got) == (want.write, want.refusal,
                                                  want.detail or None), (current, kind, retry)
            finally:
                await conn.close()


class TestUpRulesInSql:
    """relayd_up_rule and relayd_opening, PostgreSQL's copies of relayd.rules.up and
    relayd.rules.opening, answer as they do."""

    @staticmethod
    def row(state: tuple[str, str | None, int] | None) -> Conversation | None:
        return None if state is None else Conversation(
            "c" * 32, "u1", "acme", state[0], 7, state[1], 500, state[2])  # type: ignore[arg-type]

    async def test_every_case_agrees_with_rules(self) -> None:
        """Every conversation state (none; open with old or fresh activity; closed by
        either party), every message type, first time or retry; every opening under
        either id policy: the same answers."""
        now = 100_500
        states: list[tuple[str, str | None, int] | None] = [
            None, ("open", None, 1_000), ("open", None, 100_000), ("closed", "user", 1_000),
            ("closed", "business", 1_000)]
        async with postgres.database() as url:
            await (await open_store(url, secret=SECRET)).close()  # migrated
            conn = await asyncpg.connect(url)
            try:
                for state in states:
                    current = self.row(state)
                    found, st, by, updated = (current is not None, *(state or (None,) * 3))
                    for kind in ["start", "message", "close", "typing", "reaction"]:
                        for retry in (False, True):
                            want = rules.up(current, kind, retry, now)
                            got = await conn.fetchrow(
                                "SELECT * FROM relayd_up_rule($1, $2, $3, $4, $5, $6, $7)",
                                found, st, by, updated, kind, retry, now)
                            assert tuple(got) == (want.write, want.refusal,
                                                  want.detail or None), (state, kind, retry)
                    for rotate in (False, True):
                        opened = rules.opening(current, rotate, now, 12345)
                        got = await conn.fetchrow(
                            "SELECT * FROM relayd_opening($1, $2, $3, $4, $5, $6, $7, $8)",
                            found, st, by, 7 if current else None,
                            500 if current else None, rotate, now, 12345)
                        assert tuple(got) == (opened.epoch, opened.created_ms,
                                              opened.new_id), (state, rotate)
            finally:
                await conn.close()


class TestRoundTrips:
    """PostgreSQL: what a message costs in statements, each a round trip."""

    async def test_a_reply_is_one_statement(self) -> None:
        """Once prepared, a business's reply (business check, conversation rules, the
        seqs of all the user's devices) is one statement: one round trip."""
        async with postgres.database() as url:
            store = await open_store(url, secret=SECRET, pool_size=1)
            try:
                await store.add_business(ACME)
                await store.add_device(device("d1", created_ms=1))
                await store.add_device(device("d2", created_ms=1))
                conversation = await store.open_conversation("u1", "acme", 1_000, False,
                                                             make_id("u1", "acme"))
                sent: list[str] = []
                async with store.backend.pool.acquire() as conn:  # type: ignore[attr-defined]
                    conn.add_query_logger(lambda record: sent.append(record.query))
                await store.accept_reply(reply_claim(conversation.id))  # prepares it
                sent.clear()
                outcome = await store.accept_reply(reply_claim(conversation.id, "close",
                                                               source="reply:acme:r2"))
            finally:
                await store.close()
        assert (outcome.status, dict(outcome.seqs)) == ("accepted", {"d1": 2, "d2": 2})
        assert len(sent) == 1, sent
        assert "relayd_accept_reply" in sent[0]

    async def test_an_inbound_message_is_one_statement(self) -> None:
        """Once prepared, a user's message is one statement (relayd_accept_up): household
        check, business, claim, conversation rules and the echo's seqs; with no reset
        query on release. A first message of a device in this process reads its replay
        row first (a second statement); another process's claim in between does too."""
        async with postgres.database() as url:
            store = await open_store(url, secret=SECRET, pool_size=1)
            other = await open_store(url, secret=SECRET, pool_size=1)
            try:
                await store.add_business(Business("acme", "acme-user"))
                await store.add_device(device("d1", created_ms=1))
                await store.add_device(device("d2", created_ms=1))
                household = tuple(await store.household("d1"))
                sent: list[str] = []
                async with store.backend.pool.acquire() as conn:  # type: ignore[attr-defined]
                    conn.add_query_logger(lambda record: sent.append(record.query))
                first = await store.accept_up(up(household, 1, "start", echo_to=("d2",)))
                first_statements = list(sent)
                sent.clear()
                quiet = await store.accept_up(up(household, 2))
                quiet_statements = list(sent)
                sent.clear()
                echoed = await store.accept_up(up(household, 3, "start", echo_to=("d2",)))
                echoed_statements = list(sent)
                assert (await other.accept_up(up(household, 4))).status == "accepted"
                sent.clear()
                after = await store.accept_up(up(household, 5))
                after_statements = list(sent)
                replayed = await store.accept_up(up(household, 4))
            finally:
                await store.close()
                await other.close()
        assert [o.status for o in (first, quiet, echoed, after, replayed)] == [
            "accepted", "accepted", "accepted", "accepted", "replayed"]
        assert dict(echoed.seqs) == {"d2": 2}
        # (with asyncpg's type introspection, once) the replay row read; the
        # conversation's id asked for; the message
        assert sum("relayd_accept_up" in q for q in first_statements) == 3, first_statements
        assert len(quiet_statements) == 1, quiet_statements
        assert "relayd_accept_up" in quiet_statements[0]
        assert len(echoed_statements) == 1, echoed_statements
        assert len(after_statements) == 2, after_statements  # the row another wrote
        assert not any("RESET" in q or "advisory_unlock" in q
                       for q in first_statements + quiet_statements + after_statements)

    async def test_messages_in_hand_at_once_are_one_statement(self) -> None:
        """The messages a worker has in hand at once (each of its own device) are claimed
        together: one statement (relayd_accept_ups) and one commit, not one each."""
        async with postgres.database() as url:
            store = await open_store(url, secret=SECRET, pool_size=1)
            try:
                households = await users(store, 16)

                def claims(seq: Callable[[int], int]) -> list[Any]:
                    return [store.accept_up(up(households[i], seq(i), "start",
                                                device_id=f"d{i}", make=make_id(f"u{i}", "acme")))
                            for i in range(16)]

                await asyncio.gather(*claims(lambda _: 1))  # the replay rows read, ids made
                await asyncio.gather(*claims(lambda _: 2))  # the batch's types introspected
                sent: list[str] = []
                async with store.backend.pool.acquire() as conn:  # type: ignore[attr-defined]
                    conn.add_query_logger(lambda record: sent.append(record.query))
                # the odd ones again: each outcome must be its own claim's
                outcomes = await asyncio.gather(*claims(lambda i: 2 if i % 2 else 3))
                statements = list(sent)
                conversations = [await store.conversation_of(f"u{i}", "acme")
                                 for i in range(16)]
            finally:
                await store.close()
        assert [o.status for o in outcomes] == ["accepted", "replayed"] * 8
        assert [o.conversation for o in outcomes[::2]] == conversations[::2]
        assert len({c.id for c in conversations if c is not None}) == 16
        assert len(statements) == 1, statements
        assert "relayd_accept_ups" in statements[0]

    async def test_a_claim_that_waits_for_a_lock_holds_back_no_other(self) -> None:
        """A claim in a batch that meets a lock held elsewhere (a pruning, an erasure)
        fails the batch within its lock_timeout, and the claims are tried one by one:
        the others go through while the lock is held, and it once the lock is let go."""
        async with postgres.database() as url:
            store = await open_store(url, secret=SECRET)
            holder = await asyncpg.connect(url)
            try:
                households = await users(store, 8)
                for i in range(8):
                    await store.accept_up(up(households[i], 1, "start", device_id=f"d{i}",
                                             make=make_id(f"u{i}", "acme")))
                assert isinstance(store, Pseudonymous)
                locked = holder.transaction()
                await locked.start()
                await holder.execute("SELECT FROM replay WHERE device_id = $1 FOR UPDATE",
                                     store.device_pseudonym("d0"))
                claims = [asyncio.create_task(store.accept_up(up(
                    households[i], 2, device_id=f"d{i}", make=make_id(f"u{i}", "acme"))))
                    for i in range(8)]
                # bounded well under the statements' 15 s timeout, which a batch waiting
                # on the lock would run into
                others = await asyncio.wait_for(asyncio.gather(*claims[1:]), 10)
                later = await asyncio.wait_for(store.accept_up(up(
                    households[1], 3, device_id="d1", make=make_id("u1", "acme"))), 10)
                assert not claims[0].done()
                await locked.rollback()
                first = await asyncio.wait_for(claims[0], 10)
            finally:
                await holder.close()
                await store.close()
        assert [o.status for o in [first, *others, later]] == ["accepted"] * 9
