"""The embedded SQLite store: WAL, so several worker processes share one file.

Reads run on the event loop's thread; they are short and never wait for a writer.
The writes on the message path (claims, conversation changes, seq allocation) go through
a group commit: every write queued while the previous commit was in flight goes into
the next transaction, so concurrent messages share one fsync (synchronous=FULL, so a
confirmed write survives power loss) and the loop never waits for one. When the write
lock is free, the transaction's statements run on the loop's thread, and only COMMIT
(with its fsync, and letting go of the lock) on a thread of its own: statements on that
thread would each hand the GIL to the busy loop and wait to get it back, which cost more
CPU than the statements (docs/performance.md). When another process holds the lock, the
whole transaction goes to that thread, which waits for it. Either way the lock is never
held by something that waits for the loop, so rare writes (registration) and
checkpoints take it on the loop's thread: they wait for another writer's turn at most.
Deleted rows are overwritten (secure_delete), and erasure and pruning end with a
truncating checkpoint, so what is deleted does not linger in the file or its WAL.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from relayd import rules
from relayd.errors import RelaydError, StoreError, StoreUnavailableError, TransientError
from relayd.replay import ReplayWindow
from relayd.store import (
    AuditRecord,
    Business,
    Conversation,
    Device,
    Party,
    ReplyClaim,
    ReplyOutcome,
    UpClaim,
    UpOutcome,
    UserData,
    rows,
)

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
    # 2: what retention and the audit trail need.
    """
    ALTER TABLE devices ADD COLUMN created_ms INTEGER;
    ALTER TABLE replay ADD COLUMN updated_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE replay ADD COLUMN user_id TEXT;
    UPDATE replay SET updated_ms = CAST(strftime('%s', 'now') AS INTEGER) * 1000,
        user_id = (SELECT user_id FROM devices WHERE devices.id = replay.device_id);
    CREATE INDEX replay_user ON replay (user_id);
    CREATE INDEX conversations_updated ON conversations (updated_ms);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_at ON audit (at_ms);
    """,
    # 3: the relayd processes alive, among which the shards are shared (relayd.shard).
    """
    CREATE TABLE members (
        role TEXT NOT NULL,
        member TEXT NOT NULL,
        seen_ms INTEGER NOT NULL,
        PRIMARY KEY (role, member)
    );
    """,
    # 4: ids as pseudonyms; per-user keys and what they seal (relayd.store.pseudonym).
    # The ids already held are rewritten once, by the pseudonymous layer, which holds the
    # secret: legacy_ids marks that it is still to do.
    """
    CREATE TABLE people (
        id TEXT PRIMARY KEY,
        key BLOB NOT NULL,
        sealed BLOB NOT NULL,
        seen_ms INTEGER NOT NULL
    );
    ALTER TABLE devices ADD COLUMN sealed BLOB;
    CREATE TABLE legacy_ids (pending INTEGER NOT NULL);
    INSERT INTO legacy_ids SELECT 1 WHERE EXISTS (SELECT 1 FROM devices)
        OR EXISTS (SELECT 1 FROM conversations) OR EXISTS (SELECT 1 FROM replay);
    """,
    # 5: which business messages reached a device, or expired, first (relayd.receipts).
    """
    CREATE TABLE receipts (
        key TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE INDEX receipts_created ON receipts (created_ms);
    """,
    # 6: `sent` keyed by device first (as PostgreSQL's schema 9), so that deleting a
    # device's rows (its removal, an erasure) reads only them, not the whole table. The
    # key serves the seqs' lookups (a source's row for each of some devices) as before,
    # and adds no index to write. SQLite changes no key in place: the rows are copied.
    """
    CREATE TABLE sent_by_device (
        source TEXT NOT NULL,
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (device_id, source)
    );
    INSERT INTO sent_by_device (source, device_id, seq, created_ms)
        SELECT source, device_id, seq, created_ms FROM sent;
    DROP TABLE sent;
    ALTER TABLE sent_by_device RENAME TO sent;
    CREATE INDEX sent_created ON sent (created_ms);
    """,
]
_HELD = ("SELECT user_id FROM devices UNION SELECT user_id FROM conversations"
         " UNION SELECT user_id FROM replay WHERE user_id IS NOT NULL")

_CONVERSATION, _DEVICE, _BUSINESS = rows.CONVERSATION, rows.DEVICE, rows.BUSINESS


def _audit(db: sqlite3.Connection, action: str, subject: str,
           detail: Mapping[str, int | str | bool], at_ms: int) -> None:
    db.execute(f"INSERT INTO audit ({rows.AUDIT}) VALUES (?, ?, ?, ?)",
               (at_ms, action, subject, rows.detail(detail)))


def _error(exc: Exception) -> RelaydError:
    """A failure inside the store as one of the store's errors: a busy or locked file (or
    a full disk) may pass; anything else is the store's own failure."""
    if isinstance(exc, RelaydError):
        return exc
    if isinstance(exc, sqlite3.OperationalError):
        return TransientError("store_busy", type(exc).__name__)
    return StoreError(f"SQLite: {type(exc).__name__}")


