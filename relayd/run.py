"""`relayd run`: the workers of the chosen roles, and the retention job, until SIGTERM or
SIGINT. Run the retention job in one process only.

A first signal stops consuming and drains in-flight messages up to
`workers.shutdown_timeout`; a second one forces the exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import timedelta

from relayd import keys as relay_keys
from relayd import log, retention, worker
from relayd.config import Settings
from relayd.errors import ExitCode
from relayd.store import open_store

_log = log.get("relayd.run")


async def run(settings: Settings, roles: list[worker.Role], with_retention: bool = False) -> int:
    keyring = relay_keys.load(settings.keys.dir,
                              timedelta(days=settings.keys.grace_period_days))
    store = open_store(settings.store.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            _log.warning("forced_exit", signal=signal.Signals(signum).name)
            os._exit(ExitCode.FAILURE)
        _log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    ready = [asyncio.Event() for _ in roles]
    tasks = [asyncio.create_task(worker.serve(settings, role, store, keyring, stop, event))
             for role, event in zip(roles, ready, strict=True)]
    if with_retention:
        tasks.append(asyncio.create_task(retention.serve(settings, store, keyring, stop)))
    try:
        await asyncio.gather(*tasks)
    finally:
        await store.close()
    _log.info("stopped")
    return ExitCode.OK
