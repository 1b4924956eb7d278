"""The SQLite store's group commit (relayd.store.sqlite): ops queued together share one
transaction, and one that fails undoes only itself."""

from __future__ import annotations

import asyncio
import fcntl
import gc
import os
import sqlite3
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from relayd.errors import StoreError, StoreUnavailableError
from relayd.store.sqlite import SqliteStore


def _members(db: sqlite3.Connection) -> list[str]:
    return [r[0] for r in db.execute("SELECT member FROM members ORDER BY member")]


class TestGroupCommit:
    async def test_a_failing_op_undoes_only_itself(self, tmp_path: Path) -> None:
        """Of three ops committed together, the one that raises after writing leaves
        nothing behind; the other two are committed, and each waiter gets its own
        outcome."""
        store = SqliteStore(tmp_path / "r.db")
        runs: list[str] = []

        def join(name: str, fail: bool = False) -> Callable[[sqlite3.Connection], str]:
            def op(db: sqlite3.Connection) -> str:
                runs.append(name)
                db.execute("INSERT INTO members (role, member, seen_ms) VALUES ('r', ?, 0)",
                           (name,))
                if fail:
                    raise ValueError("a bug")
                return name
            return op

        try:
            outcomes = await asyncio.gather(
                store._commit(join("a")), store._commit(join("b", fail=True)),
                store._commit(join("c")), return_exceptions=True)
            assert outcomes[0] == "a"
            assert isinstance(outcomes[1], StoreError)
            assert outcomes[2] == "c"
            assert _members(store._db) == ["a", "c"]
            assert runs.count("b") == 2  # once with the others, once in its savepoint
        finally:
            await store.close()

    async def test_ops_without_failure_run_once(self, tmp_path: Path) -> None:
        """A batch in which nothing fails runs each op once, in one transaction."""
        store = SqliteStore(tmp_path / "r.db")
        runs: list[str] = []

        def join(name: str) -> Callable[[sqlite3.Connection], None]:
            def op(db: sqlite3.Connection) -> None:
                runs.append(name)
                db.execute("INSERT INTO members (role, member, seen_ms) VALUES ('r', ?, 0)",
                           (name,))
            return op

        try:
            await asyncio.gather(*(store._commit(join(n)) for n in "xyz"))
            assert sorted(runs) == ["x", "y", "z"]
            assert _members(store._db) == ["x", "y", "z"]
        finally:
            await store.close()


