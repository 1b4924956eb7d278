"""`relayd status`: one screen about a running relay, for a person at a terminal.

Workers, rates and the keys in use come from the supervisor's /status endpoint (on
metrics.host:metrics.port); queue depths from the broker itself (passive declares), so
they show even when relayd is down.
"""

from __future__ import annotations

import contextlib
import urllib.request
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection

from relayd import __version__, amqp, keys
from relayd.config import Settings
from relayd.errors import BrokerRefusedError, ConfigError

QUEUES = ("inbound", "outbound", "dead")


def queue_names(settings: Settings) -> dict[str, str]:
    t = settings.topology
    return {"inbound": t.inbound_queue, "outbound": t.outbound_queue, "dead": t.dead_queue}


class QueueDepths:
    """Messages and consumers of the inbound, outbound and dead queues, on one connection,
    opened again when the broker has closed it (the supervisor samples every 15 s for as
    long as it runs, through broker restarts and `close_all_connections`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection: AbstractConnection | None = None

    async def sample(self) -> dict[str, tuple[int, int]]:
        if self.connection is None:
            connection = await amqp.connect(self.settings, "relayd-status")
            # aio-pika's is_closed stays False when the broker closes the connection:
            # only this callback says it is gone.
            connection.close_callbacks.add(lambda *_, c=connection: self._forget(c))
            self.connection = connection
        depths = {}
        try:
            async with self.connection.channel() as channel:  # a missing queue closes it
                for role, name in queue_names(self.settings).items():
                    declared = await channel.declare_queue(name, passive=True)
                    result = declared.declaration_result
                    depths[role] = (int(result.message_count or 0),
                                    int(result.consumer_count or 0))
        except aio_pika.exceptions.ChannelClosed:
            raise  # the broker closed the channel, over a missing queue: the link is fine
        except Exception:
            await self.close()  # whatever broke, the next sample starts on a new link
            raise
        return depths

    def _forget(self, connection: AbstractConnection) -> None:
        if self.connection is connection:
            self.connection = None

    async def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # closing a dead link may fail as it likes
                await connection.close()


def supervisor_url(settings: Settings) -> str:
    host = settings.metrics.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.metrics.port}/status"


def from_supervisor(settings: Settings, timeout: float = 3.0) -> dict[str, Any] | None:
    """The running supervisor's /status, or None when it does not answer."""
    if not settings.metrics.enabled:
        return None
    try:
        with urllib.request.urlopen(supervisor_url(settings), timeout=timeout) as answer:  # noqa: S310 - http:// built above
            data: dict[str, Any] = orjson.loads(answer.read())
            return data
    except (OSError, ValueError):
        return None


async def gather(settings: Settings) -> dict[str, Any]:
    """Everything `relayd status` shows, as data."""
    report: dict[str, Any] = {"version": __version__, "supervisor": from_supervisor(settings)}
    depths = QueueDepths(settings)
    try:
        report["queues"] = {q: {"messages": m, "consumers": c}
                            for q, (m, c) in (await depths.sample()).items()}
    except BrokerRefusedError:
        raise  # not a broker that is down: the config must change (exit 78, with the fix)
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        report["queues"] = {"error": type(exc).__name__}
    finally:
        await depths.close()
    if report["supervisor"] is None:
        try:
            ring = keys.from_settings(settings.keys)
            report["keys"] = {"current": ring.current.kid, "kem": ring.current.kem.value,
                              "usable": sorted(ring.hpke)}
        except ConfigError as exc:
            report["keys"] = {"error": "; ".join(exc.problems.values())}
    else:
        report["keys"] = report["supervisor"]["keys"]
    return report


def render(report: dict[str, Any]) -> str:
    """The report as a screen of text."""
    lines = []
    sup = report["supervisor"]
    if sup is None:
        lines.append(f"relayd {report['version']}: not running (no answer from the "
                     "supervisor's /status)")
    else:
        state = "ready" if sup["ready"] else ("stopping" if sup["stopping"] else "NOT READY")
        lines.append(f"relayd {sup['version']}: {state}, supervisor pid {sup['pid']}, "
                     f"up {_duration(sup['uptime_s'])}")
        if sup["version"] != report["version"]:
            lines.append(f"  (installed: {report['version']}; restart relayd to run it)")
        lines.append("")
        lines.append(f"  {'WORKER':<12}{'PID':>8}  {'STATE':<10}{'RESTARTS':>9}  KID")
        lines += [f"  {w['name']:<12}{w['pid'] or '-':>8}  {w['state']:<10}"
                  f"{w['restarts']:>9}  {w['kid'] or '-'}"
                  + (f"  port {w['port']}" if w.get("port") else "") for w in sup["workers"]]
    lines.append("")
    queues = report["queues"]
    if "error" in queues:
        lines.append(f"queues: broker unreachable ({queues['error']})")
    else:
        lines.append("queues: " + "   ".join(
            f"{q} {queues[q]['messages']} ({queues[q]['consumers']} consumers)" for q in QUEUES))
    if sup is not None:
        rates = sup["rates"]
        lines.append("rates (last minute, per second):" if rates else
                     "rates: not enough samples yet")
        for stage, by_outcome in sorted(rates.items()):
            lines.append(f"  {stage:<10}" + "  ".join(
                f"{outcome} {rate:g}" for outcome, rate in sorted(by_outcome.items())))
    k = report["keys"]
    if "error" in k:
        lines.append(f"keys: unreadable here ({k['error']})")
    else:
        others = [kid for kid in k["usable"] if kid != k["current"]]
        lines.append(f"keys: current {k['current']} ({k['kem']})"
                     + (f", still opening {', '.join(others)}" if others else ""))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"