BUSY_MS = 10_000  # how long a statement waits for a lock another connection holds


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA secure_delete = ON")
    return db


def _lock_file(path: Path) -> int:
    """A descriptor of `<db>.lock`: writers of every process take it in turn.

    SQLite's own busy handler polls with sleeps of up to 100 ms, so two processes that
    commit often wait far longer than the commits take; flock() wakes the next writer
    the moment the lock is free.
    """
    return os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _flock(fd: int, operation: int) -> None:
    """flock(); BlockingIOError if LOCK_NB and held elsewhere, StoreUnavailableError once
    the store is closed (close() sets its descriptors to -1) or the lock cannot be had."""
    if fd < 0:
        raise StoreUnavailableError("the SQLite store is closed")
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        raise
    except OSError as exc:
        raise StoreUnavailableError(f"SQLite's lock file: {type(exc).__name__}") from None


@contextmanager
def _locked(fd: int) -> Iterator[None]:
    _flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        _flock(fd, fcntl.LOCK_UN)


_HOUSEHOLD = (f"SELECT {_DEVICE} FROM devices WHERE user_id ="
              " (SELECT user_id FROM devices WHERE id = ?) ORDER BY id")
# What accept_up checks of a household: each device's id, user, kem and keys.
_KEYS = ("SELECT id, user_id, kem, enc_key, sign_key FROM devices WHERE user_id ="
         " (SELECT user_id FROM devices WHERE id = ?) ORDER BY id")


def _conversation_of(db: sqlite3.Connection, user: str, business: str) -> Conversation | None:
    return rows.conversation(db.execute(
        f"SELECT {_CONVERSATION} FROM conversations WHERE user_id = ? AND business_id = ?",
        (user, business)).fetchone())


def _open(db: sqlite3.Connection, current: Conversation | None, user: str, business: str,
          now_ms: int, rotate_on_reopen: bool, make_id: Callable[[int], str]) -> Conversation:
    """Create, reopen or note activity on the conversation `current` (as read in this
    transaction), as relayd.rules.opening decides."""
    row = rules.opening(current, rotate_on_reopen, now_ms, secrets.randbits(62))
    conversation_id = make_id(row.epoch) if row.new_id or current is None else current.id
    db.execute(
        f"INSERT INTO conversations ({_CONVERSATION}) VALUES (?, ?, ?, 'open', ?, NULL,"
        " ?, ?) ON CONFLICT (user_id, business_id) DO UPDATE SET id = excluded.id,"
        " state = 'open', epoch = excluded.epoch, closed_by = NULL,"
        " created_ms = excluded.created_ms, updated_ms = excluded.updated_ms",
        (conversation_id, user, business, row.epoch, row.created_ms, now_ms))
    return Conversation(conversation_id, user, business, "open", row.epoch, None,
                        row.created_ms, now_ms)


