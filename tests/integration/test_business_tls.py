"""Businesses over TLS, provisioned by `relayd business`, confined to their own resources.

One dedicated node for the whole module runs the production config,
deploy/rabbitmq/rabbitmq.conf, with only its addresses, ports and certificate paths made
local: TLS only, no plain listener, HTTPS management. relayd itself connects over TLS and
logs in with its client certificate (EXTERNAL). Each test gets a vhost of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import socket
import ssl
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import orjson
import pytest
import yaml
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from prometheus_client.parser import text_string_to_metric_families

from relayd import admin, amqp, config, keys, provision, rpc, topology, vault
from relayd.client import DeviceKeys, IdentityService, RelayPublic, reply
from relayd.crypto import b64e
from relayd.store import Business, open_store
from relayd.store.pseudonym import seal, unseal
from relayd.vault import AmqpVault
from tests.integration.harness import WAIT, Relay, documented_permissions, kill_group, stop_process
from tests.support.broker import TestBroker

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "rabbitmq"
EXAMPLE = REPO / "examples" / "business_echo.py"
USER = "alice@example.org"

pytestmark = pytest.mark.broker_node


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestBroker]:
    """The production config on a node of our own; relayd's user logs in by certificate."""
    broker = TestBroker(tmp_path_factory.mktemp("tls-node"), conf_file=DEPLOY / "rabbitmq.conf",
                        plugins_file=DEPLOY / "enabled_plugins")
    broker.start()
    try:
        broker.make_client_cert("relayd")
        Admin(broker).api.put_user("relayd", [], password=None)  # certificate only
        yield broker
    finally:
        broker.stop()


class Admin:
    """The node's management API as its administrator (guest, allowed from loopback)."""

    def __init__(self, node: TestBroker) -> None:
        self.api = provision.Api(config.Management(
            url=node.mgmt_url, username="guest", password="guest", ca_file=node.ca_cert))

    def get(self, *path: str) -> Any:
        return self.api.call("GET", *path)


@dataclass
class Env:
    """A relay in its own vhost on the node, and what its tests need around it."""

    node: TestBroker
    relay: Relay
    admin: Admin

    @property
    def vhost(self) -> str:
        return self.relay.vhost

    async def cli(self, *args: str) -> tuple[int, str, str]:
        """Run `relayd ARGS --config ...` as a process; (exit code, stdout, stderr)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd", *args, "--config", str(self.relay.config_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    async def add(self, business: str, user: str, *extra: str) -> dict[str, Any]:
        """`business add` that must succeed; its --json answer."""
        code, out, err = await self.cli("business", "add", business, "--amqp-user", user,
                                        "--json", *extra)
        assert code == 0, err
        result: dict[str, Any] = orjson.loads(out)
        return result

    async def add_with_password(self, business: str, user: str) -> str:
        result = await self.add(business, user)
        password: str = result["password"]
        return password

    def url(self, user: str | None = None, password: str | None = None, *,
            port: int | None = None, scheme: str = "amqps") -> str:
        if user is None:
            return f"{scheme}://127.0.0.1:{port or self.node.amqps_port}/{self.vhost}" \
                   "?auth=external"
        return f"{scheme}://{user}:{password}@127.0.0.1:{port or self.node.amqps_port}/{self.vhost}"

    async def connect(self, user: str | None = None, password: str | None = None,
                      cert: tuple[Path, Path] | None = None) -> AbstractConnection:
        """A business's connection over TLS: a password, or a certificate alone."""
        return await aio_pika.connect(self.url(user, password),
                                      ssl_context=self.node.ssl_context_for_client(cert),
                                      timeout=10)

    def inbox(self, business: str) -> str:
        return self.relay.inbox(business)

    def exchange(self, business: str) -> str:
        return self.relay.settings.topology.business_exchange.format(business=business)


def relay_config(node: TestBroker, root: Path, vhost: str) -> dict[str, Any]:
    cert, key = node.tls_dir / "client-relayd.pem", node.tls_dir / "client-relayd.key"
    return {
        "amqp": {"url": f"amqps://127.0.0.1:{node.amqps_port}/{vhost}?auth=external",
                 "tls": {"ca_file": str(node.ca_cert), "cert_file": str(cert),
                         "key_file": str(key)},
                 "management": {"url": node.mgmt_url, "username": "guest", "password": "guest",
                                "ca_file": str(node.ca_cert), "max_connections": 2,
                                "max_channels": 3}},
        "store": {"url": f"sqlite:///{root}/relayd.db"},
        "keys": {"dir": str(root / "keys")},
        "workers": {"retry_initial_backoff": 0.05, "retry_max_backoff": 0.2,
                    "shutdown_timeout": 5},
        "logging": {"level": "warning", "format": "json"},
    }


@pytest.fixture
async def env(node: TestBroker, tmp_path: Path) -> AsyncIterator[Env]:
    admin = Admin(node)
    vhost = f"relayd-{secrets.token_hex(4)}"
    admin.api.call("PUT", "vhosts", vhost)
    # relayd with the permissions the deploy README gives it; the test itself (guest,
    # playing the device edge and looking into queues) with every permission
    admin.api.call("PUT", "permissions", vhost, "relayd", body=documented_permissions()["relayd"])
    admin.api.call("PUT", "permissions", vhost, "guest",
                   body={"configure": ".*", "write": ".*", "read": ".*"})
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(relay_config(node, tmp_path, vhost)))
    settings = config.load(path, environ={})
    keys.generate(settings.keys.dir, "test-1")
    keyring = keys.load(settings.keys.dir, timedelta(days=1))
    store = await open_store(settings.store.url, secret=keyring.opaque_secret)
    # the test's own connection plays the device edge and looks into queues
    connection = await aio_pika.connect(
        f"amqps://guest:guest@127.0.0.1:{node.amqps_port}/{vhost}",
        ssl_context=node.ssl_context_for_client())
    channel = await connection.channel(publisher_confirms=True)
    relay = Relay(tmp_path, vhost, settings, store, keyring,
                  RelayPublic.from_json(keyring.public_info()), connection, channel,
                  config_path=path)
    try:
        yield Env(node, relay, admin)
    finally:
        if relay.tasks:
            await relay.halt()
        await connection.close()
        await store.close()
        admin.api.call("DELETE", "vhosts", vhost)
        for user in admin.get("users") or []:
            if provision.OWNED_TAG in user["tags"]:
                admin.api.call("DELETE", "users", user["name"])


