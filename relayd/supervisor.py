"""`relayd run`: a supervisor of worker processes, for systemd or a terminal.

It starts `workers.inbound` inbound and `workers.outbound` outbound workers,
`workers.edge` edge processes, and one gdpr and one retention worker when they are asked
for, each a `relayd worker` process (relayd/worker.py) tied to it by a socket pair. A
worker that exits is started again after an exponential backoff. The service is ready
(READY=1, /readyz) only while every worker reports that it consumes (an edge: that it
takes logins).

- SIGTERM/SIGINT: every worker is told to stop and drains; the supervisor exits 0 when
  all exited cleanly. A second signal kills them (SIGKILL) and exits 1.
- SIGHUP: the config and keys are checked, then every worker re-reads its keys and log
  level between two messages; a bad file changes nothing.
- Jobs run periodically inside the supervisor: the systemd watchdog, queue depths and
  message rates for /metrics and `relayd status` (relayd.observe). Add a Job to
  `Supervisor.jobs` for another periodic task (it must not block the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd import __version__, config, endpoints, keys, log, metrics
from relayd.errors import ConfigError, ExitCode
from relayd.observe import Observer
from relayd.sdnotify import Notifier, without_notify
from relayd.worker import Role

_log = log.get("relayd.supervisor")
RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 60.0  # a worker that ran this long restarts with the initial backoff again
KILL_GRACE_S = 5.0  # past workers.shutdown_timeout, a stopping worker is killed


@dataclass
class Job:
    """A periodic task of the supervisor; a failure is logged and the job runs again."""

    name: str
    every_s: float
    run: Callable[[], Awaitable[None]]


@dataclass
class Slot:
    """One worker process, and what it last reported."""

    role: Role
    index: int
    pid: int | None = None
    control: asyncio.StreamWriter | None = None
    state: str = "down"  # starting, then as reported: connecting, consuming, listening, running
    kid: str = ""
    port: int | None = None  # an edge's, as it reported it
    restarts: int = 0
    exit_code: int | None = None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def has_queue(self) -> bool:
        """Whether it consumes a queue (every role but retention): only those count
        towards readiness."""
        return self.role != "retention"

    @property
    def consuming(self) -> bool:
        """Doing its work: consuming its queue, or, for an edge, taking logins."""
        return self.state in ("consuming", "listening")

    def tell(self, command: str) -> None:
        if self.control is not None and not self.control.is_closing():
            self.control.write(command.encode() + b"\n")


def backoff(failures: int) -> float:
    """Seconds to wait before starting a worker that exited `failures` times in a row."""
    return float(min(RESTART_MAX_S, RESTART_INITIAL_S * 2 ** (failures - 1)))


def failures_after(failures: int, ran_s: float) -> int:
    """The exits in a row of a worker that exited again after running `ran_s` seconds:
    one that ran STABLE_S or longer starts counting again from one."""
    return 1 if ran_s >= STABLE_S else failures + 1


class Supervisor:
    """The worker processes of the given roles, their state, the endpoints and the jobs."""

    def __init__(self, settings: config.Settings, config_path: Path,
                 roles: list[Role], notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.keyring = keys.from_settings(settings.keys)
        self.notifier = notifier or Notifier()
        counts = {"inbound": settings.workers.inbound, "outbound": settings.workers.outbound,
                  "gdpr": 1, "edge": max(1, settings.workers.edge), "retention": 1}
        self.slots = [Slot(role, i) for role in roles for i in range(counts[role])]
        self.collector = metrics.SupervisorCollector()
        self.consumers = [slot for slot in self.slots if slot.has_queue]
        self.collector.configured = {s.role: counts[s.role] for s in self.consumers}
        self.stopping = asyncio.Event()
        self.forced = False
        self.announced = False
        self.started = time.time()
        self.observer: Observer | None = None
        self.jobs: list[Job] = []
        if self.notifier.watchdog_s:
            self.jobs.append(Job("watchdog", self.notifier.watchdog_s, self._watchdog))

    # --- running ---------------------------------------------------------------------------

    async def run(self) -> int:
        log.set_reference_secret(self.keyring.opaque_secret)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        server = None
        if self.settings.metrics.enabled:
            self.observer = observer = Observer(self.settings, self.collector)
            self.jobs += [Job("rates", 10.0, observer.sample_rates),
                          Job("queue_depths", 15.0, observer.sample_depths)]
            server = await endpoints.serve(
                self.settings.metrics.host, self.settings.metrics.port,
                observer.routes(lambda: self.ready, self.describe, self.snapshot))
            port = server.sockets[0].getsockname()[1]
            _log.info("metrics_listening", port=port)
        jobs = [asyncio.create_task(self._every(job)) for job in self.jobs]
        self.notifier.status(self.describe())
        try:
            await asyncio.gather(*(self._keep(slot) for slot in self.slots))
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            if server is not None:
                server.close()
                await server.wait_closed()
            if self.observer is not None:
                await self.observer.close()
        clean = not self.forced and all(s.exit_code in (None, 0) for s in self.slots)
        _log.info("stopped", code=0 if clean else 1)
        return ExitCode.OK if clean else ExitCode.FAILURE

    def _environment(self) -> dict[str, str]:
        env = without_notify(os.environ)
        if self.observer is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.observer.metrics_dir)
        return env

    async def _keep(self, slot: Slot) -> None:
        """Run the slot's worker until we stop, starting it again whenever it exits."""
        failures = 0
        while not self.stopping.is_set():
            began = time.monotonic()
            slot.exit_code = await self._run_worker(slot)
            if self.stopping.is_set():
                return
            failures = failures_after(failures, time.monotonic() - began)
            delay = backoff(failures)
            _log.warning("worker_exited", worker=slot.name, code=slot.exit_code,
                         retry_in_s=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if not self.stopping.is_set():
                slot.restarts += 1
                self.collector.restarts[slot.role] = (
                    self.collector.restarts.get(slot.role, 0) + 1)

    async def _run_worker(self, slot: Slot) -> int:
        """Start the slot's worker, follow its reports, and return its exit code."""
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relayd", "worker", "--role", slot.role,
                "--name", slot.name, "--config", str(self.config_path),
                "--control-fd", str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), env=self._environment())
        except OSError as exc:
            ours.close()
            _log.error("worker_spawn_failed", worker=slot.name, error=type(exc).__name__)
            return ExitCode.FAILURE
        finally:
            theirs.close()
        reader, slot.control = await asyncio.open_connection(sock=ours)
        slot.pid, slot.state = process.pid, "starting"
        if self.stopping.is_set():
            slot.tell("stop")
        try:
            async for line in reader:
                state, _, rest = line.decode(errors="replace").strip().partition(" ")
                kid, _, port = rest.partition(" ")
                slot.state, slot.kid = state, kid
                slot.port = int(port) if port.isdigit() else None
                self._changed()
        except (ConnectionError, ValueError):
            pass
        code = await process.wait()
        slot.control.close()
        slot.control, slot.pid, slot.state = None, None, "down"
        self._changed()
        if self.observer is not None:
            self.observer.forget(process.pid)
        return code

    async def _every(self, job: Job) -> None:
        while True:
            try:
                await job.run()
            except Exception as exc:  # a job's failure must not stop the supervisor
                _log.warning("job_failed", job=job.name, error=type(exc).__name__)
            await asyncio.sleep(job.every_s)

    # --- state ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self.stopping.is_set() and all(s.consuming for s in self.consumers)

    def describe(self) -> str:
        consuming = sum(s.consuming for s in self.consumers)
        text = (f"{consuming}/{len(self.consumers)} workers consuming, "
                f"key {self.keyring.current.kid}")
        return f"stopping: {text}" if self.stopping.is_set() else text

    def _changed(self) -> None:
        self.collector.ready = self.ready
        self.collector.consuming = {role: sum(s.consuming for s in self.consumers
                                              if s.role == role)
                                    for role in self.collector.configured}
        if self.ready and not self.announced:
            self.announced = True
            _log.info("ready", workers=len(self.slots), kid=self.keyring.current.kid,
                      version=__version__)
            self.notifier.ready(self.describe())
        else:
            self.notifier.status(self.describe())

    def snapshot(self) -> dict[str, Any]:
        """What `relayd status` shows: workers, keys, rates and queue depths."""
        ring = self.keyring
        source, _ = keys.location(self.settings.keys.dir)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "ready": self.ready,
            "stopping": self.stopping.is_set(),
            "uptime_s": round(time.time() - self.started, 1),
            "workers": [{"name": s.name, "role": s.role, "pid": s.pid, "state": s.state,
                         "restarts": s.restarts, "kid": s.kid}
                        | ({"port": s.port} if s.role == "edge" else {}) for s in self.slots],
            "keys": {"current": ring.current.kid, "kem": ring.current.kem.value,
                     "usable": sorted(ring.hpke),
                     "source": "credentials" if source != self.settings.keys.dir else "dir"},
            "rates": self.observer.rates.per_second() if self.observer else {},
            "queues": {q: {"messages": m, "consumers": c}
                       for q, (m, c) in self.collector.queues.items()},
        }

    # --- jobs ----------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        self.notifier.watchdog()

    # --- signals -------------------------------------------------------------------------

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stopping.is_set():
            _log.warning("forced_exit", signal=name)
            self.forced = True
            self.kill_all()
            return
        _log.info("stopping", signal=name)
        self.stopping.set()
        self.notifier.stopping(self.describe())
        self.collector.ready = False
        for slot in self.slots:
            slot.tell("stop")
        deadline = self.settings.workers.shutdown_timeout + KILL_GRACE_S
        asyncio.get_running_loop().call_later(deadline, self.kill_all)

    def kill_all(self) -> None:
        for slot in self.slots:
            if slot.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)

    def reload(self) -> None:
        """Check the config and keys, then have every worker reload them."""
        try:
            fresh = config.load(self.config_path)
            ring = keys.from_settings(fresh.keys)
        except ConfigError as exc:
            _log.error("reload_failed", error=type(exc).__name__,
                       config_key=sorted(exc.problems))
            return
        if fresh.model_dump(exclude={"logging"}) != self.settings.model_dump(
                exclude={"logging"}):
            _log.warning("reload_needs_restart", reason="only keys and logging.level reload")
        log.set_level(fresh.logging.level)
        self.keyring = ring
        _log.info("reloading", kid=ring.current.kid, kids=sorted(ring.hpke))
        for slot in self.slots:
            slot.tell("reload")
        self.notifier.status(self.describe())
