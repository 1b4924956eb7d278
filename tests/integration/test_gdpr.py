"""The data subject's rights and the relay's privacy duties, end to end on a real broker."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
from websockets.asyncio.client import ClientConnection

from relayd import amqp, gdpr, opaque, retention
from relayd.client import DeviceKeys
from relayd.crypto import fingerprint
from relayd.deliver import now_ms
from relayd.store import Store
from tests.integration.edge_harness import closed, running
from tests.integration.harness import (
    WAIT,
    Relay,
    add_amqp_user,
    amqp_url,
    rabbitmqctl,
    relay_in_vhost,
)

ALICE = "alice@example.org"
BOB = "bob@example.org"
DAY_MS = 86_400_000


def _holds(value: object, needle: str | bytes) -> bool:
    return isinstance(value, type(needle)) and needle in value  # type: ignore[operator]


async def traces(relay: Relay, needles: list[str | bytes]) -> list[tuple[str, str, str]]:
    """Every (table, column, needle) where a cell of any table of the relay's store holds a
    needle, on either backend."""
    tables = await _tables(relay)
    assert {"devices", "conversations", "replay", "sent", "audit"} <= {t for t, _, _ in tables}
    return [(table, column, repr(needle)) for table, columns, rows in tables for row in rows
            for column, value in zip(columns, row, strict=True)
            for needle in needles if _holds(value, needle)]


def _on_postgres(relay: Relay) -> bool:
    return relay.settings.store.url.startswith(("postgresql://", "postgres://"))


async def _tables(relay: Relay) -> list[tuple[str, list[str], list[tuple[Any, ...]]]]:
    """Each table of the store: its name, its columns and its rows."""
    if not _on_postgres(relay):
        db = sqlite3.connect(f"file:{relay.settings.store.sqlite_path}?mode=ro", uri=True)
        try:
            names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            return [(name, [r[1] for r in db.execute(f"PRAGMA table_info({name})")],
                     db.execute(f"SELECT * FROM {name}").fetchall())  # noqa: S608 - the schema's
                    for name in names]
        finally:
            db.close()
    db = await asyncpg.connect(relay.settings.store.url)
    try:
        names = await db.fetch("SELECT table_name FROM information_schema.tables"
                               " WHERE table_schema = current_schema()")
        tables = []
        for (name,) in names:
            rows = await db.fetch(f'SELECT * FROM "{name}"')  # noqa: S608 - the schema's
            tables.append((name, list(rows[0].keys()) if rows else [],
                           [tuple(r) for r in rows]))
        return tables
    finally:
        await db.close()


async def stored_bytes(relay: Relay) -> bytes:
    """The store's files as raw bytes: SQLite's database and WAL; on PostgreSQL, after a
    checkpoint, the database's own directory and the server's WAL."""
    if not _on_postgres(relay):
        path = relay.settings.store.sqlite_path
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    db = await asyncpg.connect(relay.settings.store.url)
    try:
        await db.execute("CHECKPOINT")
        data = Path(await db.fetchval("SHOW data_directory"))
        oid = await db.fetchval("SELECT oid FROM pg_database WHERE datname = current_database()")
    finally:
        await db.close()
    files = [*(data / "base" / str(oid)).iterdir(), *(data / "pg_wal").glob("0*")]
    return b"".join(p.read_bytes() for p in files if p.is_file())


async def open_conversation(relay: Relay, device: DeviceKeys, business: str,
                            others: list[DeviceKeys] = ()) -> str:  # type: ignore[assignment]
    """Start a conversation; return the opaque id the business saw."""
    await relay.send(device, business, "start", {"text": "hello"})
    [start] = await relay.events(business, 1)
    for other in others:
        await relay.received(other, 1)
    return str(start["conversation"])


class FailingStore:
    """The real store, except that one method raises once: a crash at that point."""

    def __init__(self, store: Store, method: str) -> None:
        self._store = store
        self._method = method

    def __getattr__(self, name: str) -> Any:
        if name == self._method:
            async def crash(*_: Any) -> None:
                raise RuntimeError("crashed")
            return crash
        return getattr(self._store, name)


class TestErasure:
    async def test_erase_leaves_no_trace(self, relay: Relay) -> None:
        """After erasure no table, file byte or queue holds the user; the business got close."""
        await relay.add_business("acme")
        await relay.add_business("globex", amqp_user="globex-user")
        phone = await relay.add_device(ALICE, "alice-phone")
        laptop = await relay.add_device(ALICE, "alice-laptop")
        lost = await relay.add_device(ALICE, "alice-lost")
        bob = await relay.add_device(BOB, "bob-phone")
        await relay.start()
        await relay.send(lost, "acme", "typing_start")  # leaves replay state behind
        await relay.dead(1)
        await relay.cli("device", "remove", "alice-lost")
        acme = await open_conversation(relay, phone, "acme", [laptop])
        globex = await open_conversation(relay, laptop, "globex", [phone])
        await relay.send(laptop, "globex", "close")
        await relay.events("globex", 1)
        await relay.received(phone, 1)
        await relay.reply("acme", acme, "message", {"text": "undelivered"})
        await relay.wait_depth(relay.device_queue(laptop), 1)
        bobs = await open_conversation(relay, bob, "acme")

        code, out = await relay.cli("gdpr", "erase", "--user", ALICE, "--json")
        assert code == 0
        assert orjson.loads(out) == {"devices": 2, "conversations": 2, "closed": 1,
                                     "replay": 3, "sent": 5}
        [close] = await relay.take(relay.inbox("acme"), 1)
        event = orjson.loads(close.body)
        assert event == {"v": 1, "type": "close", "conversation": acme, "id": close.message_id,
                         "ts": event["ts"], "body": {}}
        assert (close.type, str(uuid.UUID(close.message_id))) == ("close", close.message_id)
        await relay.assert_empty(relay.inbox("globex"))
        for device in (phone, laptop, lost):
            assert not await relay.exists(relay.device_queue(device))

        alice_keys = [k for d in (phone, laptop, lost) for k in (d.enc_public, d.sign_public)]
        ids = [ALICE, "alice-phone", "alice-laptop", "alice-lost"]
        needles: list[str | bytes] = [*ids, acme, globex, *alice_keys]
        assert await traces(relay, needles) == []
        raw = await stored_bytes(relay)
        # PostgreSQL's dead tuples and WAL keep the clear columns (public keys, opaque ids)
        # until reused; what must be in no copy there is the ids, stored only as pseudonyms
        in_files = list(ids) if _on_postgres(relay) else needles
        assert [n for n in in_files if (n.encode() if isinstance(n, str) else n) in raw] == []
        assert await traces(relay, [BOB, "bob-phone", bobs]) != []  # the scan does see live data
        assert bob.enc_public in raw  # and so does the file scan

        [record] = [r for r in await relay.store.audit_log() if r.action == "erase"]
        assert record.subject == opaque.reference(relay.keyring.opaque_secret, "user", ALICE)
        assert record.detail == {"devices": 2, "conversations": 2, "closed": 1, "replay": 3,
                                 "sent": 5, "via": "cli"}
        reply_id = await relay.reply("acme", bobs, "message", {"text": "still here"})
        [delivered] = await relay.received(bob, 1)
        assert delivered["id"] == reply_id
        code, out = await relay.cli("gdpr", "erase", "--user", ALICE, "--json")
        assert (code, orjson.loads(out)) == (0, {"devices": 0, "conversations": 0, "closed": 0,
                                                 "replay": 0, "sent": 0})

    @pytest.mark.parametrize("crash_at", ["close_conversation", "erase_user"])
    async def test_a_rerun_finishes_an_interrupted_erasure(self, relay: Relay,
                                                           crash_at: str) -> None:
        """A re-run after a crash finishes; an unrecorded close is resent under the same id."""
        await relay.add_business("acme")
        phone = await relay.add_device(ALICE, "alice-phone")
        await relay.start()
        conversation = await open_conversation(relay, phone, "acme")
        await relay.halt()
        async with amqp.publisher(relay.settings, "relayd-gdpr",
                                  relay.keyring.opaque_secret) as sink:
            with pytest.raises(RuntimeError):
                await gdpr.erase(FailingStore(relay.store, crash_at), relay.keyring, sink,
                                 ALICE, via="cli")
            [first] = await relay.take(relay.inbox("acme"), 1)
            assert orjson.loads(first.body)["conversation"] == conversation
            assert not await relay.exists(relay.device_queue(phone))
            assert await relay.store.devices_of(ALICE) != []
            counts = await gdpr.erase(relay.store, relay.keyring, sink, ALICE, via="cli")
        resent = 1 if crash_at == "close_conversation" else 0
        assert counts == {"devices": 1, "conversations": 1, "closed": resent, "replay": 1,
                          "sent": 0}
        again = await relay.take(relay.inbox("acme"), resent)
        assert [m.message_id for m in again] == [first.message_id] * resent
        assert await relay.store.export_user(ALICE) == await relay.store.export_user("nobody")
        await relay.assert_empty(relay.inbox("acme"))

    async def test_a_device_that_logs_in_during_erasure_is_cut_off(self, relay: Relay) -> None:
        """A device that logs in at the edge while its user is erased, after its queue was
        deleted and before the store forgot it (the edge declares the queue again), is
        closed with 4401, and no queue of it is left."""
        phone = await relay.add_device(ALICE, "alice-phone")
        async with running(relay) as edge, amqp.publisher(
                relay.settings, "relayd-gdpr", relay.keyring.opaque_secret) as sink:
            sessions: list[ClientConnection] = []
            delete = sink.delete_device_queue

            async def delete_then_login(device: str) -> None:
                await delete(device)
                if not sessions:
                    sessions.append(await edge.login(phone))

            sink.delete_device_queue = delete_then_login  # type: ignore[method-assign]
            await gdpr.erase(relay.store, relay.keyring, sink, ALICE, via="cli")
            assert await relay.store.device("alice-phone") is None
            assert not await relay.exists(relay.device_queue(phone))
            assert await closed(sessions[0]) == 4401

    async def test_a_business_gone_from_the_registry_is_not_waited_for(
            self, relay: Relay) -> None:
        """A conversation with a business removed since is erased with no close to send."""
        await relay.add_business("acme")
        await relay.add_business("gone", amqp_user="gone-user")
        phone = await relay.add_device(ALICE, "alice-phone")
        await relay.start()
        acme = await open_conversation(relay, phone, "acme")
        await open_conversation(relay, phone, "gone")
        await relay.cli("business", "remove", "gone")
        code, out = await relay.cli("gdpr", "erase", "--user", ALICE, "--json")
        assert (code, orjson.loads(out)["closed"], orjson.loads(out)["conversations"]) == (
            0, 2, 2)
        [close] = await relay.events("acme", 1)
        assert (close["type"], close["conversation"]) == ("close", acme)

    async def test_erase_request_over_amqp(self, tmp_path: Path) -> None:
        """Only the identity service's request erases; others are dead-lettered with a reason."""
        identity = f"relayd-identity-{uuid.uuid4().hex[:8]}"
        async with relay_in_vhost(tmp_path, gdpr={"identity_user": identity}) as relay:
            password = add_amqp_user(relay.vhost, identity)
            try:
                await relay.add_business("acme")
                phone = await relay.add_device(ALICE, "alice-phone")
                await relay.start("inbound", "outbound", "gdpr")
                conversation = await open_conversation(relay, phone, "acme")

                def request(user: str = ALICE, **extra: Any) -> bytes:
                    return orjson.dumps({"v": 1, "type": "erase", "user": user,
                                         "id": str(uuid.uuid4()), **extra})

                exchange = await relay.channel.get_exchange("relayd.gdpr")
                for user_id in ("guest", None):
                    await exchange.publish(aio_pika.Message(request(), user_id=user_id),
                                           routing_key="")
                service = await aio_pika.connect(amqp_url(identity, password, relay.vhost))
                async with service:
                    channel = await service.channel(publisher_confirms=True)
                    as_service = await channel.get_exchange("relayd.gdpr")
                    await as_service.publish(aio_pika.Message(request(extra=1),
                                                              user_id=identity), "")
                    # a user no store can hold: malformed at once, not a StoreError retried
                    await as_service.publish(aio_pika.Message(request(user=ALICE + "\x00"),
                                                              user_id=identity), "")
                    dead = await relay.dead(4)
                    assert sorted(str(m.headers["x-relayd-reason"]) for m in dead) == [
                        "malformed", "malformed", "unauthenticated", "unauthenticated"]
                    assert [m.body for m in dead] == [b""] * 4  # the account stays out
                    assert await relay.store.devices_of(ALICE) != []
                    await as_service.publish(aio_pika.Message(request(), user_id=identity), "")
                    [close] = await relay.events("acme", 1)
                assert (close["type"], close["conversation"]) == ("close", conversation)
                async with asyncio.timeout(WAIT):  # the rows go after the close is confirmed
                    while not any(r.action == "erase"  # noqa: ASYNC110
                                  for r in await relay.store.audit_log()):
                        await asyncio.sleep(0.01)
                assert await relay.store.export_user(ALICE) == await relay.store.export_user("x")
                [record] = [r for r in await relay.store.audit_log() if r.action == "erase"]
                assert record.detail["via"] == "amqp"
                assert not await relay.exists(relay.device_queue(phone))
            finally:
                rabbitmqctl("delete_user", identity)