def closed_event(connection: AbstractConnection) -> asyncio.Event:
    closed = asyncio.Event()
    connection.close_callbacks.add(lambda *_: closed.set())
    return closed


async def refusal(connection: AbstractConnection, action: Any) -> str:
    """Run `action(channel)` on a fresh channel; why the broker closed the channel."""
    channel = await connection.channel(publisher_confirms=True)
    with pytest.raises(aiormq.exceptions.ChannelClosed) as refused:
        await action(channel)
    return str(refused.value.args[0])


async def ignore(message: AbstractIncomingMessage) -> None:
    """A consumer that leaves what it gets unacked."""


def reply_message(conversation: str, user_id: str) -> aio_pika.Message:
    return aio_pika.Message(reply(conversation, "message", {"text": "hi"}),
                            content_type="application/json", user_id=user_id)


class TestConversationOverTls:
    async def test_echo_business_converses_over_tls(self, env: Env) -> None:
        """The example business, with its generated password and the inbox name `business
        add` gave it, talks to a user through a relay that itself logs in with its
        certificate; a duplicate event is answered once."""
        password_file = env.relay.root / "acme.password"
        inbox = (await env.add("acme", "acme-user", "--password-file", str(password_file)))[
            "inbox"]
        assert inbox == env.inbox("acme")
        phone = await env.relay.add_device(USER, "phone")
        await env.relay.start()
        echo = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--business", "acme", "--ca", str(env.node.ca_cert),
            "--inbox", inbox,
            "--url", f"amqps://acme-user@127.0.0.1:{env.node.amqps_port}/{env.vhost}",
            "--password-file", str(password_file), stdout=asyncio.subprocess.PIPE)
        try:
            await env.relay.send(phone, "acme", "start", {"text": "Hi"})
            ping = await env.relay.send(phone, "acme", "message", {"text": "ping"})
            [answer] = await env.relay.received(phone, 1)
            assert (answer["type"], answer["from"], answer["body"]) == (
                "message", "acme", {"text": "echo: ping"})

            # relayd delivers at least once: the same event again must not be answered again
            conversation = await env.relay.store.conversation_of(USER, "acme")
            assert conversation is not None
            again = orjson.dumps({"v": 1, "type": "message", "conversation": conversation.id,
                                  "id": ping, "ts": 1, "body": {"text": "ping"}})
            exchange = await env.relay.channel.get_exchange(env.exchange("acme"))
            await exchange.publish(aio_pika.Message(again, message_id=ping), routing_key="")
            await env.relay.send(phone, "acme", "message", {"text": "pong"})
            [answer] = await env.relay.received(phone, 1)
            assert answer["body"] == {"text": "echo: pong"}
        finally:
            if echo.returncode is None:
                echo.terminate()
            assert await asyncio.wait_for(echo.wait(), WAIT) == 0


class TestListeners:
    async def test_plain_port_refuses_a_business(self, env: Env) -> None:
        """The production config has no plain listener: a business's credentials that work
        over TLS get no connection on the plain AMQP port."""
        password = await env.add_with_password("acme", "acme-user")
        assert not env.node.plain_listener
        with pytest.raises(aiormq.exceptions.AMQPConnectionError):
            await aio_pika.connect(env.url("acme-user", password, port=env.node.amqp_port,
                                           scheme="amqp"), timeout=10)
        connection = await env.connect("acme-user", password)
        await connection.close()

    @pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
    def test_tls_versions(self, node: TestBroker, version: ssl.TLSVersion) -> None:
        """The TLS listener speaks TLS 1.2 and 1.3, with a forward-secret AEAD suite."""
        context = node.ssl_context_for_client()
        context.minimum_version = context.maximum_version = version
        with (socket.create_connection(("127.0.0.1", node.amqps_port), timeout=10) as raw,
              context.wrap_socket(raw, server_hostname="localhost") as tls):
            cipher = tls.cipher()
            assert tls.version() == version.name.replace("v1_", "v1.")
        assert cipher is not None
        assert cipher[0].startswith(("TLS_", "ECDHE-"))
        assert "GCM" in cipher[0] or "CHACHA20" in cipher[0]


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - the node's http://
        body: bytes = answer.read()
    return body.decode()


class TestBrokerMetrics:
    async def test_dashboard_and_alerts_use_what_the_broker_serves(self, env: Env) -> None:
        """rabbitmq_prometheus is on in the production config: every broker metric that the
        dashboard and the alert rules query is one the node serves, and the endpoint names
        no queue (queue names hold business and device ids)."""
        await env.add_with_password("acme", "acme-user")
        text = await asyncio.to_thread(fetch, env.node.prometheus_url)
        served = {sample.name for family in text_string_to_metric_families(text)
                  for sample in family.samples}
        dashboard = json.loads((REPO / "deploy/grafana/relayd.json").read_text())
        exprs = [target["expr"] for panel in dashboard["panels"]
                 for target in panel.get("targets", [])]
        rules = yaml.safe_load((REPO / "deploy/prometheus/relayd-alerts.yml").read_text())
        exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
        used = {name for expr in exprs for name in re.findall(r"\brabbitmq_[a-z_]+", expr)}
        assert len(used) >= 10
        assert used <= served
        assert env.inbox("acme") not in text
        assert "queue=" not in text


