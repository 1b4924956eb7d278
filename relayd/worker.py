"""`relayd worker`: one worker process of one role, as `relayd run` starts it.

Roles: inbound, outbound and gdpr consume their queue (serve(): connect, declare, consume
through relayd.consume, or the shards through relayd.route); edge serves device apps
over WebSocket (relayd.edge.server; `relayd edge` is this role without a supervisor);
retention runs the retention job (relayd/retention.py), in this one process only. It
consumes nothing, so the service's readiness does not wait for it.

It talks to its supervisor over a socket pair (fd `--control-fd`), one line at a time:
it reports `consuming <kid>` or `connecting <kid>` (`running <kid>` for retention,
`listening <kid> <port>` for an edge that takes logins) whenever that changes, and obeys
`stop` (drain, then exit 0) and `reload` (re-read the keys and the log level). When the
supervisor goes away (end of file), it stops as if told to. SIGTERM and SIGINT stop it
too, and a second signal forces the exit; SIGHUP reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal

from aio_pika.abc import AbstractChannel, AbstractConnection

from relayd import amqp, config, keys, log, retention, shard, topology
from relayd.config import Settings
from relayd.consume import Consumer, Handler, hold_limit, window
from relayd.edge.server import serve_edge
from relayd.errors import ConfigError, ExitCode
from relayd.identity import Identity
from relayd.inbound import Inbound
from relayd.keys import KeySource
from relayd.observe import watch_lag
from relayd.outbound import Outbound
from relayd.receipts import Receipts
from relayd.route import Shards, route
from relayd.store import Store, open_store
from relayd.wake import Waker

_log = log.get("relayd.worker")
QueueRole = Literal["inbound", "outbound", "gdpr"]
Role = QueueRole | Literal["edge", "retention"]
SWITCH_INTERVAL_S = 0.0005
ROLES: tuple[Role, ...] = ("inbound", "outbound", "gdpr", "edge", "retention")


class ReportingEvent(asyncio.Event):
    """An Event that calls `report(is_set)` whenever it changes."""

    def __init__(self, report: Callable[[bool], None]) -> None:
        super().__init__()
        self._report = report

    def set(self) -> None:
        if not self.is_set():
            super().set()
            self._report(True)

    def clear(self) -> None:
        if self.is_set():
            super().clear()
            self._report(False)


async def work(settings: config.Settings, config_path: Path, role: Role,
               control_fd: int | None = None, name: str | None = None) -> int:
    if role == "edge":
        config.require_edge(settings)
    # The SQLite store's commit thread gives up the GIL at each statement and waits for
    # it back; at the default 5 ms the busy event loop keeps it that long each time,
    # holding the cross-process write lock (relayd.store.sqlite) meanwhile.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    keyring = keys.from_settings(settings.keys)
    log.set_reference_secret(keyring.opaque_secret)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    writer: asyncio.StreamWriter | None = None
    port = 0  # the edge's, once it listens

    def report(consuming: bool) -> None:
        if writer is not None and not writer.is_closing():
            if role == "retention":
                line = f"running {keyring.current.kid}"
            elif role == "edge":  # consuming: the edge takes logins (it reached the broker)
                line = f"{'listening' if consuming else 'connecting'} {keyring.current.kid} {port}"
            else:
                line = f"{'consuming' if consuming else 'connecting'} {keyring.current.kid}"
            writer.write(f"{line}\n".encode())

    def listening(at: int) -> None:
        nonlocal port
        port = at
        report(consuming.is_set())

    consuming = ReportingEvent(report)

    def reload() -> None:
        nonlocal keyring
        try:
            fresh = config.load(config_path)
            keyring = keys.from_settings(fresh.keys)
        except ConfigError as exc:
            _log.error("reload_failed", error=type(exc).__name__,
                       config_key=sorted(exc.problems))
            return
        log.set_level(fresh.logging.level)
        _log.info("reloaded", kid=keyring.current.kid, kids=sorted(keyring.hpke))
        report(consuming.is_set())

    signalled = asyncio.Event()  # apart from `stop`: a supervisor's stop is not a signal

    def on_signal(signum: int) -> None:
        if signalled.is_set():
            _log.warning("forced_exit", signal=signal.Signals(signum).name)
            os._exit(ExitCode.FAILURE)
        _log.info("stopping", signal=signal.Signals(signum).name)
        signalled.set()
        stop.set()

    async def obey(reader: asyncio.StreamReader) -> None:
        async for line in reader:
            if line.strip() == b"stop":
                stop.set()
            elif line.strip() == b"reload":
                reload()
        stop.set()  # the supervisor is gone

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, reload)
    listener = None
    if control_fd is not None:
        reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=control_fd))
        listener = asyncio.create_task(obey(reader))
    store = await open_store(settings.store.url, secret=keyring.opaque_secret,
                             key_vault=settings.store.key_vault, settings=settings,
                             pool_size=settings.store.pool_size)
    try:
        if role == "retention":
            report(False)
            await retention.serve(settings, store, keyring, stop)
        elif role == "edge":
            lag = asyncio.create_task(watch_lag(role))
            try:  # several processes share the port: the kernel spreads the connections
                await serve_edge(settings, store, lambda: keyring, stop, consuming, listening,
                                 reuse_port=settings.workers.edge > 1)
            finally:
                lag.cancel()
        else:
            # Under a supervisor, the name outlives a restart: a restarted worker takes its
            # shards back at once instead of waiting for its old self to be forgotten.
            member = (f"{socket.gethostname()}:{os.getppid()}:{name}"
                      if name and control_fd is not None else None)
            await serve(settings, role, store, lambda: keyring, stop, consuming, member)
    finally:
        await store.close()
        if listener is not None:
            listener.cancel()
    _log.info("stopped")
    return ExitCode.OK


async def serve(settings: Settings, role: QueueRole, store: Store,
                keys: KeySource, stop: asyncio.Event,
                consuming: asyncio.Event | None = None, member: str | None = None) -> None:
    """Consume `role`'s queue until `stop` is set, reconnecting whenever the link is lost.

    `keys` returns the current keys, read at each message (so a reload applies).
    `member` names this process among those sharing the shards (relayd.shard.share); it
    must differ from every other process's, and should outlive a restart.
    """
    member = member or f"{socket.gethostname()}:{os.getpid()}:{role}:{secrets.token_hex(4)}"

    async def session(connection: AbstractConnection, lost: asyncio.Event) -> None:
        await _consume(connection, settings, role, store, keys, stop, lost, consuming, member)

    await amqp.keep_connected(settings, f"relayd-{role}", role, stop, session,
                              consuming.clear if consuming is not None else None)


async def _consume(connection: AbstractConnection, settings: Settings, role: QueueRole,
                   store: Store, keys: KeySource, stop: asyncio.Event,
                   lost: asyncio.Event, consuming: asyncio.Event | None, member: str) -> None:
    channel = await amqp.open_channel(connection, window(settings.workers))
    await topology.declare(channel, topology.core(settings.topology,
                                                  settings.gdpr.identity_user is not None,
                                                  settings.wake.enabled))
    # The broker may close a publisher's channel (see amqp.Publisher): publish on one no
    # consumer uses. Sharded, this one is such: each shard has a channel of its own.
    publishing = (channel if shard.sharded(settings.topology, role)
                  else await amqp.open_channel(connection))
    waker = Waker(settings, connection) if settings.wake.enabled else None
    if waker is not None:
        await waker.open()
    sink = amqp.Publisher(publishing, settings, keys().opaque_secret, waker)
    handler: Handler = (Identity(settings, store, keys, sink) if role == "gdpr"
                        else (Inbound if role == "inbound" else Outbound)(
                            settings, store, keys, sink))

    def consumer_of(queue: str) -> Consumer:
        return Consumer(role, settings.workers, handler, sink, queue, hold_limit(settings))

    async with _receipts(connection, settings, role, store, keys, sink, lost):
        await _run(connection, settings, role, keys, stop, lost, consuming, member, channel,
                   store, consumer_of)
    if waker is not None:
        await waker.close()


@contextlib.asynccontextmanager
async def _receipts(connection: AbstractConnection, settings: Settings, role: QueueRole,
                    store: Store, keys: KeySource, sink: amqp.Publisher,
                    lost: asyncio.Event) -> AsyncIterator[None]:
    """For the outbound role: relayd.receipts too, on a channel of its own, with the same
    publisher (both tell businesses); any number of processes may consume it. Its
    channel closed by the broker counts as the connection lost, as the main one's."""
    if role != "outbound":
        yield
        return
    channel = await amqp.open_channel(connection, settings.workers.prefetch)
    channel.close_callbacks.add(lambda *_: lost.set())
    consumer = Consumer("receipts", settings.workers, Receipts(settings, store, keys, sink),
                        sink, settings.topology.receipts_queue)
    subscription = await amqp.consume(channel, consumer.queue, consumer.accept)
    try:
        yield
    finally:
        if lost.is_set():  # its deliveries died with the channel: the broker resends them
            await consumer.drain(0)
        else:
            with contextlib.suppress(*amqp.CONNECT_ERRORS, RuntimeError):
                await subscription.cancel()
            await consumer.drain(settings.workers.shutdown_timeout)
            await subscription.flushed(settings.workers.shutdown_timeout)


