"""The SQLite store's group commit (relayd.store.sqlite): ops queued together share one
transaction, and one that fails undoes only itself."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
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
