"""`relayd store migrate` and `relayd store copy` move an installation to PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
import yaml

from relayd import keys
from relayd.crypto import Kem
from relayd.errors import ExitCode, StoreUnavailableError
from relayd.store import Business, Device, open_store
from relayd.store.pseudonym import Pseudonymous
from tests.support import postgres


def relayd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relayd", *args], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture
async def pg_config(tmp_path: Path) -> AsyncIterator[tuple[Path, str]]:
    """A config whose store is a fresh PostgreSQL database; yields (path, store url)."""
    keys.generate(tmp_path / "keys")
    async with postgres.database() as url:
        path = tmp_path / "relayd.yaml"
        path.write_text(yaml.safe_dump({
            "amqp": {"url": "amqp://guest:guest@127.0.0.1:5672/"},
            "store": {"url": url},
            "keys": {"dir": str(tmp_path / "keys")},
        }))
        yield path, url


def secret(config: Path) -> bytes:
    """The opaque secret of the keys that `config` names, which the store is keyed by."""
    return keys.load(config.parent / "keys", timedelta(days=1)).opaque_secret


async def populate(url: str, key: bytes) -> None:
    """An installation in use: parties, a closed and an open conversation, seen seqs."""
    store = await open_store(url, secret=key)
    await store.add_business(Business("acme", "acme-user"))
    await store.add_business(Business("desk", "desk-user", first_party=True))
    for name, user in (("phone", "alice"), ("laptop", "alice"), ("tablet", "bob")):
        await store.add_device(Device(name, user, Kem.X25519, name.encode() * 4, b"s" * 32))
    closed = await store.open_conversation("alice", "acme", 10, False, lambda e: "a" * 32)
    await store.close_conversation(closed.id, "user", 20)
    await store.open_conversation("bob", "desk", 30, False, lambda e: "b" * 32)
    for seq in (1, 2, 5):
        await store.claim_seq("phone", seq, 64)
    await store.allocate_seqs("reply:acme:1", ["phone", "laptop"], 40)
    await store.allocate_seqs("reply:acme:2", ["phone"], 50)
    await store.close()


class TestMigrate:
    async def test_migrates_once(self, pg_config: tuple[Path, str]) -> None:
        """The first run brings an empty database to the current version; the next finds
        nothing to do."""
        path, _ = pg_config
        first = relayd("store", "migrate", "--json", "--config", str(path))
        assert first.returncode == ExitCode.OK, first.stderr
        result = json.loads(first.stdout)
        assert result["before"] == 0
        assert result["now"] >= 1
        again = relayd("store", "migrate", "--config", str(path))
        assert again.returncode == ExitCode.OK
        assert "up to date" in again.stdout

    def test_unreachable_database_exits_unavailable(self, tmp_path: Path) -> None:
        """A database that does not exist is reported, with the unavailable exit code."""
        keys.generate(tmp_path / "keys")
        path = tmp_path / "relayd.yaml"
        path.write_text(yaml.safe_dump({
            "amqp": {"url": "amqp://guest:guest@127.0.0.1:5672/"},
            "store": {"url": f"{postgres.SERVER}/relayd_no_such_database"},
            "keys": {"dir": str(tmp_path / "keys")},
        }))
        done = relayd("store", "migrate", "--config", str(path))
        assert done.returncode == ExitCode.UNAVAILABLE
        assert "cannot reach the store" in done.stderr


class TestCopy:
    async def test_copy_moves_every_state(self, tmp_path: Path,
                                          pg_config: tuple[Path, str]) -> None:
        """After a copy, PostgreSQL answers as SQLite did: parties, conversations, replay
        windows, down seqs and the audit trail carry on where they were."""
        path, url = pg_config
        source = f"sqlite:///{tmp_path}/old.db"
        await populate(source, secret(path))
        done = relayd("store", "copy", "--from", source, "--json", "--config", str(path))
        assert done.returncode == ExitCode.OK, done.stderr
        counts = json.loads(done.stdout)
        assert (counts["businesses"], counts["devices"], counts["conversations"]) == (2, 3, 2)

        old, new = (await open_store(source, secret=secret(path)),
                    await open_store(url, secret=secret(path)))
        try:
            assert await new.businesses() == await old.businesses()
            assert await new.devices() == await old.devices()
            for user, business in (("alice", "acme"), ("bob", "desk")):
                assert await new.conversation_of(user, business) == await old.conversation_of(
                    user, business)
            assert not await new.claim_seq("phone", 5, 64)
            assert await new.claim_seq("phone", 4, 64)
            assert await new.allocate_seqs("reply:acme:1", ["phone", "laptop"], 60) == {
                "phone": 1, "laptop": 1}
            assert await new.allocate_seqs("reply:acme:3", ["phone", "laptop"], 70) == {
                "phone": 3, "laptop": 2}
            assert await new.audit_log() == await old.audit_log()
            assert (await new.export_user("bob")) == (await old.export_user("bob"))
            await new.add_audit("copied", "test", {}, 80)  # new ids start past the copied
            assert "copied" in [r.action for r in await new.audit_log()]
        finally:
            await old.close()
            await new.close()

    async def test_with_a_key_vault_the_keys_never_reach_postgresql(
            self, tmp_path: Path, pg_config: tuple[Path, str]) -> None:
        """With store.key_vault set, the copy puts the per-user keys into the vault and none
        into PostgreSQL; the copied store answers through the vault, and an erasure there
        leaves the copied rows unopenable."""
        path, url = pg_config
        vault = f"sqlite:///{tmp_path}/vault.db"
        config = yaml.safe_load(path.read_text())
        config["store"]["key_vault"] = vault
        path.write_text(yaml.safe_dump(config))
        source = f"sqlite:///{tmp_path}/old.db"
        await populate(source, secret(path))
        done = relayd("store", "copy", "--from", source, "--json", "--config", str(path))
        assert done.returncode == ExitCode.OK, done.stderr
        assert json.loads(done.stdout)["people"] == 2

        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM people") == 0
        finally:
            await conn.close()
        old = await open_store(source, secret=secret(path))
        new = await open_store(url, secret=secret(path), key_vault=vault)
        try:
            assert await new.devices() == await old.devices()
            assert isinstance(new, Pseudonymous)
            copied = await new.backend.devices()  # as a backup of the copy would hold them
            await new.close_conversation("b" * 32, "user", 60)
            assert (await new.erase_user("bob"))["open"] == 0
            assert [d.user for d in await new.devices()] == ["alice", "alice"]
            alice = new.user_pseudonym("alice")
            assert [d.user for d in await new._devices(
                [r for r in copied if r.user == alice])] == ["alice", "alice"]
            with pytest.raises(StoreUnavailableError):  # held, never opened: no key left
                await new._devices([r for r in copied if r.user != alice])
        finally:
            await old.close()
            await new.close()

    async def test_a_target_with_data_is_refused_unless_forced(
            self, tmp_path: Path, pg_config: tuple[Path, str]) -> None:
        """Copying again is refused and changes nothing; --force replaces the target."""
        path, url = pg_config
        source = f"sqlite:///{tmp_path}/old.db"
        await populate(source, secret(path))
        assert relayd("store", "copy", "--from", source, "--config", str(path)).returncode == 0
        store = await open_store(url, secret=secret(path))
        await store.add_business(Business("extra", "extra-user"))
        refused = relayd("store", "copy", "--from", source, "--config", str(path))
        assert refused.returncode == ExitCode.FAILURE
        assert "holds data already" in refused.stderr
        assert await store.business("extra") is not None
        forced = relayd("store", "copy", "--from", source, "--force", "--config", str(path))
        assert forced.returncode == ExitCode.OK, forced.stderr
        assert await store.business("extra") is None
        assert len(await store.devices()) == 3
        await store.close()

    def test_missing_source_is_not_found(self, tmp_path: Path) -> None:
        """A SQLite file that does not exist is reported, and nothing is created."""
        path = tmp_path / "relayd.yaml"
        path.write_text(yaml.safe_dump({
            "amqp": {"url": "amqp://guest:guest@127.0.0.1:5672/"},
            "store": {"url": f"{postgres.SERVER}/unused"},
            "keys": {"dir": str(tmp_path / "keys")},
        }))
        done = relayd("store", "copy", "--from", f"sqlite:///{tmp_path}/none.db",
                      "--config", str(path))
        assert done.returncode == ExitCode.NOT_FOUND
        assert not (tmp_path / "none.db").exists()