async def _run(connection: AbstractConnection, settings: Settings, role: QueueRole,
               keys: KeySource, stop: asyncio.Event, lost: asyncio.Event,
               consuming: asyncio.Event | None, member: str, channel: AbstractChannel,
               store: Store, consumer_of: Callable[[str], Consumer]) -> None:
    if shard.sharded(settings.topology, role):
        shards = Shards(connection, settings, role, store, member, consumer_of, lost)
        router = asyncio.create_task(route(connection, settings, role, keys, stop, lost))
        await shards.share()
        _log.info("consuming", stage=role, shards=len(shards.held))
        if consuming is not None:
            consuming.set()
        lag = asyncio.create_task(watch_lag(role))
        try:
            while not (stop.is_set() or lost.is_set()):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(amqp.wait_any(stop, lost), shards.every_s)
                if not (stop.is_set() or lost.is_set()):
                    await shards.share()
        finally:
            lag.cancel()
        await router
        await shards.hand_back(lost.is_set())
        return
    consumer = consumer_of(shard.entry_queue(settings.topology, role))
    # A channel the broker closes (a consumer_timeout after a long alarm, say) delivers
    # nothing more: start again on a new connection rather than wait on it forever.
    channel.close_callbacks.add(lambda *_: lost.set())
    subscription = await amqp.consume(channel, consumer.queue, consumer.accept)
    _log.info("consuming", stage=role)
    if consuming is not None:
        consuming.set()
    lag = asyncio.create_task(watch_lag(role))
    try:
        await amqp.wait_any(stop, lost)
    finally:
        lag.cancel()
    if lost.is_set():  # its deliveries died with the channel: the broker resends them
        await consumer.drain(0)
    else:
        with contextlib.suppress(*amqp.CONNECT_ERRORS):
            await subscription.cancel()
        abandoned = await consumer.drain(settings.workers.shutdown_timeout)
        await subscription.flushed(settings.workers.shutdown_timeout)
        _log.info("drained", stage=role, abandoned=abandoned)