class TestIsolation:
    async def test_business_cannot_touch_another(self, env: Env) -> None:
        """B cannot consume A's inbox, bind to A's exchange, publish to it, publish with A's
        routing key, or set user_id to A; what B may do works."""
        await env.add_with_password("a", "a-user")
        b_password = await env.add_with_password("b", "b-user")
        b = await env.connect("b-user", b_password)
        async with b:
            async def consume_a(ch: AbstractChannel) -> None:
                await (await ch.get_queue(env.inbox("a"), ensure=False)).consume(ignore)

            async def bind_to_a(ch: AbstractChannel) -> None:
                await (await ch.get_queue(env.inbox("b"), ensure=False)).bind(env.exchange("a"))

            async def declare_own_queue(ch: AbstractChannel) -> None:
                await ch.declare_queue(exclusive=True)

            async def publish_to_a(ch: AbstractChannel) -> None:
                exchange = await ch.get_exchange(env.exchange("a"), ensure=False)
                await exchange.publish(reply_message("c" * 32, "b-user"), routing_key="")

            async def as_routing_key_a(ch: AbstractChannel) -> None:
                replies = await ch.get_exchange("relayd.replies", ensure=False)
                await replies.publish(reply_message("c" * 32, "b-user"), routing_key="a")

            async def as_user_a(ch: AbstractChannel) -> None:
                replies = await ch.get_exchange("relayd.replies", ensure=False)
                await replies.publish(reply_message("c" * 32, "a-user"), routing_key="b")

            for action in (consume_a, bind_to_a, declare_own_queue, publish_to_a,
                           as_routing_key_a):
                assert (await refusal(b, action)).startswith("ACCESS_REFUSED")
            assert (await refusal(b, as_user_a)).startswith("PRECONDITION_FAILED")

            channel = await b.channel(publisher_confirms=True)
            replies = await channel.get_exchange("relayd.replies", ensure=False)
            await replies.publish(reply_message("c" * 32, "b-user"), routing_key="b")
            await (await channel.get_queue(env.inbox("b"), ensure=False)).consume(ignore)
        [replied] = await env.relay.take("relayd.outbound", 1)
        assert (replied.user_id, replied.routing_key) == ("b-user", "b")

    async def test_user_limits(self, env: Env) -> None:
        """A business gets max_connections connections and max_channels channels, and
        cannot publish a message over the broker's max_message_size."""
        password = await env.add_with_password("acme", "acme-user")
        async with contextlib.AsyncExitStack() as stack:
            first = await stack.enter_async_context(await env.connect("acme-user", password))

            async def oversized(ch: AbstractChannel) -> None:
                replies = await ch.get_exchange("relayd.replies", ensure=False)
                await replies.publish(aio_pika.Message(b"x" * (2 * 1024 * 1024 + 1),
                                                       user_id="acme-user"), routing_key="acme")

            assert (await refusal(first, oversized)).startswith("PRECONDITION_FAILED")
            await stack.enter_async_context(await env.connect("acme-user", password))
            with pytest.raises(aiormq.exceptions.AMQPError):  # Connection.Close: NOT_ALLOWED
                await env.connect("acme-user", password)
            for _ in range(3):
                await first.channel()
            with pytest.raises(aiormq.exceptions.ConnectionNotAllowed, match="maximum"):
                await first.channel()


class TestDeviceSide:
    async def test_a_business_learns_nothing_about_any_device(self, env: Env) -> None:
        """With a business's own credentials, every probe that names a device by its id
        (a passive declare of the queue the id would name, of the id itself, a publish to
        relayd.devices under it, the management API) answers alike for a registered device
        with a message waiting and for an id nobody has; the device's queue is named by a
        token the business cannot compute, and even that name it may not read."""
        password = await env.add_with_password("acme", "acme-user")
        phone = await env.relay.add_device(USER, "phone")
        secret = env.relay.keyring.opaque_secret
        await amqp.Publisher(env.relay.channel, env.relay.settings, secret).to_device(
            "phone", b"sealed")
        real = env.relay.device_queue(phone)
        await env.relay.wait_depth(real, 1)
        assert "phone" not in real
        t = env.relay.settings.topology
        business = await env.connect("acme-user", password)
        async with business:
            answers: dict[str, list[str]] = {}
            for device in ("phone", "nobody"):
                async def by_id(ch: AbstractChannel, name: str = device) -> None:
                    await ch.declare_queue(t.device_queue.format(device=name), passive=True)

                async def bare(ch: AbstractChannel, name: str = device) -> None:
                    await ch.declare_queue(name, passive=True)

                async def route(ch: AbstractChannel, name: str = device) -> None:
                    devices = await ch.get_exchange(t.devices_exchange, ensure=False)
                    await devices.publish(aio_pika.Message(b"x"), routing_key=name)

                answers[device] = [
                    (await refusal(business, probe)).replace(device, "<id>").split(" - ")[0]
                    for probe in (by_id, bare, route)]
            assert answers["phone"] == answers["nobody"] == [
                "NOT_FOUND", "NOT_FOUND", "ACCESS_REFUSED"]

            async def read_real(ch: AbstractChannel) -> None:
                await (await ch.get_queue(real, ensure=False)).get(fail=False)

            assert (await refusal(business, read_real)).startswith("ACCESS_REFUSED")
        as_business = provision.Api(config.Management(
            url=env.node.mgmt_url, username="acme-user", password=password,
            ca_file=env.node.ca_cert))
        for path in (("queues", env.vhost), ("bindings", env.vhost), ("exchanges", env.vhost)):
            with pytest.raises(provision.ProvisionError, match="401"):
                as_business.call("GET", *path)
        await env.relay.wait_depth(real, 1)  # and the phone's message is still there


