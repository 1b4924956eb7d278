"""PostgreSQL: what the functions relayd_accept_up and relayd_accept_reply do around the
rules (the replay window's compare-and-set, a conversation created by two at once, the
row locks) under real concurrency: an erasure racing a message, held at each point by a
lock another connection holds; and two hosts (two stores, two pools) at once."""

from __future__ import annotations

import asyncio
import gc
import itertools
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from relayd.crypto import Kem
from relayd.errors import TransientError
from relayd.store import Business, Conversation, Device, ReplyClaim, Store, UpClaim, open_store
from tests.support import postgres

SECRET = b"o" * 32
USER = "u1"
ACME = Business("acme", "acme-user")
TABLES = ("devices", "replay", "sent", "conversations")


def claim(household: tuple[Device, ...], device: str, seq: int, kind: str, *,
          redelivered: bool = False, now_ms: int = 1_000) -> UpClaim:
    """A message of `device` echoed to the household's other devices."""
    echo = tuple(d.id for d in household if d.id != device)
    return UpClaim(household, device, seq, 1024, "acme", kind, redelivered, now_ms, False,
                   lambda epoch: f"conv-{epoch}".ljust(32, "x"), echo, f"up:{device}:{seq}")


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with postgres.database() as found:
        yield found


@pytest.fixture
async def store(url: str) -> AsyncIterator[Store]:
    """A store with business acme and a user with devices d1, d2, d3."""
    opened = await open_store(url, secret=SECRET)
    await opened.add_business(ACME)
    for name in ("d1", "d2", "d3"):
        await opened.add_device(Device(name, USER, Kem.X25519, b"e" * 32, b"s" * 32))
    yield opened
    await opened.close()


