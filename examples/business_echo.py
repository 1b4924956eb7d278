#!/usr/bin/env python3
"""A business that answers every message with an echo: a minimal relayd integration.

It needs only aio-pika (pip install aio-pika). The operator's `relayd business add` gives
you your inbox's name (relayd.biz.<token>.inbox: no other business can name it) and, with
a password, the password:

    python examples/business_echo.py --business acme --ca ca.pem --inbox INBOX \\
        --url amqps://acme@rabbitmq.example.com:5671/relayd --password-file acme.password

With a client certificate only (`business add --auth x509`; the certificate's CN is the user):

    python examples/business_echo.py --business acme --ca ca.pem --inbox INBOX --user acme \\
        --cert acme.pem --key acme.key \\
        --url 'amqps://rabbitmq.example.com:5671/relayd?auth=external'

What it shows (docs/business-guide.md explains each): TLS with the broker's CA; consuming
your inbox; publishing replies to `relayd.replies` with routing key = your business id and
`user_id` = your RabbitMQ user; de-duplicating events on `id`; acking an event only after
the broker has confirmed the reply. A user who writes "menu" gets a list picker ("quick", a
quick reply; "time", a time picker; "link", a rich link), and their response is answered
with the titles they chose: relayd checks an answer's shape only, so the business checks
that it answers a picker it sent. A reaction is echoed on the same message, and its
removal too. With --desk it also does what an agent desk shows: each message is marked
read, and the answer is typed first. It prints the type of each event it handles (never
its content), logs the receipts of its messages (`delivered`, `expired`) to stderr, and
stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from yarl import URL

# Reply ids derive from the event id, so answering the same event twice (after a crash,
# before the ack) sends the same reply id, which devices de-duplicate.
REPLY_NAMESPACE = uuid.UUID("0e6f2c1a-3b7d-4c55-9f1e-7a2b8c9d0e11")
MENU: dict[str, Any] = {"title": "Menu", "multiple": True, "sections": [
    {"title": "Drinks", "items": [{"id": "tea", "title": "Tea", "subtitle": "Earl Grey"},
                                  {"id": "coffee", "title": "Coffee"}]},
    {"title": "Food", "items": [{"id": "cake", "title": "Cake"},
                                {"id": "soup", "title": "Soup", "subtitle": "of the day"}]}]}
QUICK: dict[str, Any] = {"options": [{"id": "yes", "title": "Yes"},
                                     {"id": "no", "title": "No, thanks"}]}
# Inline, so that the app shows it without fetching anything: a 1x1 PNG.
THUMBNAIL = {"mime": "image/png", "data": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlE"
             "QVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="}
HOUR_MS = 3_600_000


def picker(word: str) -> dict[str, object] | None:
    """The interactive message a keyword asks for, or None. `text` is what an app that
    predates interactive messages shows instead."""
    if word == "menu":
        return {"text": "What would you like?", "list_picker": MENU}
    if word == "quick":
        return {"text": "Do you want Sunday delivery?", "quick_reply": QUICK}
    if word == "time":
        first = (time.time_ns() // 1_000_000 // HOUR_MS + 1) * HOUR_MS  # the next full hours
        slots = [{"id": f"slot-{i}", "start": first + i * HOUR_MS, "duration": 3600}
                 for i in range(3)]
        return {"text": "When shall we deliver?", "time_picker": {
            "title": "Delivery", "timezone": "Europe/Paris", "slots": slots}}
    if word == "link":
        url = "https://acme.example/track/1234"
        return {"text": f"Your order is on its way: {url}", "rich_link": {
            "url": url, "title": "Track order 1234", "image": THUMBNAIL}}
    return None


def choices(body: dict[str, Any]) -> dict[str, str]:
    """What an interactive message offers: each option, item or slot id, with its title."""
    if "list_picker" in body:
        return {item["id"]: item["title"] for section in MENU["sections"]
                for item in section["items"]}
    if "quick_reply" in body:
        return {option["id"]: option["title"] for option in QUICK["options"]}
    if "time_picker" in body:
        return {slot["id"]: time.strftime("%H:%M UTC", time.gmtime(slot["start"] // 1000))
                for slot in body["time_picker"]["slots"]}
    return {}


class Seen:
    """The message ids of the last `size` events handled: relayd may deliver one twice."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)