def _join(name: str) -> Callable[[sqlite3.Connection], None]:
    def op(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO members (role, member, seen_ms) VALUES ('r', ?, 0)", (name,))
    return op


class TestWriters:
    """The write lock is never held by something that waits for the event loop: rare
    writes and checkpoints take it on the loop's thread and wait at most for a commit."""

    async def test_every_kind_of_writer_at_once_finishes(self, tmp_path: Path) -> None:
        one, two = SqliteStore(tmp_path / "r.db"), SqliteStore(tmp_path / "r.db")

        async def repeat(write: Callable[[int], Awaitable[object]]) -> None:
            for i in range(30):
                await write(i)

        try:
            await asyncio.wait_for(asyncio.gather(
                repeat(lambda i: one._commit(_join(f"a{i}"))),
                repeat(lambda i: two._commit(_join(f"b{i}"))),
                repeat(lambda i: one.add_audit("x", f"a{i}", {}, 0)),
                repeat(lambda i: two.add_audit("x", f"b{i}", {}, 0)),
                repeat(lambda i: one.forget_people([f"p{i}"])),
                repeat(lambda i: two.prune(conversations_before_ms=0, replay_before_ms=0,
                                           sent_before_ms=0, audit_before_ms=0))),
                timeout=60)
            assert _members(one._db) == sorted(f"{s}{i}" for s in "ab" for i in range(30))
            assert len(await two.audit_log()) == 60
        finally:
            await one.close()
            await two.close()

    async def test_a_lock_held_elsewhere_is_waited_for_off_the_loop(
            self, tmp_path: Path) -> None:
        """While another process holds the write lock, a group commit waits for it on
        its thread: the loop runs on, and the writes land once the lock is free."""
        store = SqliteStore(tmp_path / "r.db")
        other = os.open(f"{tmp_path / 'r.db'}.lock", os.O_RDWR)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        try:
            fcntl.flock(other, fcntl.LOCK_EX)
            writes = asyncio.gather(*(store._commit(_join(n)) for n in "xyz"))
            await asyncio.sleep(0.3)
            assert not writes.done()
            assert ticks > 5  # the loop ran while the commit waited
            fcntl.flock(other, fcntl.LOCK_UN)
            await asyncio.wait_for(writes, timeout=30)
            assert _members(store._db) == ["x", "y", "z"]
        finally:
            ticker.cancel()
            os.close(other)
            await store.close()

    async def test_a_cancelled_flush_leaves_its_commit_alone(self, tmp_path: Path) -> None:
        """A flush cancelled (the loop closing, say) while its batch's COMMIT waits on the
        committer's thread: the next batch waits for that COMMIT before it touches the
        writer's connection, so both batches are committed."""
        store = SqliteStore(tmp_path / "r.db")
        held = threading.Event()
        store._committer.submit(held.wait, 30)  # the thread busy: COMMIT waits behind it
        try:
            first = asyncio.ensure_future(store._commit(_join("first")))
            await asyncio.sleep(0.1)
            assert store._flusher is not None
            assert not first.done()
            store._flusher.cancel()
            await asyncio.sleep(0.1)
            second = asyncio.ensure_future(store._commit(_join("second")))
            await asyncio.sleep(0.1)
            held.set()
            assert await asyncio.wait_for(second, timeout=30) is None
            assert _members(store._db) == ["first", "second"]
            with pytest.raises(StoreUnavailableError):  # told, not left waiting
                await asyncio.wait_for(first, timeout=30)
        finally:
            held.set()
            await store.close()

    async def test_a_cancelled_flush_leaves_its_batch_on_the_thread_alone(
            self, tmp_path: Path) -> None:
        """The same, while the whole batch runs on the committer's thread (another
        process had the lock): the batch stays one transaction, and the next one waits."""
        store = SqliteStore(tmp_path / "r.db")
        other = os.open(f"{tmp_path / 'r.db'}.lock", os.O_RDWR)
        inside, go = threading.Event(), threading.Event()

        def first_op(db: sqlite3.Connection) -> None:
            _join("a")(db)
            inside.set()
            go.wait(30)
            _join("b")(db)

        try:
            fcntl.flock(other, fcntl.LOCK_EX)
            first = asyncio.ensure_future(store._commit(first_op))
            await asyncio.sleep(0.1)  # on the thread, waiting for the lock
            fcntl.flock(other, fcntl.LOCK_UN)
            await asyncio.wait_for(asyncio.to_thread(inside.wait, 30), timeout=30)
            assert store._flusher is not None
            store._flusher.cancel()
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(store._commit(_join("c")))
            await asyncio.sleep(0.1)
            with pytest.raises(BlockingIOError):  # the thread's batch still holds it
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            go.set()
            assert await asyncio.wait_for(second, timeout=30) is None
            assert _members(store._db) == ["a", "b", "c"]
            with pytest.raises(StoreUnavailableError):
                await asyncio.wait_for(first, timeout=30)
        finally:
            go.set()
            os.close(other)
            await store.close()


async def test_a_closed_store_is_unavailable_to_every_kind_of_call(tmp_path: Path) -> None:
    """After close(), a rare write, a group-committed op and a read each raise one of the
    store's errors, never a raw OSError of the lock file; also once another store has
    opened files under the descriptor numbers the closed one had."""
    store = SqliteStore(tmp_path / "r.db")
    await store.close()
    other = SqliteStore(tmp_path / "r.db")  # takes the numbers of the closed descriptors
    try:
        with pytest.raises(StoreUnavailableError):
            store._scrub()
        with pytest.raises(StoreUnavailableError), store._write():
            pass
        with pytest.raises(StoreUnavailableError):
            await asyncio.wait_for(store._commit(_join("x")), timeout=30)
        with pytest.raises(StoreError):
            store._all("SELECT 1")
        await asyncio.wait_for(other._commit(_join("y")), timeout=30)
        assert _members(other._db) == ["y"]
    finally:
        await other.close()


async def test_a_flush_cancelled_before_it_ran_leaves_no_write_behind(
        tmp_path: Path) -> None:
    """The flusher cancelled before its first step (the loop closing as it was made): the
    next write starts another, which commits both."""
    store = SqliteStore(tmp_path / "r.db")
    try:
        first = asyncio.ensure_future(store._commit(_join("first")))
        await asyncio.sleep(0)  # first is queued, its flusher made and not yet run
        assert store._flusher is not None
        store._flusher.cancel()
        await asyncio.sleep(0)
        assert store._flusher.done()
        await asyncio.wait_for(store._commit(_join("second")), timeout=30)
        assert await asyncio.wait_for(first, timeout=30) is None
        assert _members(store._db) == ["first", "second"]
    finally:
        await store.close()


def test_a_flush_on_a_loop_closed_under_it_raises_nothing_at_collection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop closed while its flush waits (no cancellation first): when the flush is
    collected it must not try to settle futures on the closed loop ('Event loop is
    closed', reported as an exception ignored)."""
    raised: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda hook: raised.append(hook.exc_value))
    store = SqliteStore(tmp_path / "r.db")
    held = threading.Event()
    store._committer.submit(held.wait, 30)  # the COMMIT waits behind it
    loop = asyncio.new_event_loop()
    waiter = loop.create_task(store._commit(_join("a")))
    loop.run_until_complete(asyncio.sleep(0.1))
    loop.close()
    held.set()
    store._committer.shutdown()
    store._close()
    del waiter, store  # the store holds the flush's batch: gone with it, the tasks are
    gc.collect()  # collected here, under this test's hook, not in a later test
    assert not [e for e in raised if isinstance(e, RuntimeError)], raised