@pytest.fixture
async def sql(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own, outside the stores."""
    conn = await asyncpg.connect(url)
    yield conn
    await conn.close()


async def rows_left(sql: asyncpg.Connection) -> dict[str, int]:
    return {t: await sql.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}  # noqa: S608


async def waiting(sql: asyncpg.Connection, backends: int, *tasks: asyncio.Task[Any]) -> None:
    """Wait (bounded) until `backends` sessions of the database wait for a lock, or one of
    `tasks` finished (it did not wait where the fixed code would)."""
    for _ in range(3000):
        await sql.execute("SELECT pg_stat_clear_snapshot()")  # read once per transaction
        if any(t.done() for t in tasks) or await sql.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'") >= backends:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("nothing came to wait for a lock in 30 s")


async def erase_all(store: Store) -> None:
    """The rest of relayd.gdpr.erase: close what is open, erase again."""
    for conversation in (await store.export_user(USER)).conversations:
        await store.close_conversation(conversation.id, "user", 5_000)
    assert (await store.erase_user(USER))["open"] == 0


class TestErasureRacingAMessage:
    """An erasure and a user's message at once: the erasure comes wholly before the
    message (which is then stale: its device is gone) or wholly after it (and deletes
    what the message wrote), whatever point each is held at."""

    async def test_erased_while_the_message_waits_for_its_conversation(
            self, store: Store, sql: asyncpg.Connection) -> None:
        """A message waits for its conversation's row lock (held by another session)
        while an erasure runs: the message is applied before the erasure, which then
        deletes its claim and echo; no row is left after the user's open conversation
        is closed and erased (the claim used to be written after the erasure, naming
        no user, and stay)."""
        household = tuple(await store.household("d1"))
        assert (await store.accept_up(claim(household, "d1", 1, "start"))).status == "accepted"
        async with sql.transaction():
            await sql.execute("SELECT FROM conversations FOR UPDATE")
            message = asyncio.create_task(store.accept_up(claim(household, "d2", 1, "message")))
            await waiting(sql, 1, message)
            erase = asyncio.create_task(store.erase_user(USER))
            await waiting(sql, 2, message, erase)
        outcome = await message
        counts = await erase
        assert outcome.status == "accepted"
        assert (counts["devices"], counts["replay"], counts["sent"]) == (3, 2, 4)
        await erase_all(store)
        assert await rows_left(sql) == dict.fromkeys(TABLES, 0)

    async def test_erased_while_another_session_shares_the_devices(
            self, store: Store, sql: asyncpg.Connection) -> None:
        """Another session holds the devices (as a message in flight does) while an
        erasure starts; a refused message's claim written meanwhile is deleted with the
        rest (it used to be written after the erasure had deleted the claims, and stay)."""
        household = tuple(await store.household("d1"))
        async with sql.transaction():
            await sql.execute("SELECT FROM devices FOR KEY SHARE")
            erase = asyncio.create_task(store.erase_user(USER))
            await waiting(sql, 1, erase)
            outcome = await store.accept_up(claim(household, "d2", 1, "reaction"))
        counts = await erase
        assert outcome.refusal is not None
        assert outcome.refusal[0] == "unknown_conversation"
        assert (counts["devices"], counts["replay"], counts["open"]) == (3, 1, 0)
        assert await rows_left(sql) == dict.fromkeys(TABLES, 0)

    async def test_a_message_after_the_erasure_began_is_stale(
            self, store: Store, sql: asyncpg.Connection) -> None:
        """An erasure held after it took the devices (a claim's row lock, held by another
        session): a message of the user waits for it, then finds its device gone (stale),
        writing nothing."""
        household = tuple(await store.household("d1"))
        assert (await store.accept_up(claim(household, "d1", 1, "reaction"))).refusal
        async with sql.transaction():
            await sql.execute("SELECT FROM replay FOR UPDATE")
            erase = asyncio.create_task(store.erase_user(USER))
            await waiting(sql, 1, erase)
            message = asyncio.create_task(store.accept_up(claim(household, "d2", 1, "start")))
            await waiting(sql, 2, erase, message)
        counts = await erase
        assert (await message).status == "stale"
        assert (counts["devices"], counts["replay"], counts["open"]) == (3, 1, 0)
        assert await rows_left(sql) == dict.fromkeys(TABLES, 0)


class TestTheHouseholdCheck:
    async def test_a_claim_must_name_its_own_devices_household(
            self, store: Store, sql: asyncpg.Connection) -> None:
        """relayd_accept_up reads the household by the user the caller names; a claim of
        one user's device that names another user's household is stale, writing nothing,
        though that household is exact (the caller is trusted with nothing here)."""
        await store.add_device(Device("e1", "u2", Kem.X25519, b"e" * 32, b"s" * 32))
        found: dict[str, list[Any]] = defaultdict(list)
        for row in await sql.fetch("SELECT id, user_id, kem, enc_key, sign_key"
                                   " FROM devices ORDER BY id"):
            found[row["user_id"]].append(row)
        [u1] = [rows for rows in found.values() if len(rows) == 3]
        [u2] = [rows for rows in found.values() if len(rows) == 1]

        async def status(device: str, household: list[Any]) -> str:
            return str(await sql.fetchval(
                "SELECT o_status FROM relayd_accept_up($1, 'acme', $2, $3, $4, $5, $6, $7,"
                " FALSE, FALSE, NULL, NULL, TRUE, 1, '\\x01', 0, FALSE, 'start', 0, FALSE,"
                " 0, NULL, NULL, '{}', 's')", device, household[0]["user_id"],
                *([r[k] for r in household] for k in ("id", "user_id", "kem", "enc_key",
                                                      "sign_key"))))

        assert await status(u2[0]["id"], u1) == "stale"
        assert await status(u1[0]["id"], u2) == "stale"
        assert await status(u1[0]["id"], u1) == "window"  # past the check: decide again
        assert await rows_left(sql) == {"devices": 4, "replay": 0, "sent": 0,
                                        "conversations": 0}


class TestClaimBatches:
    async def test_a_batch_cancelled_before_it_ran_leaves_no_claim_behind(
            self, store: Store) -> None:
        """The task that sends the claims, cancelled before its first step (the loop
        closing as it was made): the next claim starts another, which sends both."""
        backend: Any = store.backend  # type: ignore[attr-defined]
        household = tuple(await store.household("d1"))
        first = asyncio.ensure_future(store.accept_up(claim(household, "d1", 1, "start")))
        await asyncio.sleep(0)  # queued, its sender made and not yet run
        assert backend._ups_flusher is not None
        backend._ups_flusher.cancel()
        await asyncio.sleep(0)
        assert backend._ups_flusher.done()
        second = await asyncio.wait_for(
            store.accept_up(claim(household, "d2", 1, "message")), timeout=30)
        assert (await asyncio.wait_for(first, timeout=30)).status == "accepted"
        assert second.status == "accepted"


    async def test_a_sender_collected_on_a_closed_loop_settles_nothing(
            self, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """The loop closed (not cancelled first) while the claims' sender waits for its
        batch: when the sender is collected it must not settle its waiters' futures on
        the closed loop ('Event loop is closed', reported as an exception ignored)."""
        raised: list[BaseException | None] = []
        monkeypatch.setattr(sys, "unraisablehook", lambda hook: raised.append(hook.exc_value))
        await asyncio.to_thread(_close_the_loop_under_a_batch, url)
        assert not [e for e in raised if isinstance(e, RuntimeError)], raised


def _close_the_loop_under_a_batch(url: str) -> None:
    loop = asyncio.new_event_loop()
    store = loop.run_until_complete(_a_batch_held(url))
    backend: Any = store.backend  # type: ignore[attr-defined]
    assert backend._ups_flusher is not None
    assert not backend._ups_flusher.done()
    loop.close()
    del backend, store  # the sender and its waiter go with them
    gc.collect()


async def _a_batch_held(url: str) -> Store:
    """A store whose claims' sender waits for ever for its batch's statement."""
    store = await open_store(url, secret=SECRET)
    await store.add_device(Device("d1", USER, Kem.X25519, b"e" * 32, b"s" * 32))
    household = tuple(await store.household("d1"))
    never = asyncio.get_running_loop().create_future()

    async def stuck(batch: object) -> None:
        await never

    backend: Any = store.backend  # type: ignore[attr-defined]
    backend._claim = stuck
    waiter = asyncio.ensure_future(store.accept_up(claim(household, "d1", 1, "start")))
    await asyncio.sleep(0.1)
    assert not waiter.done()  # it waits for the batch; `store` holds it from here
    return store


class TestRemovalRacingAReply:
    async def test_the_reply_comes_first_and_its_row_goes(
            self, store: Store, sql: asyncpg.Connection) -> None:
        """A device's removal held (another session holds the devices, as a message in
        flight does) while a business's reply numbers the user's devices: the reply
        comes wholly first, and its sent row of the device goes with the device (it used
        to be left)."""
        household = tuple(await store.household("d1"))
        start = await store.accept_up(claim(household, "d1", 1, "start"))
        assert isinstance(start.conversation, Conversation)
        async with sql.transaction():
            await sql.execute("SELECT FROM devices FOR KEY SHARE")
            removal = asyncio.create_task(store.remove_device("d2"))
            await waiting(sql, 1, removal)
            reply = asyncio.create_task(store.accept_reply(ReplyClaim(
                ACME, start.conversation.id, "message", False, "reply:1", 2_000)))
            await waiting(sql, 2, removal, reply)
        assert await removal
        assert sorted((await reply).seqs) == ["d1", "d2", "d3"]
        assert await sql.fetchval("SELECT count(*) FROM sent") == 3  # d3's echo, d1's, d3's


async def settled(attempt: Callable[[bool], Awaitable[Any]]) -> Any:
    """`attempt(redelivered)` until it is not store_busy, as the broker redelivers a
    message whose handling failed so; a deadlock is a failure of the test."""
    for tries in range(200):
        try:
            return await attempt(tries > 0)
        except TransientError as exc:
            if "Deadlock" in str(exc):
                raise AssertionError("a deadlock") from exc
    raise AssertionError("never settled")


def numbered(seqs: dict[str, list[int]], outcome: Any) -> None:
    for device, seq in outcome.seqs.items():
        seqs[device].append(seq)


class TestTwoHosts:
    """Two stores (two pools, as two hosts) applying messages at once."""

    @pytest.fixture
    async def other(self, url: str, store: Store) -> AsyncIterator[Store]:
        second = await open_store(url, secret=SECRET, pool_size=4)
        yield second
        await second.close()

    async def test_one_new_conversation_from_every_device(
            self, store: Store, other: Store, sql: asyncpg.Connection) -> None:
        """Every device of the user starts the same (new) conversation many times at
        once, through either host: each message accepted once, one conversation made,
        and each device's echo seqs are 1..n, each once."""
        household = tuple(await store.household("d1"))
        hosts = itertools.cycle((store, other))
        messages = [(next(hosts), device, seq)
                    for seq in range(1, 21) for device in ("d1", "d2", "d3")]

        async def send(host: Store, device: str, seq: int) -> Any:
            return await settled(lambda again: host.accept_up(
                claim(household, device, seq, "start", redelivered=again)))

        outcomes = await asyncio.gather(*(send(*m) for m in messages))
        assert {(o.status, o.retry) for o in outcomes} == {("accepted", False)}
        assert len({o.conversation.id for o in outcomes}) == 1
        assert await sql.fetchval("SELECT count(*) FROM conversations") == 1
        seqs: dict[str, list[int]] = defaultdict(list)
        for outcome in outcomes:
            numbered(seqs, outcome)
        assert {d: sorted(s) for d, s in seqs.items()} == {
            d: list(range(1, 41)) for d in ("d1", "d2", "d3")}

    async def test_replies_and_messages_in_one_conversation(
            self, store: Store, other: Store, sql: asyncpg.Connection) -> None:
        """A business's replies and the user's messages in one conversation at once,
        through either host: every one accepted, and each device's seqs (replies' and
        echoes') are 1..n, each once."""
        household = tuple(await store.household("d1"))
        start = await store.accept_up(claim(household, "d1", 1, "start"))
        assert isinstance(start.conversation, Conversation)
        conversation = start.conversation.id
        hosts = itertools.cycle((store, other))

        async def send(host: Store, seq: int) -> Any:
            return await settled(lambda again: host.accept_up(
                claim(household, "d1", seq, "message", redelivered=again)))

        async def reply(host: Store, n: int) -> Any:
            return await settled(lambda again: host.accept_reply(ReplyClaim(
                ACME, conversation, "message", again, f"reply:{n}", 2_000)))

        outcomes = await asyncio.gather(*(
            call(next(hosts), n) for n in range(2, 32) for call in (send, reply)))
        assert {o.status for o in outcomes} == {"accepted"}
        seqs: dict[str, list[int]] = defaultdict(list, {"d2": [1], "d3": [1]})  # the start
        for outcome in outcomes:
            numbered(seqs, outcome)
        assert {d: sorted(s) for d, s in seqs.items()} == {
            "d1": list(range(1, 31)), "d2": list(range(1, 62)), "d3": list(range(1, 62))}
        assert await sql.fetchval("SELECT count(*) FROM conversations") == 1


