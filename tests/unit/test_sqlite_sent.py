"""The SQLite store's `sent` table (relayd.store.sqlite): the schema that deletes a
device's rows by key."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from relayd.store.sqlite import MIGRATIONS, SqliteStore


@contextmanager
def traced(db: sqlite3.Connection) -> Iterator[list[str]]:
    """The statements `db` runs meanwhile, with their values in place."""
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    try:
        yield statements
    finally:
        db.set_trace_callback(None)


def version_5(path: Path) -> None:
    """A store as schema 5 left it: two users' devices, and their sent rows."""
    with sqlite3.connect(path) as db:
        for script in MIGRATIONS[:5]:
            db.executescript(script)
        db.executescript("""
            INSERT INTO devices (id, user_id, kem, enc_key, sign_key, next_seq)
                VALUES ('d1', 'u1', 'X25519', x'00', x'00', 3),
                       ('d2', 'u1', 'X25519', x'00', x'00', 2),
                       ('d3', 'u2', 'X25519', x'00', x'00', 2);
            INSERT INTO sent (source, device_id, seq, created_ms)
                VALUES ('m1', 'd1', 1, 10), ('m2', 'd1', 2, 20), ('m1', 'd2', 1, 10),
                       ('m1', 'd3', 1, 10);
            PRAGMA user_version = 5;
        """)
    db.close()


async def sent_deletes(store: SqliteStore) -> list[str]:
    """Remove d2, then erase u1; the query plans of the DELETE FROM sent statements the
    two ran."""
    with traced(store._db) as statements:
        assert await store.remove_device("d2")
        await store.erase_user("u1")
    deletes = [sql for sql in statements if sql.startswith("DELETE FROM sent")]
    assert len(deletes) == 2, statements
    return [" / ".join(row[3] for row in store._all(f"EXPLAIN QUERY PLAN {sql}"))
            for sql in deletes]


class TestSentByDevice:
    async def test_schema_5_reads_the_whole_table(self, tmp_path: Path) -> None:
        """The baseline: on schema 5 (keyed by source first), a device's removal and an
        erasure read all of `sent` to delete their devices' rows."""
        version_5(tmp_path / "r.db")
        store = SqliteStore(tmp_path / "r.db", migrate=False)
        try:
            assert [plan.split(" / ")[0] for plan in await sent_deletes(store)] == [
                "SCAN sent", "SCAN sent"]
            assert store._all("SELECT source, device_id FROM sent") == [("m1", "d3")]
        finally:
            await store.close()

    async def test_a_version_5_store_keeps_its_rows_keyed_by_device(
            self, tmp_path: Path) -> None:
        """A store of schema 5 migrates to `sent` keyed by device first: its rows are
        kept (a retry still gets its seqs, pruning still finds them by age), and a
        device's removal and an erasure delete their sent rows by the key."""
        version_5(tmp_path / "r.db")
        store = SqliteStore(tmp_path / "r.db", migrate=False)
        try:
            assert await store.migrate() == (5, len(MIGRATIONS))
            assert (tmp_path / "r.db-wal").stat().st_size == 0  # the old table's pages too
            assert await store.migrate() == (len(MIGRATIONS), len(MIGRATIONS))
            assert store._all("SELECT source, device_id, seq, created_ms FROM sent"
                              " ORDER BY device_id, source") == [
                ("m1", "d1", 1, 10), ("m2", "d1", 2, 20), ("m1", "d2", 1, 10),
                ("m1", "d3", 1, 10)]
            assert await store.allocate_seqs("m2", ["d1", "d2"], 30) == {"d1": 2, "d2": 2}
            assert await store.allocate_seqs("m3", ["d1", "d3"], 30) == {"d1": 3, "d3": 2}
            assert [r[3] for r in store._all(
                "EXPLAIN QUERY PLAN DELETE FROM sent WHERE created_ms < 15")] == [
                "SEARCH sent USING INDEX sent_created (created_ms<?)"]
            for plan in await sent_deletes(store):
                assert "SCAN sent" not in plan, plan
                assert "SEARCH sent USING INDEX sqlite_autoindex_sent_1 (device_id=?)" \
                    in plan, plan
            assert store._all("SELECT source, device_id FROM sent ORDER BY source") == [
                ("m1", "d3"), ("m3", "d3")]
        finally:
            await store.close()
