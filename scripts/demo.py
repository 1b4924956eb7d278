"""A real relay session, end to end, printing each hop.

Generates keys, registers a business and two devices of one user, starts `relayd run`
with one edge process (workers.edge: 1) and waits until it is ready, then plays a
conversation: the devices connect to the edge over WebSocket and log in with their own
keys; the business speaks AMQP. Start, messages both
ways, typing, a reply reaching both devices, the user deleting the conversation, and the
next business reply rejected with conversation_closed. Uses the SQLite store, with no
extra service.

With --web it plays nothing itself: it runs examples/business_echo.py (--desk) as the
business, serves the chat page of clients/web on loopback and prints its URL, and runs
until Ctrl-C or SIGTERM. The page makes its keys in the browser and posts the public
halves to /enrol, where the demo, standing in for the site's account service, enrols the
device for the demo's user through the identity service's `register` request over AMQP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika

from relayd.client import (
    DeviceKeys,
    EdgeDevice,
    IdentityService,
    RelayPublic,
    parse_event,
    reply,
)

BROKER = "amqp://guest:guest@127.0.0.1:5672"
BUSINESS = "acme"
EDGE = "edge-demo"
USER = "alice@example.org"  # never leaves the relay: acme only sees an opaque id
TIMEOUT = 10.0
REPO = Path(__file__).resolve().parent.parent
REGISTRATION = frozenset({"device", "kem", "enc_key", "sign_key"})


def expect(ok: bool) -> None:
    """Stop the demo, naming the line, when a hop did not arrive as it should."""
    if not ok:
        line = sys._getframe(1).f_lineno
        raise SystemExit(f"demo failed: the check at scripts/demo.py:{line} did not hold")


def hop(arrow: str, text: str) -> None:
    print(f"  {arrow:<28} {text}", flush=True)


def relayd(config: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "relayd", *args, "--config", str(config)],
                            check=True, capture_output=True, text=True)
    return result.stdout


async def next_message(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message on `queue`, waiting up to TIMEOUT seconds."""
    async with queue.iterator(timeout=TIMEOUT) as messages:
        async for message in messages:
            await message.ack()
            return message
    raise TimeoutError(f"nothing arrived on {queue.name}")


async def play(url: str, edge_url: str, relay: RelayPublic, phone_keys: DeviceKeys,
               laptop_keys: DeviceKeys, queues: dict[str, str], inbox_name: str) -> None:
    connection = await aio_pika.connect(url)  # the business's side: AMQP
    async with connection, \
            EdgeDevice(edge_url, EDGE, phone_keys, relay) as phone_app, \
            EdgeDevice(edge_url, EDGE, laptop_keys, relay) as laptop_app:
        print(f"alice's phone and laptop logged in to the edge at {edge_url}")
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.get_exchange("relayd.replies")
        inbox = await channel.get_queue(inbox_name)  # as `business add` named it
        apps = {phone_keys.device: phone_app, laptop_keys.device: laptop_app}
        phone, laptop = phone_keys, laptop_keys

        async def up(device: DeviceKeys, kind: str, body: dict[str, Any] | None = None) -> None:
            await apps[device.device].send(BUSINESS, kind, body)  # returns on the edge's ack

        async def business_sees() -> dict[str, Any]:
            event = parse_event((await next_message(inbox)).body)
            hop("relay -> acme", json.dumps(event))
            return event

        async def device_gets(device: DeviceKeys) -> dict[str, Any]:
            app = apps[device.device]
            message = await asyncio.wait_for(app.receive(), TIMEOUT)  # opened and verified
            await app.received(message)
            hop(f"relay -> {device.device}", f"{message['type']} seq={message['seq']} "
                f"body={json.dumps(message['body'])}")
            return message

        async def business_says(conversation: str, kind: str,
                                body: dict[str, Any] | None = None) -> None:
            await replies.publish(aio_pika.Message(
                reply(conversation, kind, body), content_type="application/json",
                user_id="guest", delivery_mode=2), routing_key=BUSINESS)
            hop("acme -> relay", f"{kind} {json.dumps(body or {})}")

        print("1. alice starts a conversation from her phone")
        await up(phone, "start", {"intent": "order-status", "text": "Where is my order?"})
        event = await business_sees()
        conversation = event["conversation"]
        expect(event["type"] == "start" and "user" not in event)
        expect((await device_gets(laptop))["type"] == "echo")

        print("2. acme types, then answers; both of alice's devices get it, sealed separately")
        await business_says(conversation, "typing_start")
        for device in (phone, laptop):
            expect((await device_gets(device))["type"] == "typing_start")
        await business_says(conversation, "message", {"text": "It ships tomorrow."})
        for device in (phone, laptop):
            expect((await device_gets(device))["body"]["text"] == "It ships tomorrow.")

        print("3. alice answers from her laptop and reads; the phone sees the echo")
        await up(laptop, "typing_start")
        expect((await business_sees())["type"] == "typing_start")
        await up(laptop, "message", {"text": "Thanks!"})
        expect((await business_sees())["body"]["text"] == "Thanks!")
        expect((await device_gets(phone))["type"] == "echo")
        await up(laptop, "read")
        expect((await business_sees())["type"] == "read")

        print("4. alice deletes the conversation on her phone")
        await up(phone, "close")
        expect((await business_sees())["type"] == "close")
        expect((await device_gets(laptop))["type"] == "close")

        print("5. acme writes again: rejected, and no device receives anything")
        await business_says(conversation, "message", {"text": "Anything else?"})
        error = await business_sees()
        expect(error["type"] == "error" and error["code"] == "conversation_closed")
        for device in (phone, laptop):
            queue = await channel.declare_queue(queues[device.device], passive=True)
            expect(queue.declaration_result.message_count == 0)
    print("demo: every hop arrived as expected")


