"""Erasure on PostgreSQL reaches every copy (issue 21): on a private cluster with a
streaming replica and a base backup taken before the erase, no file holds the account id
or device id, and the rows the backup still holds no longer open. With several hosts,
their keys in the vault service (relayd.vault), no file of the cluster ever holds a key,
and a store whose keys are in PostgreSQL moves them there."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import orjson
import yaml

from relayd import admin, config, gdpr
from relayd.client import DeviceKeys
from relayd.store import Device, open_backend, open_store
from relayd.store.pseudonym import Pseudonymous
from relayd.vault import AmqpVault
from tests.integration.harness import Relay, VaultProcess, relay_in_vhost
from tests.support import pgcluster, postgres

USER = "marked-account-4b1d9e@example.org"
PHONE, LAPTOP = "marked-phone-0c3a7f", "marked-laptop-81e2d4"
BUSINESS = "marked-biz-e70b"  # stored in the clear: the scan's positive control


async def caught_up(primary: str, replica: pgcluster.Server) -> None:
    """Wait (bounded) until the replica has replayed everything the primary wrote."""
    source = await asyncpg.connect(primary)
    target = await asyncpg.connect(f"{replica.url}/relayd")
    try:
        lsn = await source.fetchval("SELECT pg_current_wal_lsn()")
        for _ in range(600):
            if await target.fetchval("SELECT pg_last_wal_replay_lsn() >= $1", lsn):
                await target.execute("CHECKPOINT")  # a restartpoint: its files, up to date
                return
            await asyncio.sleep(0.1)
        log = replica.log.read_text(errors="replace")[-3000:]
        raise AssertionError(f"the replica did not catch up in 60 s; its log ends:\n{log}")
    finally:
        await source.close()
        await target.close()


async def relayd_database(pg: pgcluster.Cluster) -> str:
    """Create the database `relayd` on the cluster's primary; its URL."""
    conn = await asyncpg.connect(f"{pg.primary.url}/postgres")
    await conn.execute("CREATE DATABASE relayd")
    await conn.close()
    return f"{pg.primary.url}/relayd"


async def converse(relay: Relay, phone: DeviceKeys, laptop: DeviceKeys) -> None:
    """With the relay running: the phone starts a conversation with the business (the
    laptop gets the echo), the business replies to both: replay state, sent rows and a
    conversation in the store."""
    await relay.start()
    await relay.send(phone, BUSINESS, "start", {"text": "hello"})
    [start] = await relay.events(BUSINESS, 1)
    await relay.received(laptop, 1)  # the echo
    await relay.reply(BUSINESS, str(start["conversation"]), "message", {"text": "hi"})
    await relay.received(phone, 1)
    await relay.received(laptop, 1)


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
            url = await relayd_database(pg)
            replica = pg.base_backup("replica", replica=True)
            async with relay_in_vhost(tmp_path, store={"url": url, "key_vault": vault}) as relay:
                await relay.add_business(BUSINESS)
                phone = await relay.add_device(USER, PHONE)
                laptop = await relay.add_device(USER, LAPTOP)
                await converse(relay, phone, laptop)
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
            await caught_up(url, replica)

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


