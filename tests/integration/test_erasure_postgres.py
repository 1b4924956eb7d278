"""Erasure on PostgreSQL reaches every copy (issue 21): on a private cluster with a
streaming replica and a base backup taken before the erase, no file holds the account id
or device id, and the rows the backup still holds no longer open."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import orjson

from relayd.store import open_backend
from relayd.store.pseudonym import Pseudonymous
from tests.integration.harness import relay_in_vhost
from tests.support import pgcluster

USER = "marked-account-4b1d9e@example.org"
PHONE, LAPTOP = "marked-phone-0c3a7f", "marked-laptop-81e2d4"
BUSINESS = "marked-biz-e70b"  # stored in the clear: the scan's positive control


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
        """While relayd runs on the cluster: two devices of a marked account talk to a
        business (replay state, sent rows, a conversation), a base backup is taken, `relayd
        gdpr erase` runs, then a checkpoint. The primary's and the replica's data
        directories (heap, indexes, WAL), the base backup and the servers' logs hold
        neither the account id nor a device id; the backup, started as a server, still
        holds the device rows, and the store's own code opens none of them."""
        vault = f"sqlite:///{tmp_path}/vault/keys.db"
        needles = [USER.encode(), PHONE.encode(), LAPTOP.encode()]
        with pgcluster.cluster() as pg:
            admin = await asyncpg.connect(f"{pg.primary.url}/postgres")
            await admin.execute("CREATE DATABASE relayd")
            await admin.close()
            url = f"{pg.primary.url}/relayd"
            replica = pg.base_backup("replica", replica=True)
            async with relay_in_vhost(tmp_path, store={"url": url, "key_vault": vault}) as relay:
                await relay.add_business(BUSINESS)
                phone = await relay.add_device(USER, PHONE)
                laptop = await relay.add_device(USER, LAPTOP)
                await relay.start()
                await relay.send(phone, BUSINESS, "start", {"text": "hello"})
                [start] = await relay.events(BUSINESS, 1)
                await relay.received(laptop, 1)  # the echo
                await relay.reply(BUSINESS, str(start["conversation"]), "message",
                                  {"text": "hi"})
                await relay.received(phone, 1)
                await relay.received(laptop, 1)
                assert (await relay.store.export_user(USER)).devices  # held, before
                backup = pg.base_backup("backup")  # taken before the erase
                code, out = await relay.cli("gdpr", "erase", "--user", USER, "--json")
                assert code == 0, out
                assert orjson.loads(out)["devices"] == 2
                assert await relay.store.export_user(USER) == await relay.store.export_user(
                    "nobody")
                secret = relay.keyring.opaque_secret
            conn = await asyncpg.connect(url)
            await conn.execute("CHECKPOINT")
            await conn.close()
            await caught_up(url, f"{replica.url}/relayd")

            for server in (pg.primary, replica, backup):
                assert pgcluster.files_holding(server.data, needles) == [], server.data.name
                assert pgcluster.files_holding(server.data, [BUSINESS.encode()]) != []
            logged = [pg.primary.log.read_bytes(), replica.log.read_bytes()]
            assert [n for n in needles for text in logged if n in text] == []

            pg.start_copy(backup)  # what someone holding the backup could read
            rows = await open_backend(f"{backup.url}/relayd", migrate=False)
            try:
                held = await rows.devices()
                assert len(held) == 2  # the rows are there, as pseudonyms and ciphertext
                keys = await open_backend(vault, migrate=False)
                try:
                    assert await Pseudonymous(rows, keys, secret).devices() == []
                    assert await Pseudonymous(rows, rows, secret).devices() == []
                finally:
                    await keys.close()
            finally:
                await rows.close()
