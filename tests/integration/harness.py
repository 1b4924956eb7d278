"""A relay under test, on the machine's RabbitMQ, in a vhost of its own.

Each test gets a fresh vhost, so the contract's default names are used unchanged and
nothing leaks between tests or into the broker's other vhosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import yaml
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue

from relayd import admin, config, keys, provision, topology, worker
from relayd.client import DeviceKeys, RelayPublic, parse_event, reply
from relayd.crypto import Kem
from relayd.store import Business, Device, Store, open_store
from tests.support import config as support_config
from tests.support import postgres

BROKER = os.environ.get("RELAYD_TEST_BROKER", "127.0.0.1:5672")
WAIT = 15.0


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True,
                          text=True, timeout=60).stdout


def amqp_url(user: str, password: str, vhost: str) -> str:
    return f"amqp://{user}:{password}@{BROKER}/{vhost}"


@dataclass
class Relay:
    """One relay's config, keys and store, plus the parties that talk to it."""

    root: Path
    vhost: str
    settings: config.Settings
    store: Store
    keyring: keys.KeyRing
    public: RelayPublic
    connection: AbstractConnection
    channel: AbstractChannel
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    config_path: Path = Path()

    # --- running the relay ---------------------------------------------------------------

    async def start(self, *roles: worker.Role) -> None:
        """Run the workers in this process until the test ends; return once consuming."""
        self.stop.clear()
        ready = []
        for role in roles or ("inbound", "outbound"):
            consuming = asyncio.Event()
            ready.append(consuming)
            self.tasks.append(asyncio.create_task(
                worker.serve(self.settings, role, self.store, lambda: self.keyring, self.stop,
                             consuming)))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), WAIT)

    async def halt(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), WAIT * 2)
        self.tasks.clear()

    def spawn(self, role: str = "all", env: dict[str, str] | None = None,
              command: tuple[str, ...] = ("-m", "relayd"),
              config_path: Path | None = None) -> subprocess.Popen[bytes]:
        """`relayd run` as a real process, for kill and signal tests; it logs beside its
        config file.

        It leads a process group of its own, with its workers: kill_group() ends them all.
        """
        path = config_path or self.config_path
        with (path.parent / "relayd.log").open("ab") as log_file:
            return subprocess.Popen(
                [sys.executable, *command, "run", "--role", role, "--config",
                 str(path)], stdout=log_file, stderr=subprocess.STDOUT,
                env=env, start_new_session=True)

    def other_host(self, name: str) -> Path:
        """The config of another relayd host: its own file and copy of the relay's keys,
        the same broker vhost and the same store. Return the config's path."""
        home = self.root / name
        shutil.copytree(self.settings.keys.dir, home / "keys")
        data = yaml.safe_load(self.config_path.read_text())
        data["keys"]["dir"] = str(home / "keys")
        path = home / "relayd.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    async def reconnect(self) -> None:
        """A fresh connection for the test itself, after the broker dropped the old one."""
        self.connection = await aio_pika.connect(self.settings.amqp.url)
        self.channel = await self.connection.channel(publisher_confirms=True)

    # --- registering parties -------------------------------------------------------------

    async def add_business(self, business_id: str, amqp_user: str = "guest",
                           first_party: bool = False) -> None:
        await admin.add_business(self.settings, self.store,
                                 Business(business_id, amqp_user, first_party),
                                 self.keyring.opaque_secret)

    async def add_device(self, user: str, device_id: str, kem: Kem = Kem.X25519) -> DeviceKeys:
        device = DeviceKeys.generate(device_id, kem)
        await admin.add_device(self.settings, self.store, Device(
            device_id, user, kem, device.enc_public, device.sign_public),
            self.keyring.opaque_secret)
        return device

    # --- talking to it --------------------------------------------------------------------

    async def publish_up(self, body: bytes, kid: str | None = None) -> None:
        exchange = await self.channel.get_exchange(self.settings.topology.ingress_exchange)
        headers = {} if kid == "" else {"relayd-kid": kid or self.public.kid}
        await exchange.publish(aio_pika.Message(
            body, headers=headers, content_type="application/vnd.relayd.sealed",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key="inbound")

    async def send(self, device: DeviceKeys, to: str, kind: str,
                   body: dict[str, Any] | None = None, **fields: Any) -> str:
        """Seal and publish an up message; return its id."""
        message_id = fields.pop("message_id", None) or str(uuid.uuid4())
        await self.publish_up(device.seal(self.public, device.payload(
            to, kind, body, message_id=message_id, **fields)))
        return message_id

    async def reply(self, business: str, conversation: str, kind: str,
                    body: dict[str, Any] | None = None, *, user_id: str | None = "guest",
                    raw: bytes | None = None, routing_key: str | None = None,
                    channel: AbstractChannel | None = None) -> str:
        """Publish a business reply as `user_id`; return its id."""
        reply_id = str(uuid.uuid4())
        exchange = await (channel or self.channel).get_exchange(
            self.settings.topology.replies_exchange)
        await exchange.publish(aio_pika.Message(
            raw if raw is not None else reply(conversation, kind, body, reply_id),
            content_type="application/json", user_id=user_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=business if routing_key is None else routing_key)
        return reply_id

    async def queue(self, name: str) -> AbstractQueue:
        return await self.channel.get_queue(name, ensure=False)

    async def take(self, queue_name: str, count: int, wait: float = WAIT
                   ) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Exactly the next `count` messages of a queue, acked; fails after `wait` s."""
        queue = await self.queue(queue_name)
        got: list[aio_pika.abc.AbstractIncomingMessage] = []
        if count == 0:
            return got
        async with queue.iterator(timeout=wait) as messages:
            async for message in messages:
                await message.ack()
                got.append(message)
                if len(got) == count:
                    break
        return got

    async def events(self, business: str, count: int, wait: float = WAIT) -> list[dict[str, Any]]:
        return [parse_event(m.body) for m in await self.take(self.inbox(business), count, wait)]

    async def received(self, device: DeviceKeys, count: int,
                       wait: float = WAIT) -> list[dict[str, Any]]:
        name = self.device_queue(device)
        return [device.open(self.public, m.body) for m in await self.take(name, count, wait)]

    async def dead(self, count: int,
                   wait: float = WAIT) -> list[aio_pika.abc.AbstractIncomingMessage]:
        return await self.take(self.settings.topology.dead_queue, count, wait)

    async def depth(self, queue_name: str) -> int:
        queue = await self.channel.declare_queue(queue_name, passive=True)
        return int(queue.declaration_result.message_count or 0)

    async def wait_depth(self, queue_name: str, at_least: int, wait: float = WAIT) -> None:
        """Until `queue_name` holds `at_least` ready messages: the broker offers no event."""
        async with asyncio.timeout(wait):
            while await self.depth(queue_name) < at_least:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    async def assert_empty(self, *queue_names: str) -> None:
        for name in queue_names:
            assert await self.depth(name) == 0, f"{name} is not empty"

    async def exists(self, queue_name: str) -> bool:
        """Whether the broker has the queue (asked on a throwaway channel)."""
        channel = await self.connection.channel()
        try:
            await channel.declare_queue(queue_name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        await channel.close()
        return True

    async def cli(self, *args: str) -> tuple[int, str]:
        """Run `relayd ARGS --config F` as a process; return its exit code and stdout."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd", *args, "--config", str(self.config_path),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), WAIT * 4)
        assert process.returncode is not None
        assert not err or process.returncode != 0, err.decode()
        return process.returncode, out.decode()

    def device_queue(self, device: DeviceKeys) -> str:
        return topology.device_queue(self.settings.topology, device.device,
                                     self.keyring.opaque_secret)

    def inbox(self, business: str) -> str:
        return topology.business_inbox(self.settings.topology, business,
                                       self.keyring.opaque_secret)

    async def legacy_inbox(self, business: str) -> str:
        """Make the state relayd 0.2.0 left: the business's inbox named by its id, bound to
        its exchange, and no inbox of the new name; return the old name."""
        t = self.settings.topology
        legacy = t.business_inbox.format(business=business)
        spec = topology.business(t, business, self.keyring.opaque_secret)[1]
        assert isinstance(spec, topology.Queue)
        await self.channel.queue_delete(self.inbox(business))
        old = await self.channel.declare_queue(legacy, durable=True, arguments=spec.arguments)
        await old.bind(topology.business_exchange(t, business), routing_key="")
        return legacy