class TestAccess:
    async def test_export_prints_everything_held(self, relay: Relay) -> None:
        """`gdpr export` lists devices, key fingerprints and conversations, and no content."""
        await relay.add_business("acme", amqp_user="acme-user")
        await relay.add_business("globex")
        phone = await relay.add_device(ALICE, "alice-phone")
        await relay.add_device(BOB, "bob-phone")
        await relay.start()
        acme = await open_conversation(relay, phone, "acme")
        globex = await open_conversation(relay, phone, "globex")
        await relay.reply("globex", globex, "close")
        await relay.received(phone, 1)

        code, out = await relay.cli("gdpr", "export", "--user", ALICE)
        assert code == 0
        data = orjson.loads(out)
        assert data["user"] == ALICE
        [device] = data["devices"]
        assert device == {
            "device": "alice-phone", "kem": "X25519",
            "enc_key_fingerprint": fingerprint(phone.enc_public),
            "sign_key_fingerprint": fingerprint(phone.sign_public),
            "created_ms": device["created_ms"], "highest_seq_received": 2,
            "next_seq_to_send": 2}
        assert abs(device["created_ms"] - now_ms()) < DAY_MS
        conversations = {c["business"]: c for c in data["conversations"]}
        assert (conversations["acme"]["conversation"], conversations["acme"]["state"]) == (
            acme, "open")
        assert conversations["globex"]["conversation"] == globex
        assert (conversations["globex"]["state"], conversations["globex"]["closed_by"]) == (
            "closed", "business")
        assert set(conversations["acme"]) == {"business", "conversation", "state", "epoch",
                                              "created_ms", "updated_ms", "closed_by"}
        assert data["messages"].startswith("not stored")
        assert b"bob" not in out.encode()


