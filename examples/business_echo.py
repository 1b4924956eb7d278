#!/usr/bin/env python3
"""A business that answers every message with an echo: a minimal relayd integration.

It needs only aio-pika (pip install aio-pika). With a password (from `relayd business add`):

    python examples/business_echo.py --business acme --ca ca.pem \\
        --url amqps://acme@rabbitmq.example.com:5671/relayd --password-file acme.password

With a client certificate only (`business add --auth x509`; the certificate's CN is the user):

    python examples/business_echo.py --business acme --ca ca.pem --user acme \\
        --cert acme.pem --key acme.key \\
        --url 'amqps://rabbitmq.example.com:5671/relayd?auth=external'

What it shows (docs/business-guide.md explains each): TLS with the broker's CA; consuming
your inbox; publishing replies to `relayd.replies` with routing key = your business id and
`user_id` = your RabbitMQ user; de-duplicating events on `id`; acking an event only after
the broker has confirmed the reply. A user who writes "menu" gets a list picker, and their
response is answered with the titles they chose: relayd checks an answer's shape only, so
the business checks that it answers a menu it sent. It stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import uuid
from collections import OrderedDict
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from yarl import URL

# Reply ids derive from the event id, so answering the same event twice (after a crash,
# before the ack) sends the same reply id, which devices de-duplicate.
REPLY_NAMESPACE = uuid.UUID("0e6f2c1a-3b7d-4c55-9f1e-7a2b8c9d0e11")
MENU = {"title": "Menu", "multiple": True, "sections": [
    {"title": "Drinks", "items": [{"id": "tea", "title": "Tea", "subtitle": "Earl Grey"},
                                  {"id": "coffee", "title": "Coffee"}]},
    {"title": "Food", "items": [{"id": "cake", "title": "Cake"},
                                {"id": "soup", "title": "Soup", "subtitle": "of the day"}]}]}
TITLES = {item["id"]: item["title"] for section in MENU["sections"] for item in section["items"]}


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
    def __init__(self, business: str, user: str, replies: AbstractExchange) -> None:
        self.business = business
        self.user = user
        self.replies = replies
        self.seen = Seen()
        self.menus = Seen(10_000)  # ids of the menus sent: the only answers we accept

    async def on_event(self, message: AbstractIncomingMessage) -> None:
        event = json.loads(message.body)
        key = message.message_id or ""  # the event's id (error events derive one)
        if key not in self.seen:
            await self.answer(event)
            self.seen.add(key)
        await message.ack()  # only now: the reply above is confirmed by the broker

    async def answer(self, event: dict[str, object]) -> None:
        kind, body = event["type"], event.get("body") or {}
        if kind == "error":  # a reply of ours was refused: event["ref"] is its id
            print(f"relayd refused reply {event['ref']}: {event['code']}", file=sys.stderr)
            return
        if not isinstance(body, dict):
            return
        reply_id = str(uuid.uuid5(REPLY_NAMESPACE, str(event["id"])))
        if kind == "response":  # the user picked from a menu: body names it and the ids
            if body["message_id"] not in self.menus:  # not ours, or forgotten: expired
                await self.send(event, reply_id, {"text": "That menu has expired: write menu."})
                return
            chosen = [TITLES[i] for i in body["selected"] if i in TITLES]
            await self.send(event, reply_id, {"text": "you chose: " + ", ".join(chosen),
                                              "reply_to": body["message_id"]})
            return
        if kind != "message" or "text" not in body:
            return  # start, typing, read, reaction and close need no answer here
        if str(body["text"]).strip().lower() == "menu":
            # `text` is what an app that predates interactive messages shows instead.
            await self.send(event, reply_id, {"text": "What would you like?",
                                              "list_picker": MENU})
            self.menus.add(reply_id)
            return
        await self.send(event, reply_id, {"text": f"echo: {body['text']}"})

    async def send(self, event: dict[str, object], reply_id: str, body: dict[str, object]) -> None:
        """Publish one message reply in the event's conversation; return once confirmed."""
        reply = {"v": 1, "type": "message", "conversation": event["conversation"],
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
        inbox = await channel.get_queue(args.inbox or f"relayd.biz.{args.business}.inbox",
                                        ensure=False)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        connection.close_callbacks.add(lambda *_: stop.set())
        await inbox.consume(Echo(args.business, user, replies).on_event)
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
    parser.add_argument("--inbox", help="default: relayd.biz.<business>.inbox")
    parser.add_argument("--prefetch", type=int, default=1,
                        help="events in flight; 1 keeps each conversation in order")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