# What a relay under test runs with, before a test's own sections.
class VaultProcess:
    """`relayd vault` as a real process on a relay's config (store.key_vault: amqp):
    start() returns once it serves; `lines` collects everything it logs."""

    def __init__(self, config_path: Path, environ: dict[str, str] | None = None) -> None:
        """`environ`: added to the process's environment (a FakeSystemd's, say)."""
        self.config_path = config_path
        self.environ = environ or {}
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[bytes] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve vault.file, made first (`relayd vault --create`) if it does not exist."""
        create = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd", "vault", "--create", "--config",
            str(self.config_path), stdout=subprocess.DEVNULL)
        assert await asyncio.wait_for(create.wait(), WAIT) == 0
        serving = asyncio.Event()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd", "vault", "--config", str(self.config_path),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "RELAYD_LOGGING__LEVEL": "info", **self.environ})

        async def read(stream: asyncio.StreamReader) -> None:
            async for line in stream:
                self.lines.append(line)
                if b"vault_serving" in line:
                    serving.set()

        assert self.process.stdout is not None
        self._reader = asyncio.create_task(read(self.process.stdout))
        waiter = asyncio.create_task(serving.wait())
        await asyncio.wait([self._reader, waiter], timeout=WAIT,
                           return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        assert serving.is_set(), b"".join(self.lines[-20:]).decode(errors="replace")

    async def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal it (SIGKILL: killed) and return its exit code (None: never started)."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), WAIT)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, WAIT)
        return code


DEFAULTS: dict[str, dict[str, Any]] = {
    "workers": {"retry_initial_backoff": 0.05, "retry_max_backoff": 0.2,
                "shutdown_timeout": 5},
    "logging": {"level": "warning"},
    "metrics": {"port": 0},  # any free port: tests run side by side
}


def write_config(root: Path, vhost: str, **sections: dict[str, Any]) -> Path:
    return support_config.write_config(root, amqp_url("guest", "guest", vhost), DEFAULTS,
                                       sections)


@contextlib.asynccontextmanager
async def relay_in_vhost(root: Path, kem: Kem = Kem.X25519,
                         store: str | dict[str, Any] | None = None,
                         **sections: dict[str, Any]) -> AsyncIterator[Relay]:
    """A relay in a fresh vhost. `store` is sqlite (a file under root), postgresql (a
    fresh database) or the store section itself; RELAYD_TEST_STORE and RELAYD_TEST_SHARDS
    set the defaults, so the whole suite can be run again over PostgreSQL or sharded
    queues."""
    async with contextlib.AsyncExitStack() as stack:
        if isinstance(store, dict):
            sections = {**sections, "store": store}
        elif (store or os.environ.get("RELAYD_TEST_STORE", "sqlite")) == "postgresql":
            url = await stack.enter_async_context(postgres.database())
            sections = {**sections, "store": {"url": url}}
        if "RELAYD_TEST_SHARDS" in os.environ:
            shards = int(os.environ["RELAYD_TEST_SHARDS"])
            sections = {**sections, "topology": {"shards": shards,
                                                 **sections.get("topology", {})}}
        vhost = f"relayd-test-{secrets.token_hex(4)}"
        rabbitmqctl("add_vhost", vhost)
        stack.callback(rabbitmqctl, "delete_vhost", vhost)
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        path = write_config(root, vhost, **sections)
        settings = config.load(path, environ={})
        keys.generate(settings.keys.dir, "test-1", kem)
        keyring = keys.load(settings.keys.dir, timedelta(days=1))
        registry = await open_store(settings.store.url, secret=keyring.opaque_secret,
                                    key_vault=settings.store.key_vault, settings=settings)
        stack.push_async_callback(registry.close)
        connection = await aio_pika.connect(settings.amqp.url)
        stack.push_async_callback(connection.close)
        channel = await connection.channel(publisher_confirms=True)
        relay = Relay(root, vhost, settings, registry, keyring,
                      RelayPublic.from_json(keyring.public_info()), connection, channel,
                      config_path=path)
        await admin.declare_all(settings, registry, keyring.opaque_secret)
        try:
            yield relay
        finally:
            if relay.tasks:
                await relay.halt()


def add_amqp_user(vhost: str, user: str) -> str:
    """A broker user with rights in `vhost` only; return its password."""
    password = secrets.token_hex(12)  # token_urlsafe may start with "-": an option to rabbitmqctl
    with contextlib.suppress(subprocess.CalledProcessError):
        rabbitmqctl("delete_user", user)
    rabbitmqctl("add_user", user, password)
    rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    return password


GRANT = re.compile(r"^rabbitmqctl set_permissions -p relayd (\S+) '([^']*)' '([^']*)' '([^']*)'$",
                   re.MULTILINE)


def documented_permissions() -> dict[str, dict[str, str]]:
    """The permissions deploy/rabbitmq/README.md gives each party (relayd, the edge, the
    identity service, an operator), by its user name there."""
    readme = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "README.md"
    return {user: {"configure": configure, "write": write, "read": read}
            for user, configure, write, read in GRANT.findall(readme.read_text())}


def confine_business(relay: Relay, business: str) -> tuple[str, str]:
    """A broker user for `business` with exactly the rights `relayd business add` grants
    (relayd.provision.grant), applied with rabbitmqctl; return (user, password)."""
    user = f"{business}-{secrets.token_hex(4)}"
    password = add_amqp_user(relay.vhost, user)
    management = config.Management(url="http://127.0.0.1:1", username="-", password="-")
    settings = relay.settings.model_copy(update={
        "amqp": relay.settings.amqp.model_copy(update={"management": management})})
    g = provision.grant(settings, business, user, "password", relay.keyring.opaque_secret)
    rabbitmqctl("set_permissions", "-p", g.vhost, user, g.permissions["configure"],
                g.permissions["write"], g.permissions["read"])
    rabbitmqctl("set_topic_permissions", "-p", g.vhost, user, g.topic["exchange"],
                g.topic["write"], g.topic["read"])
    return user, password


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 wait: float = 30) -> int:
    process.send_signal(sig)
    return process.wait(timeout=wait)


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a spawned relay and its workers, if any of them is left (for `finally`)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
