"""The key vault service (relayd.vault) on the machine's RabbitMQ: relay hosts with
`store.key_vault: amqp` keep their per-user keys in it, it survives being killed, and a
host's work waits for it, in place, while it is down."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from relayd import config
from relayd import vault as vault_module
from relayd.errors import ExitCode, StoreUnavailableError
from relayd.store import Store, open_store
from relayd.vault import request
from tests.integration.harness import (
    WAIT,
    Relay,
    VaultProcess,
    relay_in_vhost,
    stop_process,
)
from tests.support import postgres
from tests.support.systemd import FakeSystemd

USER, OTHER = "vault-user-5e1f@example.org", "vault-other-a93c@example.org"


@contextlib.asynccontextmanager
async def vaulted(tmp_path: Path, environ: dict[str, str] | None = None
                  ) -> AsyncIterator[tuple[Relay, VaultProcess]]:
    """A relay whose keys live in a vault service (a process of its own, with `environ`
    added to its environment)."""
    sections: dict[str, Any] = {"vault": {"file": str(tmp_path / "vault" / "keys.db"),
                                          "timeout": 2.0}}
    async with relay_in_vhost(tmp_path, store={"url": f"sqlite:///{tmp_path}/relayd.db",
                                               "key_vault": "amqp"}, **sections) as relay:
        vault = VaultProcess(relay.config_path, environ)
        await vault.start()
        try:
            yield relay, vault
        finally:
            await vault.stop()


def logs_under(root: Path) -> bytes:
    """Every relayd.log under `root`: what spawned hosts wrote."""
    return b"".join(p.read_bytes() for p in root.rglob("relayd.log"))


async def other_host(relay: Relay) -> Store:
    """A second host's store: the same database and vault service, its own memory."""
    return await open_store(relay.settings.store.url, secret=relay.keyring.opaque_secret,
                            key_vault="amqp", settings=relay.settings)