def _close(db: sqlite3.Connection, conversation_id: str, by: Party, now_ms: int) -> bool:
    return db.execute(
        "UPDATE conversations SET state = 'closed', closed_by = ?, updated_ms = ?"
        " WHERE id = ? AND state = 'open'", (by, now_ms, conversation_id)).rowcount == 1


def _claim(db: sqlite3.Connection, device_id: str, seq: int, window: int) -> bool:
    row = db.execute("SELECT high, bits FROM replay WHERE device_id = ?",
                     (device_id,)).fetchone()
    replay = ReplayWindow(window) if row is None else ReplayWindow.from_bytes(
        window, row[0], row[1])
    if not replay.accept(seq):
        return False
    db.execute(
        "INSERT INTO replay (device_id, high, bits, updated_ms, user_id) VALUES"
        " (?, ?, ?, ?, (SELECT user_id FROM devices WHERE id = ?))"
        " ON CONFLICT (device_id) DO UPDATE SET high = excluded.high, bits = excluded.bits,"
        " updated_ms = excluded.updated_ms, user_id = excluded.user_id",
        (device_id, replay.high, replay.to_bytes(), rows.now_ms(), device_id))
    return True


def _allocate(db: sqlite3.Connection, source: str, device_ids: Sequence[str],
              now_ms: int) -> dict[str, int]:
    if not device_ids:
        return {}
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


Op = Callable[[sqlite3.Connection], Any]
Outcome = tuple[bool, Any]