class Echo:
    def __init__(self, business: str, user: str, replies: AbstractExchange,
                 desk: bool = False) -> None:
        self.business = business
        self.user = user
        self.replies = replies
        self.desk = desk
        self.seen = Seen()
        # The pickers sent, by message id, with what each offered: the only answers we
        # accept. The oldest are forgotten: an answer to one of those has expired.
        self.offers: OrderedDict[str, dict[str, str]] = OrderedDict()

    async def on_event(self, message: AbstractIncomingMessage) -> None:
        event = json.loads(message.body)
        key = message.message_id or ""  # the event's id (error events derive one)
        if key not in self.seen:
            await self.answer(event)
            self.seen.add(key)
        await message.ack()  # only now: the reply above is confirmed by the broker

    async def answer(self, event: dict[str, object]) -> None:
        kind, body = event["type"], event.get("body") or {}
        print(f"{kind} event", flush=True)  # its type only: never what the user wrote
        if kind == "error":  # a reply of ours was refused: event["ref"] is its id
            print(f"relayd refused reply {event['ref']}: {event['code']}", file=sys.stderr)
            return
        if kind in ("delivered", "expired"):  # receipts (contract 1.4): once per message
            # A desk shows the message `ref` as delivered (a device of the user has it) or
            # failed (it expired, no device ever fetched it); `ts` is to the minute.
            print(f"receipt: message {event['ref']} {kind} at {event['ts']}", file=sys.stderr)
            return
        if not isinstance(body, dict):
            return
        reply_id = str(uuid.uuid5(REPLY_NAMESPACE, str(event["id"])))
        if kind == "reaction":  # the same emoji on the same message, or taken off it
            await self.send(event, reply_id, body, kind="reaction")
            return
        if kind == "response":  # the user picked: body names the picker and the ids
            offered = self.offers.get(body["message_id"])
            if offered is None:  # not ours, or forgotten: expired
                await self.send(event, reply_id, {"text": "That menu has expired: write menu."})
                return
            chosen = [offered[i] for i in body["selected"] if i in offered]
            await self.send(event, reply_id, {"text": "you chose: " + ", ".join(chosen),
                                              "reply_to": body["message_id"]})
            return
        if kind != "message" or "text" not in body:
            return  # start, typing, read and close need no answer here
        if self.desk:  # an agent reads the message, then types the answer
            for step in ("read", "typing_start"):
                await self.send(event, str(uuid.uuid5(REPLY_NAMESPACE, f"{event['id']}:{step}")),
                                {}, kind=step)
        if found := picker(str(body["text"]).strip().lower()):
            await self.send(event, reply_id, found)
            self.offers[reply_id] = choices(found)
            while len(self.offers) > 10_000:
                self.offers.popitem(last=False)
            return
        await self.send(event, reply_id, {"text": f"echo: {body['text']}"})

    async def send(self, event: dict[str, object], reply_id: str, body: dict[str, object],
                   kind: str = "message") -> None:
        """Publish one reply in the event's conversation; return once confirmed."""
        reply = {"v": 1, "type": kind, "conversation": event["conversation"],
                 "id": reply_id, "body": body}
        await self.replies.publish(
            aio_pika.Message(json.dumps(reply).encode(), content_type="application/json",
                             message_id=reply_id, user_id=self.user,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=self.business)


async def run(args: argparse.Namespace) -> None:
    context = ssl.create_default_context(cafile=args.ca)  # TLS 1.2+, verifies the broker
    if args.cert:
        context.load_cert_chain(args.cert, args.key)
    url = URL(args.url)
    if args.password_file:
        url = url.with_password(args.password_file.read_text().strip())
    user = args.user or url.user
    if not user:
        raise SystemExit("name your RabbitMQ user: in --url or with --user")
    connection = await aio_pika.connect(url, ssl_context=context)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=args.prefetch)
        replies = await channel.get_exchange(args.replies_exchange, ensure=False)
        inbox = await channel.get_queue(args.inbox, ensure=False)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        connection.close_callbacks.add(lambda *_: stop.set())
        await inbox.consume(Echo(args.business, user, replies, args.desk).on_event)
        print(f"consuming {inbox.name} as {user}", flush=True)
        await stop.wait()
        if connection.is_closed:
            raise SystemExit("the broker closed the connection")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--business", required=True, help="your business id")
    parser.add_argument("--url", required=True, help="amqps://USER@HOST:5671/VHOST")
    parser.add_argument("--user", help="your RabbitMQ user (default: the URL's)")
    parser.add_argument("--password-file", type=Path, help="file holding your password")
    parser.add_argument("--ca", help="PEM file of the CA that signed the broker's certificate")
    parser.add_argument("--cert", help="your client certificate (PEM), for --auth x509")
    parser.add_argument("--key", help="the key of --cert (PEM)")
    parser.add_argument("--replies-exchange", default="relayd.replies")
    parser.add_argument("--inbox", required=True,
                        help="your inbox, as `relayd business add` named it")
    parser.add_argument("--desk", action="store_true",
                        help="mark each message read and type before answering")
    parser.add_argument("--prefetch", type=int, default=1,
                        help="events in flight; 1 keeps each conversation in order")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
