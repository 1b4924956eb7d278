"""The SQLite store's group commit (relayd.store.sqlite): ops queued together share one
transaction, and one that fails undoes only itself."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

from relayd.errors import StoreError
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
    """A group commit holds the write lock while its COMMIT is on the committer's thread
    and the loop runs on: every other writer (a rare write, a checkpoint, another store of
    the same file in this process) must wait for it off the loop, or the loop waits for
    itself."""

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

    async def test_a_cancelled_rare_write_leaves_no_lock(self, tmp_path: Path) -> None:
        """Cancelled while it waits for the lock another store holds, a rare write does
        not take it for no one once it frees: later writers of both stores go through."""
        one, two = SqliteStore(tmp_path / "r.db"), SqliteStore(tmp_path / "r.db")
        try:
            async with one._write():  # one holds the lock: two's write has to wait
                waiting = asyncio.create_task(two.add_audit("x", "cancelled", {}, 0))
                await asyncio.sleep(0.2)
                assert not waiting.done()
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
            await asyncio.sleep(0.2)  # a lock taken for no one would be taken by now
            # through `one` first: a write of `two` would take (and free) its own lock
            await asyncio.wait_for(asyncio.gather(
                one.add_audit("x", "one", {}, 0), one._commit(_join("c"))), timeout=30)
            await asyncio.wait_for(two.add_audit("x", "two", {}, 0), timeout=30)
            assert sorted(r.subject for r in await one.audit_log()) == ["one", "two"]
        finally:
            await one.close()
            await two.close()