class TestOtherBusinesses:
    async def test_a_business_learns_nothing_about_another(self, env: Env) -> None:
        """With its own credentials, every probe of another business's inbox that a
        business can make from that business's id (a passive declare of the inbox the id
        would name, or of the id itself) answers alike for a business with events waiting
        and a consumer and for one that does not exist: not how many messages wait, nor
        whether it is connected. The inbox's real name, which `business add` gave globex
        alone, it may not read."""
        await env.add_with_password("globex", "globex-user")
        password = await env.add_with_password("acme", "acme-user")
        exchange = await env.relay.channel.get_exchange(env.exchange("globex"), ensure=False)
        for _ in range(3):
            await exchange.publish(aio_pika.Message(b"an event"), routing_key="")
        real = env.inbox("globex")
        await env.relay.wait_depth(real, 3)
        assert "globex" not in real
        watcher = await env.relay.channel.get_queue(real, ensure=False)
        tag = await watcher.consume(ignore, no_ack=False)  # globex is connected
        t = env.relay.settings.topology
        business = await env.connect("acme-user", password)
        async with business:
            answers: dict[str, list[str]] = {}
            for other in ("globex", "nobody"):
                names = [t.business_inbox.format(business=other), other]

                def probe(name: str) -> Any:
                    async def by_name(ch: AbstractChannel) -> None:
                        await ch.declare_queue(name, passive=True)
                    return by_name

                answers[other] = [
                    (await refusal(business, probe(name))).replace(other, "<id>").split(" - ")[0]
                    for name in names]
            assert answers["globex"] == answers["nobody"] == ["NOT_FOUND", "NOT_FOUND"]

            async def read_real(ch: AbstractChannel) -> None:
                await (await ch.get_queue(real, ensure=False)).get(fail=False)

            assert (await refusal(business, read_real)).startswith("ACCESS_REFUSED")
        await watcher.cancel(tag)


def publisher(exchange: str, routing_key: str = "", user_id: str | None = None) -> Any:
    """An action for `refusal`: publish one message, with confirms."""
    async def publish(ch: AbstractChannel) -> None:
        target = await ch.get_exchange(exchange, ensure=False)
        await target.publish(aio_pika.Message(b"{}", user_id=user_id), routing_key=routing_key)
    publish.__name__ = f"publish to {exchange or 'amq.default'} {routing_key}".strip()
    return publish


def consumer(queue: str) -> Any:
    """An action for `refusal`: consume a queue."""
    async def consume(ch: AbstractChannel) -> None:
        await (await ch.get_queue(queue, ensure=False)).consume(ignore)
    consume.__name__ = f"consume {queue}"
    return consume