class TestSentByDevice:
    async def test_a_devices_sent_rows_are_deleted_by_the_key(
            self, url: str, sql: asyncpg.Connection) -> None:
        """Among many sent rows, a device's removal and an erasure delete the sent rows
        of their devices by the table's key: the statements they sent, explained, read
        no whole table."""
        store = await open_store(url, secret=SECRET, pool_size=1)  # one connection: logged
        try:
            for name in ("d1", "d2"):
                await store.add_device(Device(name, USER, Kem.X25519, b"e" * 32, b"s" * 32))
            await store.allocate_seqs("m1", ["d1", "d2"], 1)
            await sql.execute(  # the copies of 20000 messages to 2000 other devices
                "INSERT INTO sent (source, device_id, seq, created_ms) SELECT md5('m' || n),"
                " md5('d' || n % 2000), n, n FROM generate_series(1, 20000) AS n;"
                " ANALYZE sent")
            sent: list[Any] = []
            async with store.backend.pool.acquire() as conn:  # type: ignore[attr-defined]
                conn.add_query_logger(sent.append)
            assert await store.remove_device("d1")
            assert (await store.erase_user(USER))["sent"] == 1
        finally:
            await store.close()
        deletes = [q for q in sent if q.query.startswith("DELETE FROM sent")]
        assert len(deletes) == 2, [q.query for q in sent]
        for query in deletes:
            plan = "\n".join(r[0] for r in await sql.fetch(f"EXPLAIN {query.query}", *query.args))
            assert "sent_pkey" in plan, plan
            assert "Seq Scan on sent" not in plan, plan
        assert await sql.fetchval("SELECT count(*) FROM sent") == 20000
