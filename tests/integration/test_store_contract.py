"""The store contract: every backend must pass these same cases."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from relayd.crypto import Kem
from relayd.store import Business, Device, Store, open_store
from relayd.store.sqlite import SqliteStore

BACKENDS = ["sqlite"]


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend = open_store(f"sqlite:///{tmp_path}/relayd.db")
    yield backend
    await backend.close()


def device(device_id: str, user: str = "u1") -> Device:
    return Device(device_id, user, Kem.X25519, b"e" * 32, b"s" * 32)


def make_id(user: str, business: str) -> Callable[[int], str]:
    return lambda epoch: f"{user}-{business}-{epoch}".ljust(32, "x")[:32]


class TestBusinesses:
    async def test_add_is_idempotent_and_lookups_work(self, store: Store) -> None:
        """A business is added once, found by id and by AMQP user, listed and removed."""
        assert await store.add_business(Business("acme", "acme-user"))
        assert not await store.add_business(Business("acme", "acme-user"))
        assert await store.business("acme") == Business("acme", "acme-user", False)
        assert await store.business_by_amqp_user("acme-user") == Business("acme", "acme-user")
        assert await store.business_by_amqp_user("nobody") is None
        assert [b.id for b in await store.businesses()] == ["acme"]
        assert await store.remove_business("acme")
        assert not await store.remove_business("acme")
        assert await store.business("acme") is None

    async def test_first_party_flag_round_trips(self, store: Store) -> None:
        """The first-party mark is stored and read back."""
        await store.add_business(Business("desk", "desk-user", first_party=True))
        found = await store.business("desk")
        assert found is not None
        assert found.first_party


class TestDevices:
    async def test_devices_by_user(self, store: Store) -> None:
        """Devices are found by id and by user, and removal takes them out of both."""
        assert await store.add_device(device("d1", "u1"))
        assert not await store.add_device(device("d1", "u1"))
        await store.add_device(device("d2", "u1"))
        await store.add_device(device("d3", "u2"))
        assert await store.device("d1") == device("d1", "u1")
        assert [d.id for d in await store.devices_of("u1")] == ["d1", "d2"]
        assert await store.remove_device("d1")
        assert await store.device("d1") is None
        assert [d.id for d in await store.devices_of("u1")] == ["d2"]
        assert len(await store.devices()) == 2


class TestConversations:
    async def test_open_close_reopen_stable(self, store: Store) -> None:
        """Opening creates, notes activity, closes once, and reopens with the same id."""
        ids = make_id("u1", "acme")
        opened = await store.open_conversation("u1", "acme", 1000, False, ids)
        assert (opened.state, opened.epoch, opened.created_ms) == ("open", 0, 1000)
        again = await store.open_conversation("u1", "acme", 2000, False, ids)
        assert (again.id, again.updated_ms, again.created_ms) == (opened.id, 2000, 1000)
        assert await store.conversation(opened.id) == again
        assert await store.close_conversation(opened.id, "user", 3000)
        assert not await store.close_conversation(opened.id, "user", 3001)
        closed = await store.conversation_of("u1", "acme")
        assert closed is not None
        assert (closed.state, closed.closed_by, closed.updated_ms) == ("closed", "user", 3000)
        reopened = await store.open_conversation("u1", "acme", 4000, False, ids)
        assert (reopened.id, reopened.state, reopened.closed_by) == (opened.id, "open", None)

    async def test_rotate_on_reopen_after_user_close(self, store: Store) -> None:
        """With rotation, a conversation the user closed reopens under a new epoch and id."""
        ids = make_id("u1", "acme")
        first = await store.open_conversation("u1", "acme", 1, True, ids)
        await store.close_conversation(first.id, "user", 2)
        second = await store.open_conversation("u1", "acme", 3, True, ids)
        assert second.epoch == 1
        assert second.id != first.id
        assert await store.conversation(first.id) is None
        await store.close_conversation(second.id, "business", 4)
        third = await store.open_conversation("u1", "acme", 5, True, ids)
        assert (third.epoch, third.id) == (1, second.id)  # a business close does not rotate


class TestReplay:
    async def test_claim_once(self, store: Store) -> None:
        """Each (device, seq) is claimed once, reordering inside the window is fine."""
        assert await store.claim_seq("d1", 5, 64)
        assert not await store.claim_seq("d1", 5, 64)
        assert await store.claim_seq("d1", 3, 64)
        assert await store.claim_seq("d2", 5, 64)
        assert await store.claim_seq("d1", 200, 64)
        assert not await store.claim_seq("d1", 136, 64)  # fell out of the window
        assert await store.claim_seq("d1", 137, 64)


class TestSeqs:
    async def test_allocation_is_per_device_and_idempotent(self, store: Store) -> None:
        """Down seqs count per device from 1, and the same source gets the same numbers."""
        await store.add_device(device("d1"))
        await store.add_device(device("d2"))
        assert await store.allocate_seqs("m1", ["d1", "d2"], 1) == {"d1": 1, "d2": 1}
        assert await store.allocate_seqs("m2", ["d1"], 2) == {"d1": 2}
        assert await store.allocate_seqs("m1", ["d1", "d2"], 3) == {"d1": 1, "d2": 1}
        assert await store.allocate_seqs("m3", ["d2", "gone"], 4) == {"d2": 2}


CONCURRENT_CLAIMS = """
import asyncio, sys
from relayd.store import open_store
async def main():
    store = open_store(sys.argv[1])
    won = [s for s in range(1, 201) if await store.claim_seq("d1", s, 1024)]
    print(" ".join(map(str, won)))
asyncio.run(main())
"""


class TestSqliteProcesses:
    def test_several_processes_share_one_file(self, tmp_path: Path) -> None:
        """Four processes racing for the same seqs: each seq is won by exactly one."""
        url = f"sqlite:///{tmp_path}/shared.db"
        SqliteStore(tmp_path / "shared.db")
        procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_CLAIMS, url],
                                  stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(Path.cwd())})
                 for _ in range(4)]
        won = [int(s) for p in procs for s in p.communicate(timeout=120)[0].split()]
        assert all(p.returncode == 0 for p in procs)
        assert sorted(won) == list(range(1, 201))

    async def test_migrations_are_versioned(self, tmp_path: Path) -> None:
        """Opening an existing file again applies nothing twice."""
        first = SqliteStore(tmp_path / "m.db")
        version = first.migrate()
        await first.close()
        second = SqliteStore(tmp_path / "m.db")
        assert second.migrate() == version
        await second.close()