class TestWhoMayPublishWhere:
    """Each party with exactly the permissions deploy/rabbitmq/README.md (or `business
    add`) gives it: what the README says it may do works; the rest of the relay is
    refused."""

    @staticmethod
    def vault_settings(env: Env, *, certificate: bool = False) -> config.Settings:
        """relayd's settings with the key vault's own login: a `relayd-vault` user with
        the README's permissions, by password (vault.url), or by a client certificate of
        its own (vault.url with ?auth=external, vault.tls)."""
        user, password = f"relayd-vault-{secrets.token_hex(3)}", secrets.token_hex(12)
        env.admin.api.put_user(user, [], None if certificate else password)
        env.admin.api.call("PUT", "permissions", env.vhost, user,
                           body=documented_permissions()["relayd-vault"])
        vault = config.Vault(file=env.relay.root / "vault" / "keys.db",
                             url=env.url(user, password), user=user)
        if certificate:
            cert, key = env.node.make_client_cert(user)
            vault = vault.model_copy(update={"url": env.url(), "tls": config.TLS(
                ca_file=env.node.ca_cert, cert_file=cert, key_file=key)})
        return env.relay.settings.model_copy(update={"vault": vault})

    @pytest.fixture(params=["password", "certificate"])
    async def vault_service(self, env: Env,
                            request: pytest.FixtureRequest) -> AsyncIterator[config.Settings]:
        """The key vault service, logged in as its own user with the README's permissions,
        by password or by its own certificate; yields the settings a relay host asks it
        with."""
        settings = self.vault_settings(env, certificate=request.param == "certificate")
        stop, ready = asyncio.Event(), asyncio.Event()
        serving = asyncio.create_task(vault.serve(settings, stop, ready))
        await asyncio.wait_for(ready.wait(), WAIT)
        yield settings
        stop.set()
        await asyncio.wait_for(serving, WAIT)

    @pytest.fixture
    async def relay_side(self, env: Env, vault_service: config.Settings) -> list[Any]:
        """The core topology with erase requests, a business and a device, and the key
        vault's queue: what nobody but relayd (or its owner) may touch."""
        await env.add_with_password("acme", "acme-user")
        phone = await env.relay.add_device(USER, "phone")
        t, secret = env.relay.settings.topology, env.relay.keyring.opaque_secret
        await topology.declare(env.relay.channel, topology.core(t, identity_service=True))
        return [publisher("", t.vault_queue), consumer(t.vault_queue),
                publisher(t.ingress_exchange, "inbound"), publisher(t.replies_exchange, "acme"),
                publisher(t.devices_exchange, topology.device_routing_key("phone", secret)),
                publisher(t.dead_exchange),
                publisher(t.gdpr_exchange), publisher(t.shard_exchange, "relayd.inbound.0"),
                publisher(env.exchange("acme")), publisher("", t.inbound_queue),
                publisher("", t.outbound_queue), publisher("", env.inbox("acme")),
                consumer(t.inbound_queue), consumer(t.outbound_queue), consumer(t.dead_queue),
                consumer(t.gdpr_queue), consumer(env.inbox("acme")),
                consumer(env.relay.device_queue(phone))]

    async def party(self, env: Env, name: str) -> tuple[str, AbstractConnection]:
        """A user with the README's permissions for `name`, connected over TLS."""
        user, password = f"{name}-{secrets.token_hex(3)}", secrets.token_hex(12)
        env.admin.api.put_user(user, [], password)
        env.admin.api.call("PUT", "permissions", env.vhost, user,
                           body=documented_permissions()[name])
        return user, await env.connect(user, password)

    @staticmethod
    async def refused_all_but(connection: AbstractConnection, actions: list[Any],
                              allowed: set[str]) -> None:
        for action in actions:
            if action.__name__ in allowed:
                channel = await connection.channel(publisher_confirms=True)
                await action(channel)
                await channel.close()
            else:
                assert (await refusal(connection, action)).startswith("ACCESS_REFUSED"), \
                    action.__name__

    async def test_relay_hosts_reach_the_vault(self, vault_service: config.Settings) -> None:
        """relayd, with the README's permissions, keeps a key in the vault service and
        reads it back; a business, as test_business shows, may neither ask nor listen."""
        asking = AmqpVault(vault_service)
        try:
            own, pseudonym = bytes(range(32)), "a" * 32
            key, sealed = await asking.add_person(pseudonym, own, seal(own, "user", pseudonym,
                                                                       USER))
            assert unseal(key, "user", pseudonym, sealed) == USER
            assert await asking.people([pseudonym]) == {pseudonym: (key, sealed)}
            assert await asking.forget_people([pseudonym]) == 1
        finally:
            await asking.close()

    async def test_only_the_vault_user_is_answered(
            self, env: Env, vault_service: config.Settings) -> None:
        """A key request from relayd's own user, which the edge logs in as (with or
        without user_id), is refused `not_allowed` and carries no key back, while the
        vault's user reads the key; relayd cannot pass itself off as the vault's user."""
        asking = AmqpVault(vault_service)
        pseudonym = "b" * 32
        try:
            own = bytes(range(32))
            key, sealed = await asking.add_person(pseudonym, own, seal(own, "user", pseudonym,
                                                                       USER))
        finally:
            await asking.close()
        as_relayd = await amqp.connect(env.relay.settings, "edge-like")
        async with as_relayd:
            asker = rpc.Asker(await as_relayd.channel())
            await asker.listen()
            requests: list[tuple[str, dict[str, Any]]] = [
                ("people", {"users": [pseudonym]}),
                ("all_people", {"seen_before_ms": 2 ** 62, "after": "", "limit": 10}),
                ("person", {"user": "c" * 32})]
            for op, fields in requests:
                for user_id in ("relayd", None):
                    body = await asker.ask("", vault_service.topology.vault_queue,
                                           aio_pika.Message(vault.request(op, **fields),
                                                            user_id=user_id), WAIT)
                    assert orjson.loads(body) == {"v": 1, "ok": False, "reason": "not_allowed"}
                    assert b64e(key) not in body.decode()
            spoofed = publisher("", vault_service.topology.vault_queue,
                                user_id=vault_service.vault.user)
            assert (await refusal(as_relayd, spoofed)).startswith("PRECONDITION_FAILED")
        asking = AmqpVault(vault_service)
        try:
            assert await asking.people([pseudonym, "c" * 32]) == {pseudonym: (key, sealed)}
        finally:
            await asking.close()

    async def test_only_the_vault_user_may_hold_the_vault_queue(self, env: Env) -> None:
        """With no vault service running, relayd's user (and so the edge) may neither
        declare relayd.vault nor consume it: nobody but the vault's user can stand in for
        the service and answer hosts; the vault's user may."""
        settings = self.vault_settings(env)
        spec = topology.vault(settings.topology)

        async def declare(ch: AbstractChannel) -> None:
            await topology.declare(ch, [spec])

        as_relayd = await amqp.connect(env.relay.settings, "edge-like")
        async with as_relayd:
            assert (await refusal(as_relayd, declare)).startswith("ACCESS_REFUSED")
            assert (await refusal(as_relayd, consumer(spec.name))).startswith(
                "ACCESS_REFUSED")
        as_vault = await amqp.connect(config.vault_login(settings), "vault-like")
        async with as_vault:
            channel = await as_vault.channel()
            await declare(channel)
            await consumer(spec.name)(channel)
            as_relayd = await amqp.connect(env.relay.settings, "edge-like")
            async with as_relayd:  # refused for want of rights, not because it is taken
                assert (await refusal(as_relayd, consumer(spec.name))).startswith(
                    "ACCESS_REFUSED")

    async def test_the_readme_names_every_party(self) -> None:
        """The README's commands cover relayd, the key vault, a gateway of one's own, the
        identity service, the push service and an operator."""
        assert set(documented_permissions()) == {"relayd", "relayd-vault", "gateway", "identity",
                                                 "push", "operator"}

    async def test_gateway(self, env: Env, relay_side: list[Any]) -> None:
        """A gateway of one's own publishes to relayd.ingress and consumes device queues,
        nothing else."""
        _, connection = await self.party(env, "gateway")
        async with connection:
            phone = next(a.__name__ for a in relay_side
                         if a.__name__.startswith("consume relayd.device."))
            await self.refused_all_but(connection, relay_side, {
                "publish to relayd.ingress inbound", phone})

    async def test_identity_service(self, env: Env, relay_side: list[Any]) -> None:
        """The identity service publishes erase requests as itself, nothing else."""
        user, connection = await self.party(env, "identity")
        async with connection:
            await self.refused_all_but(connection, relay_side, {"publish to relayd.gdpr"})
            channel = await connection.channel(publisher_confirms=True)
            await publisher(env.relay.settings.topology.gdpr_exchange, user_id=user)(channel)
            as_other = publisher(env.relay.settings.topology.gdpr_exchange, user_id="relayd")
            assert (await refusal(connection, as_other)).startswith("PRECONDITION_FAILED")

    async def test_identity_service_enrols_a_device(self, env: Env) -> None:
        """With the README's rights on both sides (relayd's and the identity service's),
        the identity service registers and revokes a device and reads relayd's answers on
        direct reply-to."""
        user, password = f"identity-{secrets.token_hex(3)}", secrets.token_hex(12)
        env.admin.api.put_user(user, [], password)
        env.admin.api.call("PUT", "permissions", env.vhost, user,
                           body=documented_permissions()["identity"])
        env.relay.settings = env.relay.settings.model_copy(update={
            "gdpr": config.Gdpr(identity_user=user)})
        await env.relay.start("gdpr")
        phone = DeviceKeys.generate("phone")
        async with IdentityService(env.url(user, password), user,
                                   ssl_context=env.node.ssl_context_for_client()) as identity:
            assert await identity.register(USER, phone) == {
                "v": 1, "type": "answer", "accepted": True, "outcome": "registered"}
            assert await env.relay.exists(env.relay.device_queue(phone))
            assert (await identity.revoke(USER, "phone"))["outcome"] == "revoked"
        assert not await env.relay.exists(env.relay.device_queue(phone))

    async def test_push_service(self, env: Env, relay_side: list[Any]) -> None:
        """The push service reads the wakes, nothing else: not the decider's notices."""
        t = env.relay.settings.topology
        await topology.declare(env.relay.channel, topology.wake(t))
        _, connection = await self.party(env, "push")
        async with connection:
            await self.refused_all_but(connection, [
                *relay_side, consumer(t.wake_queue), consumer(topology.wake_pending(t)),
                publisher(t.wake_exchange), publisher("", topology.wake_pending(t))],
                {"consume relayd.wake"})

    async def test_operator(self, env: Env, relay_side: list[Any]) -> None:
        """An operator reads relayd.dead, nothing else."""
        _, connection = await self.party(env, "operator")
        async with connection:
            await self.refused_all_but(connection, relay_side, {"consume relayd.dead"})

    async def test_business(self, env: Env, relay_side: list[Any]) -> None:
        """A business provisioned by `business add` publishes replies with its own routing
        key and consumes its own inbox, nothing else of the relay."""
        password = await env.add_with_password("globex", "globex-user")
        connection = await env.connect("globex-user", password)
        async with connection:
            await self.refused_all_but(connection, relay_side, set())


