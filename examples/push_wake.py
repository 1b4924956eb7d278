#!/usr/bin/env python3
"""A push service's side of relayd's push wake: read the wakes, push to each device.

It needs only aio-pika (pip install aio-pika). relayd (with `wake.enabled: true`)
publishes one wake per offline device per `wake.interval` to the exchange `relayd.wake`,
and keeps them in the queue `relayd.wake`, which this reads (read permission on
`relayd.wake` is all it needs; docs/operations.md, "Push wake"):

    python examples/push_wake.py --url amqps://push:PASSWORD@rabbitmq.example.com:5671/relayd

A wake is `{"v": 1, "type": "wake", "device": "alice-phone", "count": 3}`: which device,
and how many messages wait for it. Nothing else: no sender, no business, no text. Your
push service knows which APNs or FCM token belongs to which device id (the app tells it,
as your identity service registers the device); here, a dict stands in for it. A push
should carry no content either: it only makes the app connect to the edge and read. It
acks each wake after the push was handed over; it stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

PUSH_TOKENS = {"alice-phone": "apns:1f0c…"}  # your registry: device id -> push token


async def push(token: str, count: int) -> None:
    """Hand one content-free push to APNs or FCM (here: print it)."""
    print(f"push to {token}: {count} new message{'s' * (count != 1)}", flush=True)


async def on_wake(message: AbstractIncomingMessage) -> None:
    async with message.process(requeue=False):  # a wake that cannot be read is dropped
        wake = json.loads(message.body)
        if wake.get("type") != "wake":
            return  # a later version's event: ignore what you do not know
        token = PUSH_TOKENS.get(wake["device"])
        if token is not None:  # a device without a push token cannot be woken
            await push(token, wake["count"])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="amqp(s)://USER:PASSWORD@HOST/VHOST")
    parser.add_argument("--queue", default="relayd.wake", help="topology.wake_queue")
    args = parser.parse_args()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    async with await aio_pika.connect(args.url) as connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=32)
        queue = await channel.get_queue(args.queue, ensure=False)
        await queue.consume(on_wake)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