def free_port() -> int:
    """A port free on loopback now, for the demo's edge."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def broker_vhost() -> Iterator[str]:
    """A vhost of the demo's own on the local broker, removed afterwards; or the URL in
    RELAYD_DEMO_AMQP_URL, used as it is."""
    if url := os.environ.get("RELAYD_DEMO_AMQP_URL"):
        yield url
        return
    vhost = f"relayd-demo-{secrets.token_hex(3)}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True)
    try:
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest",
                        ".*", ".*", ".*"], check=True)
        yield f"{BROKER}/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False)


class Enrolment:
    """The demo's stand-in for a site's account service: it enrols the page's device for
    USER as the operator's identity service does, with a `register` request over AMQP
    (docs/protocol.md, "Requests from the identity service"), and waits for relayd's
    answer. The demo's broker user, guest, is the identity service (gdpr.identity_user)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self, registration: object) -> bool:
        if not (isinstance(registration, dict) and registration.keys() == REGISTRATION
                and all(isinstance(v, str) for v in registration.values())):
            return False
        answer = asyncio.run(self.register(registration))
        if not answer.get("accepted"):
            print(f"enrolment refused: {answer.get('reason')}", flush=True)
            return False
        print(f"enrolled the page's device {registration['device']} for {USER} "
              f"({answer['outcome']}, by the identity service's register request)", flush=True)
        return True

    async def register(self, registration: dict[str, str]) -> dict[str, Any]:
        async with IdentityService(self.url, "guest", timeout=TIMEOUT) as identity:
            return await identity.ask({"type": "register", "user": USER, **registration})


def web_server(page_config: dict[str, Any], enrol: Enrolment,
               port: int) -> http.server.ThreadingHTTPServer:
    """clients/ as static files on loopback (the page and the SDK it imports), the page's
    config.json made for this relay, and POST /enrol."""
    config_json = json.dumps(page_config).encode()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(REPO / "clients"), **kwargs)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path in ("/", "/web"):
                self.send_response(302)
                self.send_header("Location", "/web/")
                self.end_headers()
            elif path == "/web/config.json":
                self.answer(200, config_json, "application/json")
            else:
                super().do_GET()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if self.path != "/enrol" or not 0 < length <= 8192:
                self.answer(404 if self.path != "/enrol" else 413)
                return
            try:
                registration = json.loads(self.rfile.read(length))
            except ValueError:
                registration = None
            self.answer(204 if enrol(registration) else 400)

        def answer(self, status: int, body: bytes = b"", kind: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the demo prints what matters

    return http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)