class TestOnboarding:
    async def test_add_provisions_exactly_the_grant(self, env: Env) -> None:
        """`business add` creates the user with its permissions, topic permission, limits,
        and a bounded inbox, and registers the business."""
        result = await env.add("acme", "acme-user")
        assert result["added"]
        assert result["provisioned"] == ["user", "permissions", "topic permission",
                                         "max-connections", "max-channels", "password"]
        assert len(result["password"]) >= 32
        permissions = env.admin.get("permissions", env.vhost, "acme-user")
        assert result["inbox"] == env.inbox("acme")
        assert re.fullmatch(r"relayd\.biz\.[a-z2-7]{32}\.inbox", result["inbox"])
        assert {k: permissions[k] for k in ("configure", "write", "read")} == {
            "configure": "^$", "write": r"^relayd\.replies$",
            "read": f"^{re.escape(result['inbox'])}$"}
        [topic] = env.admin.get("topic-permissions", env.vhost, "acme-user")
        assert (topic["exchange"], topic["write"], topic["read"]) == (
            "relayd.replies", "^acme$", "^$")
        [limits] = env.admin.get("user-limits", "acme-user")
        assert limits["value"] == {"max-connections": 2, "max-channels": 3}
        inbox = env.admin.get("queues", env.vhost, env.inbox("acme"))
        assert inbox["arguments"]["x-overflow"] == "reject-publish"
        assert inbox["arguments"]["x-max-length"] == 100_000
        business = await env.relay.store.business("acme")
        assert business is not None
        assert business.amqp_user == "acme-user"

    async def test_add_again_changes_nothing(self, env: Env) -> None:
        """Re-running `business add` keeps the user, its password and its permissions, and
        issues no new password; the password file is left as it was."""
        password_file = env.relay.root / "acme.password"
        args = ("business", "add", "acme", "--amqp-user", "acme-user", "--json",
                "--password-file", str(password_file))
        code, out, _ = await env.cli(*args)
        assert code == 0
        assert "password" not in orjson.loads(out)
        assert password_file.stat().st_mode & 0o777 == 0o600
        password = password_file.read_text()

        def broker_state() -> list[Any]:
            return [env.admin.get("users", "acme-user"),
                    env.admin.get("permissions", env.vhost, "acme-user"),
                    env.admin.get("topic-permissions", env.vhost, "acme-user"),
                    env.admin.get("user-limits", "acme-user"),
                    env.admin.get("queues", env.vhost, env.inbox("acme"))["arguments"]]

        before = broker_state()
        for _ in range(2):
            code, out, err = await env.cli(*args)
            assert code == 0, err
            assert orjson.loads(out) == {"business": "acme", "added": False,
                                         "inbox": env.inbox("acme"), "provisioned": []}
        assert broker_state() == before
        assert password_file.read_text() == password
        assert [b.id for b in await env.relay.store.businesses()] == ["acme"]
        connection = await env.connect("acme-user", password.strip())
        await connection.close()

    async def test_interrupted_add_is_completed_by_running_it_again(self, env: Env) -> None:
        """A user left without a password (a run that stopped half way) gets its password
        from the next `business add`, and is registered."""
        settings = env.relay.settings
        secret = env.relay.keyring.opaque_secret
        provision.ensure(env.admin.api, provision.grant(settings, "acme", "acme-user",
                                                        "password", secret))
        result = await env.add("acme", "acme-user")
        assert (result["added"], result["provisioned"]) == (True, ["password"])
        connection = await env.connect("acme-user", result["password"])
        await connection.close()

    async def test_refuses_a_user_it_did_not_create(self, env: Env) -> None:
        """`business add` never takes over an existing broker user such as an admin."""
        before = env.admin.get("permissions", env.vhost, "guest")
        code, _, err = await env.cli("business", "add", "evil", "--amqp-user", "guest")
        assert code == 1
        assert "not created by relayd" in err
        assert env.admin.get("permissions", env.vhost, "guest") == before
        assert await env.relay.store.business("evil") is None

    async def test_rotate_credentials(self, env: Env) -> None:
        """A new password works, the old one no longer does, and open connections close."""
        old = await env.add_with_password("acme", "acme-user")
        connection = await env.connect("acme-user", old)
        closed = closed_event(connection)
        password_file = env.relay.root / "new.password"
        code, _, err = await env.cli("business", "rotate-credentials", "acme",
                                     "--password-file", str(password_file))
        assert code == 0, err
        await asyncio.wait_for(closed.wait(), WAIT)
        new = password_file.read_text().strip()
        assert new != old
        with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
            await env.connect("acme-user", old)
        connection = await env.connect("acme-user", new)
        await connection.close()


