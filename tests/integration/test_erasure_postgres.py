"""Erasure on PostgreSQL reaches every copy (issue 21): on a private cluster with a
streaming replica and a base backup taken before the erase, no file holds the account id
or device id, and the rows the backup still holds no longer open."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import structlog

from relayd.crypto import Kem
from relayd.store import Business, Device, open_backend, open_store
from relayd.store.pseudonym import Pseudonymous
from tests.support import pgcluster

SECRET = b"o" * 32
USER = "marked-account-4b1d9e@example.org"
PHONE, LAPTOP = "marked-phone-0c3a7f", "marked-laptop-81e2d4"
BUSINESS = "marked-business-e70b"  # stored in the clear: the scan's positive control


async def caught_up(primary: str, replica: str) -> None:
    """Wait (bounded) until the replica has replayed everything the primary wrote."""
    source, target = await asyncpg.connect(primary), await asyncpg.connect(replica)
    try:
        lsn = await source.fetchval("SELECT pg_current_wal_lsn()")
        for _ in range(600):
            if await target.fetchval("SELECT pg_last_wal_replay_lsn() >= $1", lsn):
                await target.execute("CHECKPOINT")  # a restartpoint: its files, up to date
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the replica did not catch up in 60 s")
    finally:
        await source.close()
        await target.close()


class TestEveryCopy:
    async def test_no_id_in_any_file_and_no_copy_opens(self, tmp_path: Path) -> None:
        """Register two devices of a marked account, use them, back up, erase, checkpoint:
        the primary's and the replica's data directories (heap, indexes, WAL), the base
        backup and the servers' logs hold neither the account id nor a device id; the
        backup, started as a server, still holds the device rows, and the store's own
        code opens none of them once the user's key is destroyed."""
        vault = f"sqlite:///{tmp_path}/vault/keys.db"
        needles = [USER.encode(), PHONE.encode(), LAPTOP.encode()]
        with pgcluster.cluster() as pg, structlog.testing.capture_logs() as logs:
            admin = await asyncpg.connect(f"{pg.primary.url}/postgres")
            await admin.execute("CREATE DATABASE relayd")
            await admin.close()
            url = f"{pg.primary.url}/relayd"
            replica = pg.base_backup("replica", replica=True)
            store = await open_store(url, secret=SECRET, key_vault=vault)
            try:
                assert isinstance(store, Pseudonymous)
                await store.add_business(Business(BUSINESS, "acme-user"))
                for name in (PHONE, LAPTOP):
                    await store.add_device(Device(name, USER, Kem.X25519, b"e" * 32,
                                                  b"s" * 32))
                await store.claim_seq(PHONE, 1, 64)
                await store.allocate_seqs(f"up:{PHONE}:1", [LAPTOP], 1)
                opened = await store.open_conversation(USER, BUSINESS, 1, False,
                                                       lambda epoch: "c" * 32)
                assert (await store.export_user(USER)).devices  # held, before
                backup = pg.base_backup("backup")  # taken before the erase
                await store.close_conversation(opened.id, "user", 2)
                assert (await store.erase_user(USER))["devices"] == 2
                assert await store.export_user(USER) == await store.export_user("nobody")
            finally:
                await store.close()
            conn = await asyncpg.connect(url)
            await conn.execute("CHECKPOINT")
            await conn.close()
            await caught_up(url, f"{replica.url}/relayd")

            for server in (pg.primary, replica, backup):
                assert pgcluster.files_holding(server.data, needles) == [], server.data.name
                assert pgcluster.files_holding(server.data, [BUSINESS.encode()]) != []
            logged = [pg.primary.log.read_bytes(), replica.log.read_bytes(), repr(logs).encode()]
            assert [n for n in needles for text in logged if n in text] == []

            pg.start_copy(backup)  # what someone holding the backup could read
            rows = await open_backend(f"{backup.url}/relayd", migrate=False)
            try:
                held = await rows.devices()
                assert len(held) == 2  # the rows are there, as pseudonyms and ciphertext
                keys = await open_backend(vault, migrate=False)
                try:
                    assert await Pseudonymous(rows, keys, SECRET).devices() == []
                    assert await Pseudonymous(rows, rows, SECRET).devices() == []
                finally:
                    await keys.close()
            finally:
                await rows.close()