class TestSeveralHostsOneVault:
    async def test_the_key_never_reaches_postgresql_and_is_destroyed(
            self, tmp_path: Path) -> None:
        """Two hosts on one PostgreSQL cluster, their keys in the vault service
        (`store.key_vault: amqp`): a device registered on each host, a conversation, a base
        backup taken, then `relayd gdpr erase` (a third process) while the relay runs.
        The user's key bytes were never in any file of the primary, the replica or the
        backup, and after the erase they are in no file of the vault either; the ids are
        nowhere; export was whole before and empty after; and the backup's rows open
        neither with the vault service nor with what the backup itself holds."""
        needles = [USER.encode(), PHONE.encode(), LAPTOP.encode()]
        vault_dir = tmp_path / "vault"
        with pgcluster.cluster() as pg:
            url = await relayd_database(pg)
            replica = pg.base_backup("replica", replica=True)
            async with relay_in_vhost(
                    tmp_path, store={"url": url, "key_vault": "amqp"},
                    vault={"file": str(vault_dir / "keys.db"), "timeout": 5.0}) as relay:
                vault = VaultProcess(relay.config_path)
                await vault.start()
                host_b = await open_store(url, secret=relay.keyring.opaque_secret,
                                          key_vault="amqp", settings=relay.settings)
                try:
                    await relay.add_business(BUSINESS)
                    phone = await relay.add_device(USER, PHONE)  # on host A
                    laptop = DeviceKeys.generate(LAPTOP)  # on host B
                    await admin.add_device(relay.settings, host_b, Device(
                        LAPTOP, USER, laptop.kem, laptop.enc_public, laptop.sign_public),
                        relay.keyring.opaque_secret)
                    await converse(relay, phone, laptop)
                    before = await gdpr.export(host_b, USER)
                    assert sorted(d["device"] for d in before["devices"]) == [LAPTOP, PHONE]
                    assert len(before["conversations"]) == 1
                    pseudonym = relay.store.user_pseudonym(USER)  # type: ignore[attr-defined]
                    [(key, sealed)] = (await host_b.vault.people(  # type: ignore[attr-defined]
                        [pseudonym])).values()
                    assert pgcluster.files_holding(vault_dir, [key])  # the search finds it
                    backup = pg.base_backup("backup")  # taken before the erase
                    code, out = await relay.cli("gdpr", "erase", "--user", USER, "--json")
                    assert code == 0, out
                    assert orjson.loads(out)["devices"] == 2
                    host_b._people.clear()  # type: ignore[attr-defined]  # a minute on
                    after = await gdpr.export(host_b, USER)
                    assert after["devices"] == after["conversations"] == []
                    assert await host_b.vault.people([pseudonym]) == {}  # type: ignore[attr-defined]
                    secret = relay.keyring.opaque_secret
                    settings = relay.settings
                    await relay.halt()
                    conn = await asyncpg.connect(url)
                    await conn.execute("CHECKPOINT")
                    assert await conn.fetchval("SELECT count(*) FROM people") == 0
                    await conn.close()
                    await caught_up(url, replica)
                    for server in (pg.primary, replica, backup):
                        assert pgcluster.files_holding(server.data, [key, sealed]) == [], \
                            server.data.name
                        assert pgcluster.files_holding(server.data, needles) == []
                        assert pgcluster.files_holding(server.data, [BUSINESS.encode()])
                    assert pgcluster.files_holding(vault_dir, [key, sealed]) == []

                    pg.start_copy(backup)  # what someone holding the backup could read
                    rows = await open_backend(f"{backup.url}/relayd", migrate=False)
                    try:
                        assert len(await rows.devices()) == 2  # pseudonyms and ciphertext
                        assert await rows.all_people(2 ** 62) == []  # no key in the backup
                        keys = AmqpVault(settings)
                        try:
                            assert await Pseudonymous(rows, keys, secret).devices() == []
                        finally:
                            await keys.close()
                        assert await Pseudonymous(rows, rows, secret).devices() == []
                    finally:
                        await rows.close()
                finally:
                    await host_b.close()
                    await vault.stop()
            assert not [line for line in vault.lines for n in [*needles, pseudonym.encode()]
                        if n in line]


class TestMoveKeys:
    async def test_keys_in_postgresql_move_into_the_vault_service(self, tmp_path: Path) -> None:
        """A PostgreSQL store whose keys are in its own people table (hosts before the
        vault service): `relayd store move-keys` moves every key into the vault service
        and deletes (and vacuums) them in PostgreSQL; a host with `store.key_vault: amqp`
        then reads every device as before, and erasure works through the vault."""
        async with postgres.database() as url, relay_in_vhost(
                tmp_path, store={"url": url},
                vault={"file": str(tmp_path / "vault" / "keys.db")}) as relay:
            await relay.add_device(USER, PHONE)
            await relay.add_device("other@example.org", "other-phone")
            before = await relay.store.export_user(USER)
            conn = await asyncpg.connect(url)
            try:
                assert await conn.fetchval("SELECT count(*) FROM people") == 2
                data = yaml.safe_load(relay.config_path.read_text())
                data["store"]["key_vault"] = "amqp"
                path = tmp_path / "with-vault.yaml"
                path.write_text(yaml.safe_dump(data))
                vault = VaultProcess(path)
                await vault.start()
                try:
                    process = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "relayd", "store", "move-keys", "--json",
                        "--config", str(path), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
                    out, err = await asyncio.wait_for(process.communicate(), 60)
                    assert process.returncode == 0, err.decode()
                    assert orjson.loads(out) == {"moved": 2, "refused": 0}
                    assert await conn.fetchval("SELECT count(*) FROM people") == 0
                    assert await conn.fetchval(
                        "SELECT vacuum_count > 0 FROM pg_stat_user_tables"
                        " WHERE relname = 'people'")
                    settings = config.load(path, environ={})
                    host = await open_store(url, secret=relay.keyring.opaque_secret,
                                            key_vault="amqp", settings=settings)
                    try:
                        assert await host.export_user(USER) == before
                        assert len(await host.devices()) == 2
                        await host.erase_user(USER)
                        assert (await host.export_user(USER)).devices == []
                        assert len(await host.devices()) == 1
                    finally:
                        await host.close()
                finally:
                    await vault.stop()
            finally:
                await conn.close()