class TestRemoval:
    async def test_removed_business_is_cut_off_at_once(self, env: Env) -> None:
        """`business remove` closes the open connection, refuses the next one, deletes the
        inbox and exchange and unregisters; running it again finds nothing."""
        password = await env.add_with_password("acme", "acme-user")
        connection = await env.connect("acme-user", password)
        closed = closed_event(connection)
        channel = await connection.channel()
        await (await channel.get_queue(env.inbox("acme"), ensure=False)).consume(ignore)

        code, out, err = await env.cli("business", "remove", "acme", "--json")
        assert code == 0, err
        assert orjson.loads(out) == {"business": "acme", "removed": True, "user": "deleted",
                                     "connections_closed": 1}
        await asyncio.wait_for(closed.wait(), WAIT)
        with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
            await env.connect("acme-user", password)
        assert env.admin.get("users", "acme-user") is None
        assert env.admin.get("queues", env.vhost, env.inbox("acme")) is None
        assert env.admin.get("exchanges", env.vhost, env.exchange("acme")) is None
        assert await env.relay.store.business("acme") is None
        code, _, _ = await env.cli("business", "remove", "acme")
        assert code == 3


class TestInboxUpgrade:
    async def test_move_points_the_business_at_its_new_inbox(self, env: Env) -> None:
        """With amqp.management, `topology move-business-inboxes` lets a business that
        relayd 0.2.0 provisioned read its new inbox only, closes its connection (what it
        held unacked goes back) and moves every event, those it held included, into the
        new inbox; the business then consumes that one, and the old name is refused."""
        password = await env.add_with_password("acme", "acme-user")
        new = env.inbox("acme")
        legacy = await env.relay.legacy_inbox("acme")
        env.admin.api.call("PUT", "permissions", env.vhost, "acme-user", body={
            "configure": "^$", "write": r"^relayd\.replies$", "read": f"^{re.escape(legacy)}$"})
        exchange = await env.relay.channel.get_exchange(env.exchange("acme"), ensure=False)
        for n in range(3):
            await exchange.publish(aio_pika.Message(b"{}", message_id=str(n)), routing_key="")
        business = await env.connect("acme-user", password)
        closed = closed_event(business)
        channel = await business.channel()
        await channel.set_qos(prefetch_count=1)
        held = asyncio.Event()

        async def hold(message: AbstractIncomingMessage) -> None:
            held.set()  # and never acked

        await (await channel.get_queue(legacy, ensure=False)).consume(hold)
        await asyncio.wait_for(held.wait(), WAIT)

        code, out, err = await env.cli("topology", "move-business-inboxes", "--json")
        assert code == 0, err
        assert orjson.loads(out) == {"queues": 1, "messages": 3}
        await asyncio.wait_for(closed.wait(), WAIT)
        permissions = env.admin.get("permissions", env.vhost, "acme-user")
        assert permissions["read"] == f"^{re.escape(new)}$"
        assert env.admin.get("queues", env.vhost, legacy) is None
        again = await env.connect("acme-user", password)
        async with again:
            async def read_legacy(ch: AbstractChannel) -> None:
                await (await ch.get_queue(legacy, ensure=False)).get(fail=False)

            assert (await refusal(again, read_legacy)).startswith("ACCESS_REFUSED")
            inbox = await (await again.channel()).get_queue(new, ensure=False)
            got = [await inbox.get(no_ack=True) for _ in range(3)]
            assert sorted(m.message_id for m in got if m is not None) == ["0", "1", "2"]