class TestVaultService:
    async def test_the_service_never_makes_its_file(self, tmp_path: Path) -> None:
        """`relayd vault` on a host without vault.file (a second host's standby, a lost
        disk) refuses to start (exit 78) and makes no file: an empty vault taking over
        would tell every host that no user has a key. `--create` makes it, once."""
        async with relay_in_vhost(tmp_path) as relay:
            file = tmp_path / "elsewhere" / "keys.db"
            env = {**os.environ, "RELAYD_VAULT__FILE": str(file)}

            async def vault(*flags: str) -> tuple[int, bytes]:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "relayd", "vault", *flags, "--config",
                    str(relay.config_path), env=env, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)
                _, err = await asyncio.wait_for(process.communicate(), WAIT)
                return process.returncode or 0, err

            code, err = await vault()
            assert code == ExitCode.CONFIG
            assert b"--create" in err
            assert not file.exists()
            assert (await vault("--create"))[0] == ExitCode.OK
            assert file.exists()
            assert (await vault("--create"))[0] == ExitCode.OK  # an existing file: kept

    async def test_keys_survive_a_kill_and_a_host_waits_while_it_is_down(
            self, tmp_path: Path) -> None:
        """A device registered on one host is read on another through the vault; the
        vault killed (SIGKILL), a host's read is StoreUnavailableError, and a message of a
        user no worker holds in memory waits, in place, until the vault is back: then it
        is delivered, and the keys the vault held before the kill open the rows still."""
        async with vaulted(tmp_path) as (relay, vault):
            await relay.add_business("acme")
            second = await other_host(relay)
            try:
                phone = await relay.add_device(USER, "vault-phone")
                assert (await second.device("vault-phone")) is not None  # through the vault
                await relay.start()
                assert await vault.stop(signal.SIGKILL) == -signal.SIGKILL
                third = await other_host(relay)  # a fresh memory: it must ask the vault
                with pytest.raises(StoreUnavailableError):
                    await third.device("vault-phone")
                relay.store._people.clear()  # type: ignore[attr-defined]  # a minute on
                await relay.send(phone, "acme", "start", {"text": "while the vault is down"})
                await vault.start()  # the same file: the keys are still there
                [start] = await relay.events("acme", 1)
                assert start["type"] == "start"
                assert (await third.device("vault-phone")) is not None
                await third.close()
                await relay.assert_empty(relay.settings.topology.dead_queue)
            finally:
                await second.close()
            assert not [line for line in vault.lines if b"vault-phone" in line
                        or USER.encode() in line]

    async def test_a_user_whose_key_the_vault_lacks_is_held_not_refused(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A vault that lacks the key of a user whose rows exist (restored from a backup
        older than the key) holds the user's message in place, rather than refusing it as
        from an unknown device; given the key back, it is delivered, nothing dead-lettered."""
        async with vaulted(tmp_path) as (relay, _):
            await relay.add_business("acme")
            phone = await relay.add_device(USER, "held-phone")
            store: Any = relay.store
            pseudonym = store.user_pseudonym(USER)
            kept = (await store.vault.people([pseudonym]))[pseudonym]
            await store.vault.forget_people([pseudonym])
            store._people.clear()  # a minute on
            missed, people = asyncio.Event(), store.vault.people

            async def watched(users: list[str]) -> dict[str, tuple[bytes, bytes]]:
                found: dict[str, tuple[bytes, bytes]] = await people(users)
                if pseudonym in users and pseudonym not in found:
                    missed.set()
                return found

            monkeypatch.setattr(store.vault, "people", watched)
            await relay.start()
            await relay.send(phone, "acme", "start", {"text": "while the key is missing"})
            await asyncio.wait_for(missed.wait(), WAIT)  # the worker met the missing key
            await store.vault.import_person(pseudonym, *kept)  # the right vault, back
            [start] = await relay.events("acme", 1)
            assert start["type"] == "start"
            await relay.assert_empty(relay.settings.topology.dead_queue)

    async def test_erase_destroys_the_key_in_the_vault(self, tmp_path: Path) -> None:
        """`relayd gdpr erase` on a host asks the vault to forget the key: the vault file
        holds no copy of it, and another host no longer opens the device."""
        async with vaulted(tmp_path) as (relay, vault):
            await relay.add_device(USER, "erased-phone")
            await relay.add_device(OTHER, "kept-phone")
            second = await other_host(relay)
            try:
                pseudonym = second.user_pseudonym(USER)  # type: ignore[attr-defined]
                [(key, _)] = (await second.vault.people([pseudonym])).values()  # type: ignore[attr-defined]
                code, out = await relay.cli("gdpr", "erase", "--user", USER, "--json")
                assert code == 0, out
                second._people.clear()  # type: ignore[attr-defined]  # a minute on
                assert await second.device("erased-phone") is None
                assert (await second.device("kept-phone")) is not None
            finally:
                await second.close()
            await vault.stop()
            held = b"".join(p.read_bytes() for p in (tmp_path / "vault").iterdir()
                            if p.is_file())
            assert key not in held
            assert pseudonym.encode() not in held

    async def test_one_service_at_a_time(self, tmp_path: Path) -> None:
        """A second vault service on the same vhost stands by: the queue is the first's
        alone; once the first stops, the second takes over and answers. Each tells
        systemd (Type=notify) READY when it serves or stands by, which in STATUS, pets the
        watchdog, and STOPPING when it stops."""
        with FakeSystemd() as first, FakeSystemd() as second:
            # a watchdog of a minute: a ping at once, then none the test leaves unread
            # (a datagram socket queues 10; a sender's next ones wait, and die with it)
            watchdog = 60_000_000
            async with vaulted(tmp_path, first.environment(watchdog)) as (relay, vault):
                assert (await first.until("READY"))["STATUS"] == "serving"
                assert {"WATCHDOG": "1"} in first.received  # pinged from the start
                await relay.add_device(USER, "phone")
                path = tmp_path / "standby.yaml"
                path.write_text(relay.config_path.read_text())
                standby = VaultProcess(path, second.environment(watchdog))
                starting = asyncio.create_task(standby.start())
                assert (await second.until("READY"))["STATUS"].startswith("standby")
                assert not starting.done()  # it does not serve while the first does
                assert await vault.stop() == 0
                assert "STOPPING" in await first.until("STOPPING")
                try:
                    await asyncio.wait_for(starting, WAIT * 3)
                    assert (await second.until("READY"))["STATUS"] == "serving"
                    host = await other_host(relay)
                    assert (await host.device("phone")) is not None
                    await host.close()
                finally:
                    starting.cancel()
                    await standby.stop()

    @pytest.mark.parametrize(("reply_to", "body", "answer"), [
        ("amq.rabbitmq.reply-to", b"\xff{", {"ok": False, "reason": "malformed"}),
        ("amq.rabbitmq.reply-to", request("people", users=["not-a-pseudonym"]),
         {"ok": False, "reason": "malformed"}),
        ("amq.rabbitmq.reply-to", b"{" * 300_000, {"ok": False, "reason": "too_large"}),
        ("relayd.inbound", request("people", users=[]), None),
        (None, request("people", users=[]), None),
        ("amq.rabbitmq.reply-to", b"not the vault's user", {"ok": False,
                                                           "reason": "not_allowed"}),
    ])
    async def test_hostile_requests_are_refused_by_type(
            self, tmp_path: Path, reply_to: str | None, body: bytes,
            answer: dict[str, Any] | None) -> None:
        """A hostile request is answered with its typed refusal where it may be answered
        at all, and never anywhere else; the valid request behind it is answered. A
        request without the vault's user as user_id is refused whatever it asks."""
        async with vaulted(tmp_path) as (relay, vault):
            got: dict[str, Any] = {}
            arrived = asyncio.Event()

            async def on_answer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                got[message.correlation_id or ""] = orjson.loads(message.body)
                arrived.set()

            channel = relay.channel
            replies = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
            await replies.consume(on_answer, no_ack=True)
            hostile, valid = str(uuid.uuid4()), str(uuid.uuid4())
            user = config.vault_user(relay.settings)
            anonymous = body == b"not the vault's user"
            for correlation, to, data, user_id in (
                    (hostile, reply_to, request("people", users=[]) if anonymous else body,
                     None if anonymous else user),
                    (valid, "amq.rabbitmq.reply-to", request("people", users=[]), user)):
                await channel.default_exchange.publish(aio_pika.Message(
                    data, reply_to=to, correlation_id=correlation, user_id=user_id),
                    routing_key=relay.settings.topology.vault_queue, mandatory=True)
            async with asyncio.timeout(WAIT):
                while valid not in got:
                    arrived.clear()
                    await arrived.wait()
            assert got[valid] == {"v": 1, "ok": True, "result": {}}
            assert got.get(hostile) == (None if answer is None else {"v": 1, **answer})
            await vault.stop()
            assert [line for line in vault.lines if b"vault_refused" in line]

    async def test_retention_forgets_the_keys_no_row_names(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A retention pass on a host destroys, in the vault, the keys that no row names
        any longer and that were last added more than a day ago, reading the vault's
        pseudonyms a page at a time; a key a device still uses stays."""
        monkeypatch.setattr(vault_module, "PAGE", 2)  # pages of 2: several of them
        async with vaulted(tmp_path) as (relay, _):
            await relay.add_device(USER, "kept-phone")
            host = await other_host(relay)
            try:
                orphans = [letter * 32 for letter in "bcdef"]
                for pseudonym in orphans:  # people whose rows are gone
                    await host.vault.import_person(  # type: ignore[attr-defined]
                        pseudonym, bytes(32), b"s" * 40)
                file = sqlite3.connect(tmp_path / "vault" / "keys.db")
                with file:  # a day and more ago, for all of them
                    file.execute("UPDATE people SET seen_ms = 0")
                file.close()
                await host.prune(conversations_before_ms=0, replay_before_ms=0,
                                 sent_before_ms=0, audit_before_ms=0)
                kept = host.user_pseudonym(USER)  # type: ignore[attr-defined]
                assert await host.vault.all_people(2 ** 62) == [kept]  # type: ignore[attr-defined]
                host._people.clear()  # type: ignore[attr-defined]
                assert (await host.device("kept-phone")) is not None
            finally:
                await host.close()

    async def test_two_relayd_run_hosts_on_postgresql_share_it(self, tmp_path: Path) -> None:
        """Two `relayd run` hosts on one PostgreSQL database, each with its own config
        and `store.key_vault: amqp`, carry conversations both ways through the vault
        service; neither host nor the vault logs an account id or device id."""
        async with postgres.database() as url, relay_in_vhost(
                tmp_path, store={"url": url, "key_vault": "amqp"},
                vault={"file": str(tmp_path / "vault" / "keys.db")}) as relay:
            vault = VaultProcess(relay.config_path)
            await vault.start()
            hosts = [relay.spawn(), relay.spawn(config_path=relay.other_host("host-b"))]
            try:
                await relay.add_business("acme")
                devices = [await relay.add_device(f"run-user-{i}@example.org", f"run-dev-{i}")
                           for i in range(4)]
                for device in devices:
                    await relay.send(device, "acme", "start", {"text": "hello"})
                starts = await relay.events("acme", len(devices), wait=WAIT * 2)
                for start in starts:
                    await relay.reply("acme", str(start["conversation"]), "message",
                                      {"text": "hi"})
                for device in devices:
                    [got] = await relay.received(device, 1, wait=WAIT * 2)
                    assert got["type"] == "message"
            finally:
                codes = [stop_process(host) for host in hosts]
                await vault.stop()
            assert codes == [ExitCode.OK, ExitCode.OK]
            logged = logs_under(tmp_path) + b"".join(vault.lines)
            assert logged  # there is something to look into
            assert b"run-user-" not in logged
            assert b"run-dev-" not in logged
