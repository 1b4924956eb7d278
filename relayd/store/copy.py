"""`relayd store copy`: move an installation's SQLite registry into PostgreSQL.

Every table of the SQLite file is copied, row for row, in one PostgreSQL transaction, from
one consistent SQLite snapshot: a copy that fails leaves the target as it was, so it can
simply be run again. A target that holds data already is refused unless `force` is set,
which replaces its contents. The ids are pseudonyms already (the CLI opens the source
through relayd.store.pseudonym first); the per-user keys go with the rows, or into the
key vault when one is given, so that they never reach PostgreSQL. Stop relayd before
copying, and point it at PostgreSQL after.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from relayd.store import Vault
from relayd.store.postgres import MAINTENANCE_SECONDS, PostgresStore
from relayd.store.sqlite import SqliteStore


class CopyRefusedError(Exception):
    """The target holds data already (or a different schema); nothing was changed."""


def _tables(db: sqlite3.Connection, skip: tuple[str, ...]) -> list[str]:
    """The SQLite file's tables, in the order they were created (parents first), except
    members (which processes are alive now is not the installation's to move) and
    `skip`."""
    return [row[0] for row in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " AND name <> 'members' ORDER BY rowid") if row[0] not in skip]


def _records(db: sqlite3.Connection, table: str, columns: list[str],
             booleans: set[str]) -> Iterator[tuple[Any, ...]]:
    flags = [c in booleans for c in columns]
    for row in db.execute(f"SELECT {', '.join(columns)} FROM {table}"):
        yield tuple(bool(v) if flag and v is not None else v
                    for v, flag in zip(row, flags, strict=True))


async def copy_sqlite(path: Path, target: PostgresStore, force: bool = False,
                      vault: Vault | None = None) -> dict[str, int]:
    """Copy every table of the SQLite file at `path` (which must exist) into `target`, the
    people into `vault` if given; return the rows per table."""
    await SqliteStore(path).close()  # bring the file to the current schema first
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        source.execute("BEGIN")  # one snapshot for every table
        tables = _tables(source, () if vault is None else ("people",))
        copied: dict[str, int] = {}
        async with target.pool.acquire() as conn, conn.transaction():
            types: dict[str, dict[str, str]] = {}
            for table in tables:
                rows = await conn.fetch(
                    "SELECT column_name, data_type FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = $1", table)
                types[table] = {r[0]: r[1] for r in rows}
                columns = [r[1] for r in source.execute(f"PRAGMA table_info({table})")]
                if set(columns) != set(types[table]):
                    raise CopyRefusedError(f"table {table} differs between the two schemas:"
                                      " migrate both to the same relayd version first")
            busy = [t for t in tables if await conn.fetchval(f"SELECT EXISTS (SELECT FROM {t})")]
            if busy and not force:
                raise CopyRefusedError(f"the target holds data already ({', '.join(busy)}):"
                                  " use --force to replace it")
            long = MAINTENANCE_SECONDS  # a whole store, not one message's statement
            if busy:
                await conn.execute(f"TRUNCATE {', '.join(tables)}", timeout=long)
            for table in tables:
                columns = list(types[table])
                booleans = {c for c, kind in types[table].items() if kind == "boolean"}
                await conn.copy_records_to_table(
                    table, columns=columns, records=_records(source, table, columns, booleans),
                    timeout=long)
                copied[table] = await conn.fetchval(f"SELECT count(*) FROM {table}",
                                                    timeout=long)
                for column in columns:  # ids were copied as they were: move counters past them
                    counter = await conn.fetchval("SELECT pg_get_serial_sequence($1, $2)",
                                                  table, column)
                    if counter is not None:
                        await conn.execute(
                            f"SELECT setval($1, coalesce(max({column}), 0) + 1, false)"
                            f" FROM {table}", counter, timeout=long)
        if vault is not None:
            people = source.execute("SELECT id, key, sealed FROM people").fetchall()
            for user, key, sealed in people:
                await vault.add_person(user, key, sealed)
            copied["people"] = len(people)
        return copied
    finally:
        source.close()
