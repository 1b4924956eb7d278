"""The PostgreSQL store (asyncpg, a connection pool), for several relayd hosts at once.

Every state change is one statement or one transaction, so it is applied exactly once
whichever host makes it: claim_seq is a compare-and-set on the replay row, and
open_conversation and allocate_seqs lock the rows they change (devices in id order, so
two allocations never deadlock). Migrations run under an advisory lock and are recorded
in schema_version, so hosts starting together migrate once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from relayd.crypto import Kem
from relayd.errors import StoreUnavailableError
from relayd.replay import ReplayWindow
from relayd.store import Business, Conversation, Device, Party

MIGRATIONS: list[str] = [
    """
    CREATE TABLE businesses (
        id TEXT PRIMARY KEY,
        amqp_user TEXT NOT NULL UNIQUE,
        first_party BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        kem TEXT NOT NULL,
        enc_key BYTEA NOT NULL,
        sign_key BYTEA NOT NULL,
        next_seq BIGINT NOT NULL DEFAULT 1
    );
    CREATE INDEX devices_user ON devices (user_id);
    CREATE TABLE conversations (
        id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        business_id TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
        epoch BIGINT NOT NULL,
        closed_by TEXT CHECK (closed_by IN ('user', 'business')),
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL,
        PRIMARY KEY (user_id, business_id)
    );
    CREATE TABLE replay (
        device_id TEXT PRIMARY KEY,
        high BIGINT NOT NULL,
        bits BYTEA NOT NULL
    );
    CREATE TABLE sent (
        source TEXT NOT NULL,
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        created_ms BIGINT NOT NULL,
        PRIMARY KEY (source, device_id)
    );
    CREATE INDEX sent_created ON sent (created_ms);
    """,
]

_MIGRATION_LOCK = 0x72656C6179640001  # pg_advisory_xact_lock key: "relayd" + 1
_CONVERSATION = "id, user_id, business_id, state, epoch, closed_by, created_ms, updated_ms"
_DEVICE = "id, user_id, kem, enc_key, sign_key"
# Errors that mean the database is unreachable or restarting, not that a query is wrong.
_UNAVAILABLE = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError,
                asyncpg.CrashShutdownError, asyncpg.TooManyConnectionsError)


def _conversation(row: Any) -> Conversation | None:
    return None if row is None else Conversation(*row)


def _device(row: Any) -> Device:
    return Device(row[0], row[1], Kem(row[2]), row[3], row[4])


def _business(row: Any) -> Business:
    return Business(row[0], row[1], row[2])


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, url: str, *, migrate: bool = True,
                      pool_size: int = 10) -> PostgresStore:
        """A pool on `url`; StoreUnavailableError when the server cannot be reached."""
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=pool_size)
        except (*_UNAVAILABLE, asyncpg.InvalidCatalogNameError) as exc:
            raise StoreUnavailableError(f"cannot reach PostgreSQL: {type(exc).__name__}") from None
        store = cls(pool)
        if migrate:
            await store.migrate()
        return store

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                yield conn
        except _UNAVAILABLE as exc:
            raise StoreUnavailableError(f"PostgreSQL: {type(exc).__name__}") from None

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            return list(await self.pool.fetch(sql, *args))
        except _UNAVAILABLE as exc:
            raise StoreUnavailableError(f"PostgreSQL: {type(exc).__name__}") from None

    async def _row(self, sql: str, *args: Any) -> Any:
        rows = await self._fetch(sql, *args)
        return rows[0] if rows else None

    async def _execute(self, sql: str, *args: Any) -> int:
        """Run one statement; return how many rows it changed."""
        try:
            status: str = await self.pool.execute(sql, *args)
        except _UNAVAILABLE as exc:
            raise StoreUnavailableError(f"PostgreSQL: {type(exc).__name__}") from None
        return int(status.rsplit(" ", 1)[-1])

    async def migrate(self) -> tuple[int, int]:
        """Apply the migrations the database lacks; return (version before, version now)."""
        async with self._transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                               " version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL"
                               " DEFAULT now())")
            before: int = await conn.fetchval(
                "SELECT coalesce(max(version), 0) FROM schema_version")
            if before > len(MIGRATIONS):
                raise RuntimeError(f"the database schema is at version {before}, newer than"
                                   f" this relayd knows ({len(MIGRATIONS)}): upgrade relayd")
            for number, script in enumerate(MIGRATIONS[before:], start=before + 1):
                await conn.execute(script)
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number)
        return before, len(MIGRATIONS)

    async def close(self) -> None:
        await self.pool.close()

    async def add_business(self, business: Business) -> bool:
        return await self._execute(
            "INSERT INTO businesses (id, amqp_user, first_party) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING", business.id, business.amqp_user, business.first_party) == 1

    async def business(self, business_id: str) -> Business | None:
        row = await self._row("SELECT id, amqp_user, first_party FROM businesses WHERE id = $1",
                              business_id)
        return None if row is None else _business(row)

    async def business_by_amqp_user(self, amqp_user: str) -> Business | None:
        row = await self._row(
            "SELECT id, amqp_user, first_party FROM businesses WHERE amqp_user = $1", amqp_user)
        return None if row is None else _business(row)

    async def businesses(self) -> list[Business]:
        rows = await self._fetch("SELECT id, amqp_user, first_party FROM businesses ORDER BY id")
        return [_business(r) for r in rows]

    async def remove_business(self, business_id: str) -> bool:
        return await self._execute("DELETE FROM businesses WHERE id = $1", business_id) == 1

    async def add_device(self, device: Device) -> bool:
        return await self._execute(
            "INSERT INTO devices (id, user_id, kem, enc_key, sign_key) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT DO NOTHING",
            device.id, device.user, device.kem.value, device.enc_key, device.sign_key) == 1

    async def device(self, device_id: str) -> Device | None:
        row = await self._row(f"SELECT {_DEVICE} FROM devices WHERE id = $1", device_id)
        return None if row is None else _device(row)

    async def devices_of(self, user: str) -> list[Device]:
        rows = await self._fetch(f"SELECT {_DEVICE} FROM devices WHERE user_id = $1 ORDER BY id",
                                 user)
        return [_device(r) for r in rows]

    async def devices(self) -> list[Device]:
        rows = await self._fetch(f"SELECT {_DEVICE} FROM devices ORDER BY user_id, id")
        return [_device(r) for r in rows]

    async def remove_device(self, device_id: str) -> bool:
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM sent WHERE device_id = $1", device_id)
            status = await conn.execute("DELETE FROM devices WHERE id = $1", device_id)
        return bool(status == "DELETE 1")

    async def conversation(self, conversation_id: str) -> Conversation | None:
        return _conversation(await self._row(
            f"SELECT {_CONVERSATION} FROM conversations WHERE id = $1", conversation_id))

    async def conversation_of(self, user: str, business: str) -> Conversation | None:
        return _conversation(await self._row(
            f"SELECT {_CONVERSATION} FROM conversations WHERE user_id = $1 AND business_id = $2",
            user, business))

    async def open_conversation(self, user: str, business: str, now_ms: int,
                                rotate_on_reopen: bool,
                                make_id: Callable[[int], str]) -> Conversation:
        active = await self._row(  # the common case, one statement: it is open already
            f"UPDATE conversations SET updated_ms = $3 WHERE user_id = $1 AND business_id = $2"
            f" AND state = 'open' RETURNING {_CONVERSATION}", user, business, now_ms)
        if active is not None:
            return Conversation(*active)
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                f"INSERT INTO conversations ({_CONVERSATION}) VALUES ($1, $2, $3, 'open', 0,"
                f" NULL, $4, $4) ON CONFLICT DO NOTHING RETURNING {_CONVERSATION}",
                make_id(0), user, business, now_ms)
            if row is not None:
                return Conversation(*row)
            current = Conversation(*(await conn.fetchrow(
                f"SELECT {_CONVERSATION} FROM conversations WHERE user_id = $1"
                " AND business_id = $2 FOR UPDATE", user, business) or ()))
            rotate = (current.state == "closed" and rotate_on_reopen
                      and current.closed_by == "user")
            epoch = current.epoch + 1 if rotate else current.epoch
            row = await conn.fetchrow(
                f"UPDATE conversations SET id = $3, state = 'open', epoch = $4, closed_by = NULL,"
                f" created_ms = $5, updated_ms = $6 WHERE user_id = $1 AND business_id = $2"
                f" RETURNING {_CONVERSATION}",
                user, business, make_id(epoch) if rotate else current.id, epoch,
                now_ms if rotate else current.created_ms, now_ms)
        return Conversation(*(row or ()))

    async def close_conversation(self, conversation_id: str, by: Party, now_ms: int) -> bool:
        return await self._execute(
            "UPDATE conversations SET state = 'closed', closed_by = $2, updated_ms = $3"
            " WHERE id = $1 AND state = 'open'", conversation_id, by, now_ms) == 1

    async def claim_seq(self, device_id: str, seq: int, window: int) -> bool:
        # Compare-and-set: read the window, decide, write only if nobody wrote in between;
        # a writer that lost the race reads again. Each round one claimant wins.
        for _ in range(1000):
            row = await self._row("SELECT high, bits FROM replay WHERE device_id = $1",
                                  device_id)
            replay = ReplayWindow(window) if row is None else ReplayWindow.from_bytes(
                window, row[0], row[1])
            if not replay.accept(seq):
                return False
            if row is None:
                changed = await self._execute(
                    "INSERT INTO replay (device_id, high, bits) VALUES ($1, $2, $3)"
                    " ON CONFLICT DO NOTHING", device_id, replay.high, replay.to_bytes())
            else:
                changed = await self._execute(
                    "UPDATE replay SET high = $2, bits = $3"
                    " WHERE device_id = $1 AND high = $4 AND bits = $5",
                    device_id, replay.high, replay.to_bytes(), row[0], row[1])
            if changed == 1:
                return True
        raise StoreUnavailableError("claim_seq: too much contention on one device")

    async def allocate_seqs(self, source: str, device_ids: Sequence[str],
                            now_ms: int) -> dict[str, int]:
        ids = list(device_ids)
        async with self._transaction() as conn:
            present = await conn.fetch("SELECT id FROM devices WHERE id = ANY($1::text[])"
                                       " ORDER BY id FOR UPDATE", ids)
            seqs: dict[str, int] = dict(map(tuple, await conn.fetch(
                "SELECT device_id, seq FROM sent WHERE source = $1"
                " AND device_id = ANY($2::text[])", source, ids)))
            missing = [r[0] for r in present if r[0] not in seqs]
            if missing:
                allocated: dict[str, int] = dict(map(tuple, await conn.fetch(
                    "UPDATE devices SET next_seq = next_seq + 1 WHERE id = ANY($1::text[])"
                    " RETURNING id, next_seq - 1", missing)))
                await conn.execute(
                    "INSERT INTO sent (source, device_id, seq, created_ms)"
                    " SELECT $1, d, s, $4 FROM unnest($2::text[], $3::bigint[]) AS t(d, s)",
                    source, list(allocated), list(allocated.values()), now_ms)
                seqs.update(allocated)
        return seqs
