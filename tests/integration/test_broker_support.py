"""The dedicated test broker serves AMQP, AMQPS with client certs and management, then stops."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path

import aio_pika
import pytest
from aio_pika.exceptions import AMQPConnectionError

from tests.support.broker import TestBroker, pid_alive

REPO = Path(__file__).resolve().parents[2]


async def _roundtrip(url: str, ssl_context: ssl.SSLContext | None = None) -> bytes:
    connection = await aio_pika.connect(url, ssl_context=ssl_context, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"ping"), routing_key=queue.name)
        message = await queue.get(timeout=10)
        await message.ack()
        return message.body


async def _publish_persistent(url: str, queue_name: str, body: bytes) -> None:
    async with await aio_pika.connect(url, timeout=10) as connection:
        channel = await connection.channel()
        await channel.declare_queue(queue_name, durable=True)
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(message, routing_key=queue_name)


async def _get_kept(url: str, queue_name: str) -> bytes:
    """The queue's one message after a restart: the queue must exist (passive), and the message
    may take a moment to be recovered, so ask a bounded number of times."""
    async with await aio_pika.connect(url, timeout=10) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        for _ in range(50):
            message = await queue.get(timeout=10, fail=False)
            if message is not None:
                await message.ack()
                return message.body
            await asyncio.sleep(0.2)
        raise AssertionError(f"{queue_name} survived the restart but its message did not")


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="class")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestBroker]:
    node = TestBroker(tmp_path_factory.mktemp("broker"))
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.mark.broker_node
class TestDedicatedBroker:
    """Tests run in order on one node; the last one stops it."""

    def test_plain_amqp_roundtrip(self, broker: TestBroker) -> None:
        assert asyncio.run(_roundtrip(broker.amqp_url)) == b"ping"

    def test_tls_with_client_cert_and_external_auth(self, broker: TestBroker) -> None:
        broker.ctl("add_user", "relay-a", secrets.token_hex(16))
        broker.ctl("set_permissions", "-p", "/", "relay-a", ".*", ".*", ".*")
        context = broker.ssl_context_for_client(broker.make_client_cert("relay-a"))
        url = f"amqps://127.0.0.1:{broker.amqps_port}/?auth=external"
        assert asyncio.run(_roundtrip(url, context)) == b"ping"

    def test_tls_without_client_cert_allows_password_login(self, broker: TestBroker) -> None:
        context = broker.ssl_context_for_client()
        assert asyncio.run(_roundtrip(broker.amqps_url, context)) == b"ping"

    def test_client_cert_from_other_ca_is_refused(self, broker: TestBroker) -> None:
        context = broker.ssl_context_for_client(broker.other_client_cert)
        # With TLS 1.3 the server checks the client cert after the client's handshake is done,
        # so the refusal shows up as an "unknown ca" alert or as a reset, depending on timing.
        with pytest.raises(AMQPConnectionError):
            asyncio.run(_roundtrip(broker.amqps_url, context))

    def test_management_overview(self, broker: TestBroker) -> None:
        http = HTTPConnection("127.0.0.1", broker.mgmt_port, timeout=10)
        auth = base64.b64encode(b"guest:guest").decode()
        try:
            http.request("GET", "/api/overview", headers={"Authorization": f"Basic {auth}"})
            response = http.getresponse()
            assert response.status == 200
            overview = json.load(response)
        finally:
            http.close()
        assert overview["node"] == broker.node_name

    def test_crash_restart_keeps_ports_and_persistent_messages(self, broker: TestBroker) -> None:
        """The node killed and started again keeps its ports and its data directory. The
        message is confirmed (on disk); the queue's declaration lives in Mnesia, whose log
        reaches the file only on its own schedule, so it is synced before the kill: a
        queue declared a moment before a kill -9 may be lost (once seen in CI)."""
        asyncio.run(_publish_persistent(broker.amqp_url, "durable-q", b"kept"))
        broker.ctl("eval", "mnesia:sync_log().")
        old_pid, old_url = broker.pid, broker.amqp_url
        broker.restart(graceful=False)
        assert old_pid is not None
        assert not pid_alive(old_pid)
        assert broker.amqp_url == old_url
        assert asyncio.run(_get_kept(broker.amqp_url, "durable-q")) == b"kept"

    def test_stop_leaves_no_process_and_is_idempotent(self, broker: TestBroker) -> None:
        pid = broker.pid
        assert pid is not None
        assert pid_alive(pid)
        broker.stop()
        assert not pid_alive(pid)
        assert not any(_port_open(p) for p in (broker.amqp_port, broker.mgmt_port))
        broker.stop()
        assert broker.pid is None


@pytest.mark.broker_node
def test_cli_start_then_stop(tmp_path: Path) -> None:
    script = [sys.executable, str(REPO / "scripts" / "test-broker")]
    started = subprocess.run(
        [*script, "start", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    state = json.loads(started.stdout)
    assert state == json.loads((tmp_path / "state.json").read_text())
    try:
        assert asyncio.run(_roundtrip(state["amqp_url"])) == b"ping"
    finally:
        subprocess.run([*script, "stop", "--dir", str(tmp_path)], timeout=120, check=True)
    assert not pid_alive(state["pid"])
