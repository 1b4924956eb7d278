"""The embedded SQLite store: WAL, so several worker processes share one file.

Reads run on the event loop's thread; they are short and never wait for a writer.
The writes on the message path (claims, conversation changes, seq allocation) go through
a group commit: every write queued while the previous commit was in flight goes into
the next transaction, each in its own savepoint, so concurrent messages share one fsync
(synchronous=FULL, so a confirmed write survives power loss) and the loop never blocks
on one. Rare writes (registration) take the lock up front on the loop's thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from relayd.crypto import Kem
from relayd.errors import TransientError
from relayd.replay import ReplayWindow
from relayd.store import Business, Conversation, Device, Party

MIGRATIONS: list[str] = [
    """
    CREATE TABLE businesses (
        id TEXT PRIMARY KEY,
        amqp_user TEXT NOT NULL UNIQUE,
        first_party INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        kem TEXT NOT NULL,
        enc_key BLOB NOT NULL,
        sign_key BLOB NOT NULL,
        next_seq INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX devices_user ON devices (user_id);
    CREATE TABLE conversations (
        id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        business_id TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
        epoch INTEGER NOT NULL,
        closed_by TEXT CHECK (closed_by IN ('user', 'business')),
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (user_id, business_id)
    );
    CREATE TABLE replay (
        device_id TEXT PRIMARY KEY,
        high INTEGER NOT NULL,
        bits BLOB NOT NULL
    );
    CREATE TABLE sent (
        source TEXT NOT NULL,
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (source, device_id)
    );
    CREATE INDEX sent_created ON sent (created_ms);
    """,
]

_CONVERSATION = "id, user_id, business_id, state, epoch, closed_by, created_ms, updated_ms"


def _conversation(row: Any) -> Conversation | None:
    return None if row is None else Conversation(*row)


def _device(row: Any) -> Device | None:
    return None if row is None else Device(row[0], row[1], Kem(row[2]), row[3], row[4])


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 10000")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")
    return db


Op = Callable[[sqlite3.Connection], Any]
Outcome = tuple[bool, Any]


class SqliteStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect(self.path)
        self.migrate()
        self._writer = _connect(self.path)
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="relayd-sqlite")
        self._queued: list[tuple[Op, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def _commit(self, op: Op) -> Any:
        """Run `op` in the next group commit and return its result once it is durable."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((op, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                outcomes = await loop.run_in_executor(self._committer, self._apply,
                                                      [op for op, _ in batch])
                for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():  # its waiter was cancelled; the write stands
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._flusher = None

    def _apply(self, ops: list[Op]) -> list[Outcome]:
        """One transaction; each op in a savepoint, so one failing op undoes only itself."""
        db, outcomes = self._writer, []
        try:
            db.execute("BEGIN IMMEDIATE")
            for op in ops:
                db.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, op(db)))
                except Exception as exc:
                    db.execute("ROLLBACK TO op")
                    outcomes.append((False, exc))
                db.execute("RELEASE op")
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            error = TransientError("store_busy", type(exc).__name__)
            return [(False, error)] * len(ops)
        return outcomes

    def migrate(self) -> int:
        """Apply the migrations this file lacks; return the schema version."""
        with self._write() as db:
            version: int = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
        return len(MIGRATIONS)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _one(self, sql: str, *args: Any) -> Any:
        return self._db.execute(sql, args).fetchone()

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher
        self._committer.shutdown()
        self._writer.close()
        self._db.close()

    async def add_business(self, business: Business) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO businesses (id, amqp_user, first_party) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (business.id, business.amqp_user, business.first_party),
            )
            return cursor.rowcount == 1

    async def business(self, business_id: str) -> Business | None:
        row = self._one("SELECT id, amqp_user, first_party FROM businesses WHERE id = ?",
                        business_id)
        return None if row is None else Business(row[0], row[1], bool(row[2]))

    async def business_by_amqp_user(self, amqp_user: str) -> Business | None:
        row = self._one("SELECT id, amqp_user, first_party FROM businesses WHERE amqp_user = ?",
                        amqp_user)
        return None if row is None else Business(row[0], row[1], bool(row[2]))

    async def businesses(self) -> list[Business]:
        rows = self._db.execute("SELECT id, amqp_user, first_party FROM businesses ORDER BY id")
        return [Business(r[0], r[1], bool(r[2])) for r in rows]

    async def remove_business(self, business_id: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM businesses WHERE id = ?", (business_id,)).rowcount == 1

    async def add_device(self, device: Device) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO devices (id, user_id, kem, enc_key, sign_key) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (device.id, device.user, device.kem.value, device.enc_key, device.sign_key),
            )
            return cursor.rowcount == 1

    async def device(self, device_id: str) -> Device | None:
        return _device(self._one(
            "SELECT id, user_id, kem, enc_key, sign_key FROM devices WHERE id = ?", device_id))

    async def devices_of(self, user: str) -> list[Device]:
        rows = self._db.execute(
            "SELECT id, user_id, kem, enc_key, sign_key FROM devices WHERE user_id = ?"
            " ORDER BY id", (user,))
        return [Device(r[0], r[1], Kem(r[2]), r[3], r[4]) for r in rows]

    async def devices(self) -> list[Device]:
        rows = self._db.execute(
            "SELECT id, user_id, kem, enc_key, sign_key FROM devices ORDER BY user_id, id")
        return [Device(r[0], r[1], Kem(r[2]), r[3], r[4]) for r in rows]

    async def remove_device(self, device_id: str) -> bool:
        with self._write() as db:
            db.execute("DELETE FROM sent WHERE device_id = ?", (device_id,))
            return db.execute("DELETE FROM devices WHERE id = ?", (device_id,)).rowcount == 1

    async def conversation(self, conversation_id: str) -> Conversation | None:
        return _conversation(self._one(
            f"SELECT {_CONVERSATION} FROM conversations WHERE id = ?", conversation_id))

    async def conversation_of(self, user: str, business: str) -> Conversation | None:
        return _conversation(self._one(
            f"SELECT {_CONVERSATION} FROM conversations WHERE user_id = ? AND business_id = ?",
            user, business))

    async def open_conversation(self, user: str, business: str, now_ms: int,
                                rotate_on_reopen: bool,
                                make_id: Callable[[int], str]) -> Conversation:
        def op(db: sqlite3.Connection) -> Conversation:
            current = _conversation(db.execute(
                f"SELECT {_CONVERSATION} FROM conversations WHERE user_id = ? AND business_id = ?",
                (user, business)).fetchone())
            if current is None:
                db.execute(
                    f"INSERT INTO conversations ({_CONVERSATION}) VALUES (?, ?, ?, 'open', 0,"
                    " NULL, ?, ?)", (make_id(0), user, business, now_ms, now_ms))
            elif current.state == "closed":
                rotate = rotate_on_reopen and current.closed_by == "user"
                epoch = current.epoch + 1 if rotate else current.epoch
                db.execute(
                    "UPDATE conversations SET id = ?, state = 'open', epoch = ?, closed_by = NULL,"
                    " created_ms = ?, updated_ms = ? WHERE user_id = ? AND business_id = ?",
                    (make_id(epoch), epoch, now_ms if rotate else current.created_ms, now_ms,
                     user, business))
            else:
                db.execute("UPDATE conversations SET updated_ms = ? WHERE id = ?",
                           (now_ms, current.id))
            row = db.execute(
                f"SELECT {_CONVERSATION} FROM conversations WHERE user_id = ? AND business_id = ?",
                (user, business)).fetchone()
            return Conversation(*row)

        conversation: Conversation = await self._commit(op)
        return conversation

    async def close_conversation(self, conversation_id: str, by: Party, now_ms: int) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            return db.execute(
                "UPDATE conversations SET state = 'closed', closed_by = ?, updated_ms = ?"
                " WHERE id = ? AND state = 'open'", (by, now_ms, conversation_id)).rowcount == 1

        return bool(await self._commit(op))

    async def claim_seq(self, device_id: str, seq: int, window: int) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT high, bits FROM replay WHERE device_id = ?",
                             (device_id,)).fetchone()
            replay = ReplayWindow(window) if row is None else ReplayWindow.from_bytes(
                window, row[0], row[1])
            if not replay.accept(seq):
                return False
            db.execute(
                "INSERT INTO replay (device_id, high, bits) VALUES (?, ?, ?)"
                " ON CONFLICT (device_id) DO UPDATE SET high = excluded.high, bits = excluded.bits",
                (device_id, replay.high, replay.to_bytes()))
            return True

        return bool(await self._commit(op))

    async def allocate_seqs(self, source: str, device_ids: Sequence[str],
                            now_ms: int) -> dict[str, int]:
        def op(db: sqlite3.Connection) -> dict[str, int]:
            seqs: dict[str, int] = dict(db.execute(
                f"SELECT device_id, seq FROM sent WHERE source = ? AND device_id IN"
                f" ({','.join('?' * len(device_ids))})", (source, *device_ids)).fetchall())
            for device_id in device_ids:
                if device_id in seqs:
                    continue
                row = db.execute(
                    "UPDATE devices SET next_seq = next_seq + 1 WHERE id = ?"
                    " RETURNING next_seq - 1", (device_id,)).fetchone()
                if row is None:  # removed meanwhile: nothing to seal to
                    continue
                seqs[device_id] = row[0]
                db.execute("INSERT INTO sent (source, device_id, seq, created_ms)"
                           " VALUES (?, ?, ?, ?)", (source, device_id, row[0], now_ms))
            return seqs

        seqs: dict[str, int] = await self._commit(op)
        return seqs