def serve_web(url: str, edge_port: int, relay_json: str, web_port: int,
              server: subprocess.Popen[bytes], inbox: str) -> None:
    """Run the echo business and serve the page until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    echo = subprocess.Popen([sys.executable, str(REPO / "examples" / "business_echo.py"),
                             "--business", BUSINESS, "--inbox", inbox, "--url", url, "--desk"],
                            start_new_session=True)  # Ctrl-C stops the demo, which stops it
    page = {"edge_url": f"ws://127.0.0.1:{edge_port}/v1/device", "edge_name": EDGE,
            "relay": json.loads(relay_json), "enrol_url": "/enrol",
            "businesses": [{"id": BUSINESS, "name": "Acme (echo)"}]}
    httpd = web_server(page, Enrolment(url), web_port)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        print(f"the chat page: http://127.0.0.1:{httpd.server_address[1]}/web/", flush=True)
        print("write to Acme; menu, quick, time or link get a picker. Ctrl-C stops the demo",
              flush=True)
        while not stop.wait(0.5):
            if echo.poll() is not None or server.poll() is not None:
                raise SystemExit("demo failed: business_echo or relayd run exited")
    finally:
        httpd.shutdown()
        echo.terminate()
        echo.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--web", action="store_true",
                        help="serve the chat page next to the relay and an echo business")
    parser.add_argument("--web-port", type=int, default=0,
                        help="the page's port on 127.0.0.1 (default: any free one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relayd-demo-") as tmp, broker_vhost() as url:
        work = Path(tmp)
        config = work / "relayd.yaml"
        port, metrics = free_port(), free_port()
        config.write_text(f"amqp:\n  url: {url}\nstore:\n  url: sqlite:///{work}/relayd.db\n"
                          f"keys:\n  dir: {work}/keys\nlogging:\n  level: warning\n"
                          f"metrics:\n  port: {metrics}\nworkers:\n  edge: 1\n"
                          f"edge:\n  name: {EDGE}\n  port: {port}\n"
                          # --web enrols as the identity service, the broker user guest
                          + ("gdpr:\n  identity_user: guest\n" if args.web else ""))
        relayd(config, "keys", "generate", "--kid", "demo-1")
        relay_json = relayd(config, "keys", "show")
        relay = RelayPublic.from_json(relay_json)
        print(f"relay key {relay.kid} ({relay.kem.value}) generated")
        inbox = json.loads(relayd(config, "business", "add", BUSINESS, "--amqp-user", "guest",
                                  "--json"))["inbox"]
        if args.web:
            server = subprocess.Popen([sys.executable, "-m", "relayd", "run", "--config",
                                       str(config)], start_new_session=True)
            try:
                wait_ready(server, metrics)
                print("relayd run is ready: inbound, outbound and edge workers", flush=True)
                serve_web(url, port, relay_json, args.web_port, server, inbox)
            finally:
                server.terminate()
                print(f"relayd run exited with {server.wait(timeout=30)}", flush=True)
            return 0
        phone, laptop = DeviceKeys.generate("alice-phone"), DeviceKeys.generate("alice-laptop")
        queues = {}  # each device's queue, named by a keyed token: to check it is empty
        for device in (phone, laptop):
            reg = device.registration(USER)
            queues[device.device] = json.loads(relayd(
                config, "device", "add", "--user", USER, "--device", device.device,
                f"--enc-key={reg['enc_key']}", f"--sign-key={reg['sign_key']}", "--json"))["queue"]
        print(f"business {BUSINESS} and devices {phone.device}, {laptop.device} registered")
        server = subprocess.Popen([sys.executable, "-m", "relayd", "run", "--config", str(config)])
        try:
            wait_ready(server, metrics)
            print("relayd run is ready: inbound, outbound and edge workers")
            asyncio.run(play(url, f"ws://127.0.0.1:{port}/v1/device", relay, phone, laptop,
                             queues, inbox))
        finally:
            server.terminate()
            print(f"relayd run exited with {server.wait(timeout=30)}")
    return 0


def wait_ready(server: subprocess.Popen[bytes], port: int, wait_s: float = 60.0) -> None:
    """Until relayd's /readyz says every worker works (the edge: takes logins)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"demo failed: relayd run exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                return
        except OSError:  # not listening yet, or 503: not ready yet
            time.sleep(0.2)  # a person's script polling a service; not a test
    raise SystemExit(f"demo failed: relayd run was not ready within {wait_s:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