class TestRetention:
    async def test_a_pass_expires_and_prunes(self, relay: Relay) -> None:
        """A pass closes idle conversations, then deletes closed ones and orphaned state."""
        await relay.add_business("acme")
        phone = await relay.add_device(ALICE, "alice-phone")
        laptop = await relay.add_device(ALICE, "alice-laptop")
        gone = await relay.add_device(BOB, "bob-old")
        await relay.start()
        conversation = await open_conversation(relay, phone, "acme", [laptop])
        await relay.send(gone, "acme", "typing_start")  # refused, but its seq is claimed
        await relay.dead(1)
        await relay.cli("device", "remove", "bob-old")
        await relay.halt()
        r = relay.settings.retention
        later = now_ms() + int(r.inactive_conversation_days * DAY_MS) + 1
        async with amqp.publisher(relay.settings, "relayd-gdpr",
                                  relay.keyring.opaque_secret) as sink:
            counts = await retention.enforce(relay.settings, relay.store, relay.keyring, sink,
                                             later)
            # replay: the removed device's; sent: all three rows (the echo of the start and
            # the two closes; the error told to the removed device went with it), created
            # before the pass's "now" minus sent_days
            assert counts == {"expired": 1, "failed": 0, "conversations": 0, "replay": 1,
                              "sent": 3, "audit": 0, "receipts": 0}
            [close] = await relay.events("acme", 1)
            assert (close["type"], close["conversation"]) == ("close", conversation)
            for device in (phone, laptop):
                [down] = await relay.received(device, 1)
                assert (down["type"], down["id"], down["from"]) == ("close", close["id"], "acme")
            closed = await relay.store.conversation(conversation)
            assert closed is not None
            assert (closed.state, closed.closed_by) == ("closed", "user")
            even_later = later + int(r.closed_conversation_days * DAY_MS) + 1
            assert await retention.enforce(relay.settings, relay.store, relay.keyring, sink,
                                           even_later) == {
                "expired": 0, "failed": 0, "conversations": 1, "replay": 0, "sent": 0,
                "audit": 0, "receipts": 0}
        assert await relay.store.conversation(conversation) is None
        await relay.assert_empty(relay.inbox("acme"), relay.device_queue(phone))

    async def test_a_business_that_cannot_be_told_is_retried(self, relay: Relay) -> None:
        """An unreachable business's conversation waits for the next pass; the rest goes on."""
        await relay.add_business("acme")
        await relay.add_business("globex", amqp_user="globex-user")
        phone = await relay.add_device(ALICE, "alice-phone")
        await relay.start()
        acme = await open_conversation(relay, phone, "acme")
        globex = await open_conversation(relay, phone, "globex")
        await relay.halt()
        await relay.channel.exchange_delete("relayd.biz.globex")
        later = now_ms() + int(relay.settings.retention.inactive_conversation_days * DAY_MS) + 1
        async with amqp.publisher(relay.settings, "relayd-gdpr",
                                  relay.keyring.opaque_secret) as sink:
            counts = await retention.enforce(relay.settings, relay.store, relay.keyring, sink,
                                             later)
        assert (counts["expired"], counts["failed"]) == (1, 1)
        [close] = await relay.events("acme", 1)
        assert close["conversation"] == acme
        assert [c.id for c in await relay.store.stale_conversations(later)] == [globex]

    async def test_the_daemon_runs_the_job(self, tmp_path: Path) -> None:
        """`relayd run --role retention` closes an idle conversation by itself."""
        async with relay_in_vhost(tmp_path, retention={
                "interval_seconds": 0.2, "inactive_conversation_days": 1e-5}) as relay:  # 0.9 s
            await relay.add_business("acme")
            phone = await relay.add_device(ALICE, "alice-phone")
            await relay.start("inbound")
            await relay.send(phone, "acme", "start")
            [start] = await relay.events("acme", 1)
            process = relay.spawn("retention")
            try:
                [close] = await relay.events("acme", 1)
            finally:
                process.terminate()
                assert process.wait(timeout=30) == 0
            assert (close["type"], close["conversation"]) == ("close", start["conversation"])

    async def test_prune_from_the_cli(self, relay: Relay) -> None:
        """`relayd gdpr prune` runs one pass and prints its counts."""
        await relay.store.add_audit("erase", "old-ref", {}, 1)
        code, out = await relay.cli("gdpr", "prune", "--json")
        assert (code, orjson.loads(out)) == (0, {"expired": 0, "failed": 0, "conversations": 0,
                                                 "replay": 0, "sent": 0, "audit": 1,
                                                 "receipts": 0})


    async def test_cli_output_stays_clean_at_info_level(self, relay: Relay) -> None:
        """A command's log lines go to stderr, so its --json stdout parses even at info."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd", "gdpr", "erase", "--user", "nobody", "--json",
            "--config", str(relay.config_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "RELAYD_LOGGING__LEVEL": "info"})
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        assert orjson.loads(out)["devices"] == 0
        assert [orjson.loads(line)["event"] for line in err.splitlines()] == ["erased"]


class TestOpaqueIdPolicy:
    @pytest.mark.parametrize(("policy", "same"), [("stable", True), ("rotate_on_delete", False)])
    async def test_start_close_start(self, tmp_path: Path, policy: str, same: bool) -> None:
        """Restarting a deleted conversation keeps its id (stable) or gives a new one (rotate)."""
        async with relay_in_vhost(tmp_path, conversations={"opaque_id_policy": policy}) as relay:
            await relay.add_business("acme")
            phone = await relay.add_device(ALICE, "alice-phone")
            await relay.start()
            first = await open_conversation(relay, phone, "acme")
            await relay.send(phone, "acme", "close")
            await relay.events("acme", 1)
            second = await open_conversation(relay, phone, "acme")
            assert (first == second) is same
            reply_id = await relay.reply("acme", first, "message", {"text": "old id"})
            if same:
                [delivered] = await relay.received(phone, 1)
                assert delivered["id"] == reply_id
            else:
                [error] = await relay.events("acme", 1)
                assert (error["code"], error["ref"]) == ("unknown_conversation", reply_id)
                await relay.reply("acme", second, "message", {"text": "new id"})
                [delivered] = await relay.received(phone, 1)
                assert delivered["body"] == {"text": "new id"}


class TestDeviceRevocation:
    async def test_removed_device_is_cut_off_at_once(self, relay: Relay) -> None:
        """A removed device gets nothing more and loses its queue; the other one works on."""
        await relay.add_business("acme")
        phone = await relay.add_device(ALICE, "alice-phone")
        laptop = await relay.add_device(ALICE, "alice-laptop")
        await relay.start()
        conversation = await open_conversation(relay, laptop, "acme", [phone])
        await relay.reply("acme", conversation, "message", {"text": "before"})
        await relay.received(laptop, 1)
        await relay.wait_depth(relay.device_queue(phone), 1)

        code, out = await relay.cli("device", "remove", "alice-phone", "--json")
        assert (code, orjson.loads(out)) == (0, {"device": "alice-phone", "removed": True})
        assert not await relay.exists(relay.device_queue(phone))
        after = await relay.reply("acme", conversation, "message", {"text": "after"})
        [delivered] = await relay.received(laptop, 1)
        assert delivered["id"] == after
        assert not await relay.exists(relay.device_queue(phone))
        await relay.send(laptop, "acme", "message", {"text": "from the laptop"})
        [event] = await relay.events("acme", 1)
        assert event["body"] == {"text": "from the laptop"}
        await relay.send(phone, "acme", "message", {"text": "from the lost phone"})
        [dead] = await relay.dead(1)
        assert dead.headers["x-relayd-reason"] == "unknown_device"
        await relay.assert_empty(relay.inbox("acme"), relay.device_queue(laptop),
                                 relay.settings.topology.dead_queue)


class TestMinimisation:
    async def test_businesses_see_the_relays_clock_and_nothing_of_the_device(
            self, relay: Relay) -> None:
        """A skewed device clock and the device's AMQP properties never reach the business."""
        await relay.add_business("acme")
        phone = await relay.add_device(ALICE, "alice-phone")
        await relay.start()
        skews = [200_000, -3_600_000]  # ahead within clock_skew_seconds, and an hour behind
        for skew in skews:
            before = now_ms()
            await relay.send(phone, "acme", "message", {"text": "hi"}, ts=before + skew)
            [message] = await relay.take(relay.inbox("acme"), 1)
            after = now_ms()
            event = orjson.loads(message.body)
            assert set(event) == {"v", "type", "conversation", "id", "ts", "body"}
            assert before <= event["ts"] <= after
            assert message.content_type == "application/json"
            assert (message.message_id, message.type) == (event["id"], "message")
            assert not message.headers
            for leak in ("app_id", "timestamp", "user_id", "correlation_id", "reply_to",
                         "expiration", "content_encoding"):
                assert getattr(message, leak) is None, leak

    async def test_no_message_content_is_stored(self, relay: Relay) -> None:
        """After a conversation in both directions, the store's files hold none of its text."""
        await relay.add_business("acme")
        phone = await relay.add_device(ALICE, "alice-phone")
        laptop = await relay.add_device(ALICE, "alice-laptop")
        await relay.start()
        texts = [f"secret-{uuid.uuid4().hex}" for _ in range(4)]
        await relay.send(phone, "acme", "start", {"text": texts[0], "intent": texts[1]})
        [start] = await relay.events("acme", 1)
        await relay.send(phone, "acme", "message", {"text": texts[2]})
        await relay.reply("acme", start["conversation"], "message", {"text": texts[3]})
        await relay.events("acme", 1)
        await relay.received(laptop, 3)
        await relay.received(phone, 1)
        raw = await stored_bytes(relay)
        assert len(raw) > 0
        assert [t for t in texts if t.encode() in raw] == []