class TestCertificates:
    async def test_mtls_business_logs_in_with_its_certificate_alone(self, env: Env) -> None:
        """An x509 business gets no password; its certificate (CN = its user) logs it in
        with EXTERNAL, and it may do what a password business may."""
        result = await env.add("m", "m-user", "--auth", "x509")
        assert "password" not in result
        assert result["provisioned"] == ["user", "permissions", "topic permission",
                                         "max-connections", "max-channels"]
        cert = env.node.make_client_cert("m-user")
        connection = await env.connect(cert=cert)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            replies = await channel.get_exchange("relayd.replies", ensure=False)
            await replies.publish(reply_message("c" * 32, "m-user"), routing_key="m")
            refused = await refusal(connection, lambda ch: ch.declare_queue(exclusive=True))
            assert refused.startswith("ACCESS_REFUSED")
        [replied] = await env.relay.take("relayd.outbound", 1)
        assert replied.user_id == "m-user"
        with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
            await env.connect("m-user", "")
        code, _, err = await env.cli("business", "rotate-credentials", "m")
        assert code == 1
        assert "certificate" in err

    async def test_certificate_from_another_ca_is_refused(self, env: Env) -> None:
        """A certificate with the right CN from a CA the broker does not trust gets no
        connection."""
        await env.add("m", "m-user", "--auth", "x509")
        forged = env.node.make_client_cert("m-user", other_ca=True)
        with pytest.raises(aiormq.exceptions.AMQPConnectionError):
            await env.connect(cert=forged)


class TestRelaydTls:
    @pytest.mark.parametrize(("tls", "works"), [
        ({}, True),
        ({"server_hostname": "localhost"}, True),
        ({"server_hostname": "broker.example"}, False),
        ({"server_hostname": "broker.example", "verify_hostname": False}, True),
        ({"other_ca": True}, False),
    ])
    async def test_relayd_verifies_the_broker(self, env: Env, tls: dict[str, Any],
                                              works: bool) -> None:
        """relayd checks the broker's chain against amqp.tls.ca_file and its name against
        the URL's host or amqp.tls.server_hostname, unless verify_hostname is off."""
        data = relay_config(env.node, env.relay.root, env.vhost)
        if tls.pop("other_ca", False):
            tls["ca_file"] = str(env.node.other_ca_cert)
        data["amqp"]["tls"].update(tls)
        settings = config.parse(data, environ={})
        if works:
            connection = await amqp.connect(settings, "tls-check")
            await connection.close()
        else:
            with pytest.raises(aiormq.exceptions.AMQPConnectionError, match="CERTIFICATE"):
                await amqp.connect(settings, "tls-check")


SHARDS = 16  # a process holding them all needs 19 channels: more than the old limit of 16


def shard_holders(node: TestBroker, vhost: str) -> dict[str, set[str]]:
    """The connections (by name) that consume each queue of `vhost`."""
    channels = {c["pid"]: c["connection"] for c in orjson.loads(node.ctl(
        "list_channels", "pid", "connection", "--formatter", "json"))}
    connections = {c["pid"]: c["name"] for c in orjson.loads(node.ctl(
        "list_connections", "pid", "name", "--formatter", "json"))}
    held: dict[str, set[str]] = {}
    for consumer in orjson.loads(node.ctl("list_consumers", "-p", vhost, "queue_name",
                                          "channel_pid", "--formatter", "json")):
        connection = connections.get(channels.get(consumer["channel_pid"], ""), "gone")
        held.setdefault(consumer["queue_name"], set()).add(connection)
    return held


async def sharded_by(env: Env, hosts: int) -> None:
    """Until every shard queue and entry queue has a consumer, the shard queues spread
    over `hosts` connections per role (each host runs one worker of each role)."""
    t = env.relay.settings.topology
    async with asyncio.timeout(90):
        while True:  # the broker offers no event for a new consumer
            held = await asyncio.to_thread(shard_holders, env.node, env.vhost)
            if all(len(held.get(f"{entry}.{k}", ())) == 1 for k in range(SHARDS)
                   for entry in (t.inbound_queue, t.outbound_queue)) and all(
                    len(set().union(*(held[f"{entry}.{k}"] for k in range(SHARDS)))) == hosts
                    for entry in (t.inbound_queue, t.outbound_queue)) and all(
                    held.get(entry) for entry in (t.inbound_queue, t.outbound_queue)):
                return
            await asyncio.sleep(0.2)


class TestShardsOnTheShippedBroker:
    async def test_a_survivor_takes_every_shard_within_channel_max(self, env: Env) -> None:
        """With the shipped rabbitmq.conf, two hosts share 16 shards per direction; when
        one host is killed, the other consumes every shard (19 channels on its connection)
        and the conversation goes on, where channel_max = 16 refused the channels
        (530 NOT_ALLOWED) and left shards unconsumed."""
        relay = env.relay
        data = yaml.safe_load(relay.config_path.read_text())
        data["topology"] = {"shards": SHARDS, "shard_member_ttl": 1.5}
        data["metrics"] = {"enabled": False}
        relay.config_path.write_text(yaml.safe_dump(data))
        unprovisioned = relay.settings.model_copy(update={
            "amqp": relay.settings.amqp.model_copy(update={"management": None})})
        await admin.add_business(unprovisioned, relay.store, Business("acme", "guest"),
                                 relay.keyring.opaque_secret)
        phone = await relay.add_device(USER, "phone")
        hosts = [relay.spawn()]
        try:
            await sharded_by(env, 1)
            hosts.append(relay.spawn(config_path=relay.other_host("host-b")))
            await sharded_by(env, 2)
            await relay.send(phone, "acme", "start")
            [start] = await relay.events("acme", 1)
            kill_group(hosts[0])
            await sharded_by(env, 1)  # host B holds all 16 shards of each role
            sent = [await relay.send(phone, "acme", "message", {"text": str(n)})
                    for n in range(10)]
            assert [e["id"] for e in await relay.events("acme", 10)] == sent
            replies = [await relay.reply("acme", start["conversation"], "message",
                                         {"text": str(n)}) for n in range(10)]
            assert [m["id"] for m in await relay.received(phone, 10)] == replies
        finally:
            codes = [stop_process(h) if h.poll() is None else h.returncode for h in hosts]
            for host in hosts:
                kill_group(host)
        assert codes[1] == 0
        assert "NOT_ALLOWED" not in (relay.root / "relayd.log").read_text()