class SqliteStore:
    def __init__(self, path: str | Path, migrate: bool = True) -> None:
        """Open the file (StoreUnavailableError if it cannot be opened), and migrate it
        (StoreError if its schema is newer than this relayd knows)."""
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db, self._db_lock = _connect(self.path), _lock_file(self.path)
            self._writer, self._writer_lock = _connect(self.path), _lock_file(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailableError(f"cannot open {self.path}: {type(exc).__name__}") from None
        if migrate:
            try:
                self._migrate()
            except RelaydError:
                self._close()
                raise
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="relayd-sqlite")
        self._queued: list[tuple[Op, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._committing: asyncio.Future[Any] | None = None  # the thread's last batch

    async def _commit(self, op: Op) -> Any:
        """Run `op` in the next group commit and return its result once it is durable."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((op, future))
        if self._flusher is None or self._flusher.done():  # done: cancelled before it ran
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        batch: list[tuple[Op, asyncio.Future[Any]]] = []
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                try:
                    outcomes = await self._apply([op for op, _ in batch])
                except Exception as exc:  # the store closed, its thread gone
                    outcomes = [(False, _error(exc))] * len(batch)
                for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():  # its waiter was cancelled; the write stands
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
                batch = []
        except (Exception, asyncio.CancelledError):  # the loop closing: none left hanging
            for _, future in batch + self._queued:
                if not future.done():
                    future.set_exception(StoreUnavailableError("the writes were cut short"))
            self._queued = []
            raise
        finally:
            self._flusher = None

    async def _apply(self, ops: list[Op]) -> list[Outcome]:
        """Commit `ops` together: on the loop's thread up to COMMIT if the write lock is
        free, else all of it on the committer's thread."""
        loop = asyncio.get_running_loop()
        if self._committing is not None and not self._committing.done():
            # A flush was cancelled (the loop closing) while the thread had its batch:
            # that batch still commits, and holds the writer until it has.
            await asyncio.wait([self._committing])
        if not self._begin():
            waiting = loop.run_in_executor(self._committer, self._apply_waiting, ops)
            self._committing = waiting
            outcomes: list[Outcome] = await asyncio.shield(waiting)  # never cut short
            return outcomes
        try:
            outcomes = self._run(self._writer, ops)
            self._committing = loop.run_in_executor(self._committer, self._end)
        except BaseException as exc:  # a statement failed; or the thread is gone
            self._rollback()
            if isinstance(exc, sqlite3.Error):
                return [(False, _error(exc))] * len(ops)
            raise
        try:
            await asyncio.shield(self._committing)  # begun, it ends: never cut short
        except sqlite3.Error as exc:
            return [(False, _error(exc))] * len(ops)
        return outcomes

    def _begin(self) -> bool:
        """Take the write lock and begin a transaction, if that waits for no one."""
        try:
            _flock(self._writer_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        db = self._writer
        try:
            # Holding the lock, this is the only writer of the file (checkpoints take
            # it too); should another be writing anyway, its turn is not awaited here.
            db.execute("PRAGMA busy_timeout = 0")
            try:
                db.execute("BEGIN IMMEDIATE")
            finally:
                db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
        except sqlite3.Error:
            self._rollback()
            return False
        return True

    def _end(self) -> None:
        """COMMIT (ROLLBACK should it fail) and let go of the write lock."""
        try:
            self._writer.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        _flock(self._writer_lock, fcntl.LOCK_UN)

    def _rollback(self) -> None:
        try:
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
        finally:
            _flock(self._writer_lock, fcntl.LOCK_UN)

    def _apply_waiting(self, ops: list[Op]) -> list[Outcome]:
        """Commit `ops` together on the committer's thread, waiting for the write lock."""
        db = self._writer
        with _locked(self._writer_lock):
            try:
                db.execute("BEGIN IMMEDIATE")
                outcomes = self._run(db, ops)
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                return [(False, _error(exc))] * len(ops)
        return outcomes

    @staticmethod
    def _run(db: sqlite3.Connection, ops: list[Op]) -> list[Outcome]:
        """The ops, one after another, in the open transaction; should one raise, all are
        rolled back and run again, each in a savepoint, so that a failing op undoes only
        itself. Ops fail rarely, and a savepoint costs two statements per op. (An op may
        run twice: it reads and writes the database only, and the first run is undone.)"""
        db.execute("SAVEPOINT batch")
        try:
            return [(True, op(db)) for op in ops]
        except Exception:
            db.execute("ROLLBACK TO batch")
        outcomes: list[Outcome] = []
        for op in ops:
            db.execute("SAVEPOINT op")
            try:
                outcomes.append((True, op(db)))
            except Exception as exc:
                db.execute("ROLLBACK TO op")
                outcomes.append((False, _error(exc)))
            db.execute("RELEASE op")
        return outcomes

    def _migrate(self) -> tuple[int, int]:
        with self._write() as db:
            version: int = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(f"the database schema is at version {version}, newer than"
                                 f" this relayd knows ({len(MIGRATIONS)}): upgrade relayd")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
        if version < len(MIGRATIONS):  # what they rewrote or dropped leaves the WAL too
            self._scrub()
        return version, len(MIGRATIONS)

    async def migrate(self) -> tuple[int, int]:
        """Apply the migrations this file lacks; return (version before, version now)."""
        return self._migrate()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction on the loop's thread, holding the write lock."""
        try:
            with _locked(self._db_lock):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        except (sqlite3.Error, ValueError) as exc:
            raise _error(exc) from None

    def _scrub(self) -> None:
        """Copy the WAL into the file and truncate it (best effort: readers may hold it).
        It keeps writers out while it waits for readers: it holds the write lock."""
        try:
            with _locked(self._db_lock):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise _error(exc) from None

    def _all(self, sql: str, *args: Any) -> list[Any]:
        try:
            return self._db.execute(sql, args).fetchall()
        except (sqlite3.Error, ValueError) as exc:  # ValueError: a str it cannot encode
            raise _error(exc) from None

    def _one(self, sql: str, *args: Any) -> Any:
        found = self._all(sql, *args)
        return found[0] if found else None

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        self._committer.shutdown()
        self._close()

    def _close(self) -> None:
        self._writer.close()
        self._db.close()
        os.close(self._writer_lock)
        os.close(self._db_lock)
        self._writer_lock = self._db_lock = -1  # not a descriptor reused by another file

    async def add_business(self, business: Business) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO businesses (id, amqp_user, first_party) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (business.id, business.amqp_user, business.first_party),
            )
            if cursor.rowcount == 1:
                _audit(db, "business_add", business.id,
                       {"first_party": business.first_party}, rows.now_ms())
            return cursor.rowcount == 1

    async def business(self, business_id: str) -> Business | None:
        row = self._one(f"SELECT {_BUSINESS} FROM businesses WHERE id = ?", business_id)
        return None if row is None else rows.business(row)

    async def business_by_amqp_user(self, amqp_user: str) -> Business | None:
        row = self._one(f"SELECT {_BUSINESS} FROM businesses WHERE amqp_user = ?", amqp_user)
        return None if row is None else rows.business(row)

    async def businesses(self) -> list[Business]:
        return [rows.business(r) for r in self._all(
            f"SELECT {_BUSINESS} FROM businesses ORDER BY id")]

    async def remove_business(self, business_id: str) -> bool:
        with self._write() as db:
            row = db.execute("DELETE FROM businesses WHERE id = ? RETURNING first_party",
                             (business_id,)).fetchone()
            if row is not None:
                _audit(db, "business_remove", business_id, {"first_party": bool(row[0])},
                       rows.now_ms())
            return row is not None

    async def add_device(self, device: Device) -> bool:
        with self._write() as db:
            cursor = db.execute(
                f"INSERT INTO devices ({_DEVICE}) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING", rows.device_values(device))
            return cursor.rowcount == 1

    async def device(self, device_id: str) -> Device | None:
        row = self._one(f"SELECT {_DEVICE} FROM devices WHERE id = ?", device_id)
        return None if row is None else rows.device(row)

    async def devices_of(self, user: str) -> list[Device]:
        return [rows.device(r) for r in self._all(
            f"SELECT {_DEVICE} FROM devices WHERE user_id = ? ORDER BY id", user)]

    async def household(self, device_id: str) -> list[Device]:
        return [rows.device(r) for r in self._all(_HOUSEHOLD, device_id)]

    async def devices(self) -> list[Device]:
        return [rows.device(r) for r in self._all(
            f"SELECT {_DEVICE} FROM devices ORDER BY user_id, id")]

    async def remove_device(self, device_id: str) -> bool:
        with self._write() as db:
            db.execute("DELETE FROM sent WHERE device_id = ?", (device_id,))
            return db.execute("DELETE FROM devices WHERE id = ?", (device_id,)).rowcount == 1

    async def conversation(self, conversation_id: str) -> Conversation | None:
        return rows.conversation(self._one(
            f"SELECT {_CONVERSATION} FROM conversations WHERE id = ?", conversation_id))

    async def conversation_of(self, user: str, business: str) -> Conversation | None:
        return rows.conversation(self._one(
            f"SELECT {_CONVERSATION} FROM conversations WHERE user_id = ? AND business_id = ?",
            user, business))

    async def business_and_conversation(
            self, business_id: str, user: str) -> tuple[Business | None, Conversation | None]:
        return rows.business_and_conversation(self._one(
            f"SELECT {rows.BUSINESS_JOINED}, {rows.CONVERSATION_JOINED} FROM businesses b"
            " LEFT JOIN conversations c ON c.business_id = b.id AND c.user_id = ?"
            " WHERE b.id = ?", user, business_id))

    async def open_conversation(self, user: str, business: str, now_ms: int,
                                rotate_on_reopen: bool,
                                make_id: Callable[[int], str]) -> Conversation:
        def op(db: sqlite3.Connection) -> Conversation:
            return _open(db, _conversation_of(db, user, business), user, business, now_ms,
                         rotate_on_reopen, make_id)

        conversation: Conversation = await self._commit(op)
        return conversation

    async def close_conversation(self, conversation_id: str, by: Party, now_ms: int) -> bool:
        return bool(await self._commit(lambda db: _close(db, conversation_id, by, now_ms)))

    async def accept_up(self, claim: UpClaim) -> UpOutcome:
        def op(db: sqlite3.Connection) -> UpOutcome:
            if db.execute(_KEYS, (claim.device,)).fetchall() != [
                    (d.id, d.user, d.kem.value, d.enc_key, d.sign_key) for d in claim.household]:
                return UpOutcome("stale")
            household = claim.household
            found = db.execute(f"SELECT {_BUSINESS} FROM businesses WHERE id = ?",
                               (claim.business,)).fetchone()
            if found is None:
                return UpOutcome("unknown_business")
            business = rows.business(found)
            first_time = _claim(db, claim.device, claim.seq, claim.window)
            if not first_time and not claim.redelivered:
                return UpOutcome("replayed", business)
            user = next(d.user for d in household if d.id == claim.device)
            current = _conversation_of(db, user, claim.business)
            decision = rules.up(current, claim.kind, not first_time, claim.now_ms)
            if decision.refusal is not None:
                return UpOutcome("refused", business, current, not first_time,
                                 (decision.refusal, decision.detail))
            conversation = current
            if decision.write == "open":
                conversation = _open(db, current, user, claim.business, claim.now_ms,
                                     claim.rotate_on_reopen, claim.make_id)
            elif decision.write == "close" and current is not None:
                _close(db, current.id, "user", claim.now_ms)
            seqs = _allocate(db, claim.source, claim.echo_to, claim.now_ms)
            return UpOutcome("accepted", business, conversation, not first_time, None, seqs)

        outcome: UpOutcome = await self._commit(op)
        return outcome

    async def accept_reply(self, claim: ReplyClaim) -> ReplyOutcome:
        def op(db: sqlite3.Connection) -> ReplyOutcome:
            b = claim.business
            if db.execute("SELECT 1 FROM businesses WHERE id = ? AND amqp_user = ?"
                          " AND first_party = ?",
                          (b.id, b.amqp_user, b.first_party)).fetchone() is None:
                return ReplyOutcome("stale")
            current = rows.conversation(db.execute(
                f"SELECT {_CONVERSATION} FROM conversations WHERE id = ?",
                (claim.conversation,)).fetchone())
            decision = rules.reply(current, b.id, claim.kind, claim.redelivered)
            if decision.refusal is not None or current is None:
                return ReplyOutcome("refused", (decision.refusal or "", decision.detail))
            if decision.write == "close":
                _close(db, current.id, "business", claim.now_ms)
            devices = tuple(rows.device(r) for r in db.execute(
                f"SELECT {_DEVICE} FROM devices WHERE user_id = ? ORDER BY id",
                (current.user,)))
            seqs = _allocate(db, claim.source, [d.id for d in devices], claim.now_ms)
            return ReplyOutcome("accepted", None, devices, seqs)

        outcome: ReplyOutcome = await self._commit(op)
        return outcome

    async def claim_seq(self, device_id: str, seq: int, window: int) -> bool:
        return bool(await self._commit(lambda db: _claim(db, device_id, seq, window)))

    async def allocate_seqs(self, source: str, device_ids: Sequence[str],
                            now_ms: int) -> dict[str, int]:
        seqs: dict[str, int] = await self._commit(
            lambda db: _allocate(db, source, device_ids, now_ms))
        return seqs

    async def claim_receipt(self, key: str, kind: str, now_ms: int) -> tuple[str, bool]:
        def op(db: sqlite3.Connection) -> tuple[str, bool]:
            inserted = db.execute("INSERT INTO receipts (key, kind, created_ms) VALUES (?, ?, ?)"
                                  " ON CONFLICT (key) DO NOTHING", (key, kind, now_ms)).rowcount
            first: str = db.execute("SELECT kind FROM receipts WHERE key = ?",
                                    (key,)).fetchone()[0]
            return first, inserted == 1

        claimed: tuple[str, bool] = await self._commit(op)
        return claimed

    async def members(self, role: str, member: str, ttl_ms: int) -> list[str]:
        def op(db: sqlite3.Connection) -> list[str]:
            now = rows.now_ms()
            db.execute("INSERT INTO members (role, member, seen_ms) VALUES (?, ?, ?)"
                       " ON CONFLICT (role, member) DO UPDATE SET seen_ms = excluded.seen_ms",
                       (role, member, now))
            db.execute("DELETE FROM members WHERE role = ? AND seen_ms < ?",
                       (role, now - ttl_ms))
            return [row[0] for row in db.execute(
                "SELECT member FROM members WHERE role = ? ORDER BY member", (role,))]

        members: list[str] = await self._commit(op)
        return members

    async def leave(self, role: str, member: str) -> None:
        await self._commit(lambda db: db.execute(
            "DELETE FROM members WHERE role = ? AND member = ?", (role, member)))

    async def export_user(self, user: str) -> UserData:
        with self._write() as db:  # one consistent snapshot
            devices = [rows.device(r) for r in db.execute(
                f"SELECT {_DEVICE} FROM devices WHERE user_id = ? ORDER BY id", (user,))]
            conversations = [Conversation(*r) for r in db.execute(
                f"SELECT {_CONVERSATION} FROM conversations WHERE user_id = ? ORDER BY id",
                (user,))]
            highest = dict(db.execute(
                "SELECT device_id, high FROM replay WHERE device_id IN"
                " (SELECT id FROM devices WHERE user_id = ?)", (user,)).fetchall())
            next_seq = dict(db.execute("SELECT id, next_seq FROM devices WHERE user_id = ?",
                                       (user,)).fetchall())
        return UserData(devices, conversations, highest, next_seq)

    async def erase_user(self, user: str) -> dict[str, int]:
        mine = "(SELECT id FROM devices WHERE user_id = ?)"
        with self._write() as db:
            counts = {
                "sent": db.execute(f"DELETE FROM sent WHERE device_id IN {mine}",
                                   (user,)).rowcount,
                "replay": db.execute(
                    f"DELETE FROM replay WHERE user_id = ? OR device_id IN {mine}",
                    (user, user)).rowcount,
                "devices": db.execute("DELETE FROM devices WHERE user_id = ?", (user,)).rowcount,
                "conversations": db.execute(
                    "DELETE FROM conversations WHERE user_id = ? AND state = 'closed'",
                    (user,)).rowcount,
            }
            counts["open"] = db.execute("SELECT count(*) FROM conversations WHERE user_id = ?",
                                        (user,)).fetchone()[0]
        self._scrub()
        return counts

    async def stale_conversations(self, before_ms: int) -> list[Conversation]:
        return [Conversation(*r) for r in self._all(
            f"SELECT {_CONVERSATION} FROM conversations WHERE state = 'open' AND updated_ms < ?"
            " ORDER BY updated_ms, id", before_ms)]

    async def prune(self, *, conversations_before_ms: int, replay_before_ms: int,
                    sent_before_ms: int, audit_before_ms: int,
                    receipts_before_ms: int = 0) -> dict[str, int]:
        with self._write() as db:
            counts = {
                "conversations": db.execute(
                    "DELETE FROM conversations WHERE state = 'closed' AND updated_ms < ?",
                    (conversations_before_ms,)).rowcount,
                "replay": db.execute(
                    "DELETE FROM replay WHERE updated_ms < ?"
                    " AND device_id NOT IN (SELECT id FROM devices)",
                    (replay_before_ms,)).rowcount,
                "sent": db.execute("DELETE FROM sent WHERE created_ms < ?",
                                   (sent_before_ms,)).rowcount,
                "audit": db.execute("DELETE FROM audit WHERE at_ms < ?",
                                    (audit_before_ms,)).rowcount,
                "receipts": db.execute("DELETE FROM receipts WHERE created_ms < ?",
                                       (receipts_before_ms,)).rowcount,
            }
        self._scrub()
        return counts

    async def add_audit(self, action: str, subject: str,
                        detail: Mapping[str, int | str | bool], at_ms: int) -> None:
        with self._write() as db:
            _audit(db, action, subject, detail, at_ms)

    async def audit_log(self) -> list[AuditRecord]:
        return [rows.audit(r) for r in self._all(
            f"SELECT {rows.AUDIT} FROM audit ORDER BY at_ms, id")]

    async def add_person(self, user: str, key: bytes, sealed: bytes) -> tuple[bytes, bytes]:
        with self._write() as db:
            kept = db.execute(
                "INSERT INTO people (id, key, sealed, seen_ms) VALUES (?, ?, ?, ?) ON CONFLICT"
                " (id) DO UPDATE SET seen_ms = excluded.seen_ms RETURNING key, sealed",
                (user, key, sealed, rows.now_ms())).fetchone()
        return kept[0], kept[1]

    import_person = add_person  # it keeps what it is given, always

    async def people(self, users: Sequence[str]) -> dict[str, tuple[bytes, bytes]]:
        found: dict[str, tuple[bytes, bytes]] = {}
        for start in range(0, len(users), 500):
            chunk = users[start:start + 500]
            found.update((r[0], (r[1], r[2])) for r in self._all(
                f"SELECT id, key, sealed FROM people WHERE id IN ({','.join('?' * len(chunk))})",
                *chunk))
        return found

    async def forget_people(self, users: Sequence[str], *,
                            seen_before_ms: int | None = None) -> int:
        """Delete the keys; secure_delete overwrites them, the checkpoint empties the WAL."""
        if not users:
            return 0
        before = 2 ** 63 - 1 if seen_before_ms is None else seen_before_ms  # or: every one
        with self._write() as db:
            gone = sum(db.execute("DELETE FROM people WHERE id = ? AND seen_ms < ?",
                                  (user, before)).rowcount for user in users)
        self._scrub()
        return gone

    async def all_people(self, seen_before_ms: int) -> list[str]:
        return [row[0] for row in self._all(
            "SELECT id FROM people WHERE seen_ms < ? ORDER BY id", seen_before_ms)]

    async def seal_person(self, user: str, sealed: bytes) -> tuple[bytes, bytes] | None:
        """Set the sealed account id of a person that has none yet (the vault service made
        its key); return the person as kept, None if there is none."""
        with self._write() as db:
            db.execute("UPDATE people SET sealed = ? WHERE id = ? AND length(sealed) = 0",
                       (sealed, user))
            kept = db.execute("SELECT key, sealed FROM people WHERE id = ?", (user,)).fetchone()
        return None if kept is None else (kept[0], kept[1])

    async def people_page(self, seen_before_ms: int, after: str, limit: int) -> list[str]:
        """all_people a page at a time: at most `limit` pseudonyms, those after `after`."""
        return [row[0] for row in self._all(
            "SELECT id FROM people WHERE seen_ms < ? AND id > ? ORDER BY id LIMIT ?",
            seen_before_ms, after, limit)]

    async def held_people(self) -> set[str]:
        return {row[0] for row in self._all(_HELD)}

    async def legacy_ids(self) -> tuple[set[str], dict[str, str | None]] | None:
        with self._write() as db:
            if db.execute("SELECT pending FROM legacy_ids").fetchone() is None:
                return None
            return rows.legacy_ids(db.execute(_HELD), db.execute(
                "SELECT id, user_id FROM devices"), db.execute("SELECT device_id FROM replay"))

    async def pseudonymise(self, users: Mapping[str, str],
                           devices: Mapping[str, tuple[str, bytes | None]]) -> None:
        with self._write() as db:
            if db.execute("SELECT pending FROM legacy_ids").fetchone() is None:
                return  # another process did it meanwhile
            for old, (new, sealed) in devices.items():
                db.execute("UPDATE devices SET id = ?, sealed = ? WHERE id = ?",
                           (new, sealed, old))
                db.execute("UPDATE replay SET device_id = ? WHERE device_id = ?", (new, old))
            for old, new in users.items():
                for table in ("devices", "conversations", "replay"):
                    db.execute(f"UPDATE {table} SET user_id = ? WHERE user_id = ?", (new, old))
            db.execute("DELETE FROM sent")
            db.execute("DELETE FROM legacy_ids")
        self._scrub()