class TestFirstParty:
    async def test_only_the_first_party_desk_sees_the_account_id(self, relay: Relay) -> None:
        """Only the first-party desk's events carry the account id; the mark is audited."""
        code, _ = await relay.cli("business", "add", "desk", "--amqp-user", "desk-user",
                                  "--first-party")
        assert code == 0
        await relay.add_business("acme")
        phone = await relay.add_device(ALICE, "alice-phone")
        await relay.start("inbound")
        for business in ("desk", "acme"):
            for kind, body in (("start", {"text": "hi"}), ("message", {"text": "x"}),
                               ("typing_start", {}), ("read", {}), ("close", {})):
                await relay.send(phone, business, kind, body)
        desk = [orjson.loads(m.body) for m in await relay.take(relay.inbox("desk"), 5)]
        acme = await relay.take(relay.inbox("acme"), 5)
        assert [e.get("user") for e in desk] == [ALICE] * 5
        for message in acme:
            assert "user" not in orjson.loads(message.body)
            assert ALICE.encode() not in message.body
            assert ALICE not in str(message.info())

        code, out = await relay.cli("business", "list", "--json")
        assert {b["id"]: b["first_party"] for b in orjson.loads(out)} == {
            "acme": False, "desk": True}
        await relay.cli("business", "remove", "desk")
        code, out = await relay.cli("gdpr", "audit", "--json")
        records = [(r["action"], r["subject"], r["detail"]) for r in orjson.loads(out)]
        assert records == [("business_add", "desk", {"first_party": True}),
                           ("business_add", "acme", {"first_party": False}),
                           ("business_remove", "desk", {"first_party": True})]
