"""structlog set up for journald: JSON lines on stdout, or a console renderer on a terminal.
On the journal, each line starts with its syslog priority ("<4>" for warning), which
journald files as the line's priority and strips.

No plaintext, key, user id or device id may reach a log line, and `redact` guarantees it
rather than trusting each call site: it runs last before rendering and lets through only
the values of the keys in SAFE_KEYS (stages, outcomes, reasons, timings, key ids,
exception types), integers under COUNT_KEYS and keyed references under REFERENCE_KEYS.
Any other value is replaced by a keyed hash reference (relayd.opaque.reference), so that
two lines about the same thing can still be matched without saying what it is. An event
name that is not a plain identifier is hashed too. Exceptions are rendered as their type
and frames, never their message (it may quote input).

The same holds at the root, for every library (asyncio, aiormq, aio-pika, uvloop): a
stdlib logging record keeps its message only when that message is provably a template,
a string literal of the source file that logged it; anything else, such as asyncio's
"Task exception was never retrieved" with the reprs it formats in, becomes a keyed
reference. The arguments are always dropped. The event loop's exception handler
(on_loop_exception) and Python warnings (setup) log types and frames only.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import io
import logging
import os
import re
import secrets
import sys
import traceback
import warnings
from collections.abc import MutableMapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import orjson
import structlog

from relayd.config import Logging
from relayd.opaque import reference

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

# Keys whose values never name a person or hold a secret: add one here only for such values.
SAFE_KEYS = frozenset({
    "event", "level", "timestamp", "logger", "template",  # the line itself
    "worker", "job", "stage", "type", "outcome", "reason", "latency_ms",  # what happened
    "signal", "code", "retry_in_s", "port", "via", "version",  # process
    "kid", "kids",  # relay key ids, public by design
    "config_key",  # dotted config keys and key file paths (ConfigError.problems), no values
    "error", "cause", "trace",  # exception types and frames (exception_summary)
})
# Keys whose values pass only as integers (counts), and only as keyed references.
COUNT_KEYS = frozenset({"abandoned", "workers", "count", "devices", "conversations", "closed",
                        "replay", "sent", "expired", "failed", "audit", "shards", "members",
                        "held", "waits", "receipts"})
REFERENCE_KEYS = frozenset({"user_ref"})  # relayd.opaque.reference() output
_REFERENCE = re.compile(r"[a-z2-7]{15}")
_IDENTIFIER = re.compile(r"[a-z][a-z0-9_]{0,63}")
_Scalar = (str, int, float, bool, type(None))

_reference_secret = secrets.token_bytes(32)
_SHOW_WARNING = warnings.showwarning  # what reset() puts back


def set_reference_secret(secret: bytes) -> None:
    """Key the references in log lines (the relay's opaque secret), so that every process
    of one relay names the same value the same way."""
    global _reference_secret
    _reference_secret = secret


def _safe(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return all(isinstance(v, _Scalar) for v in value)
    return isinstance(value, _Scalar)


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Keep the values of SAFE_KEYS; replace every other value by a keyed reference."""
    for key, value in event.items():
        if key == "event" and isinstance(value, str) and _IDENTIFIER.fullmatch(value):
            continue
        if key != "event" and key in SAFE_KEYS and _safe(value):
            continue
        if key in COUNT_KEYS and type(value) is int:
            continue
        if key in REFERENCE_KEYS and isinstance(value, str) and _REFERENCE.fullmatch(value):
            continue
        event[key] = "ref:" + reference(_reference_secret, "log", repr(value))
    return event


def _frame(frame: traceback.FrameSummary) -> str:
    path = Path(frame.filename)
    return f"{path.parent.name}/{path.name}:{frame.lineno} {frame.name}"


def exception_summary(_: Any, __: str, event: MutableMapping[str, Any]
                      ) -> MutableMapping[str, Any]:
    """Replace `exc_info` by the exception's type, its cause's type and its frames."""
    exc_info = event.pop("exc_info", None)
    if not exc_info:
        return event
    if isinstance(exc_info, BaseException):
        exc: BaseException | None = exc_info
    elif isinstance(exc_info, tuple):
        exc = exc_info[1]
    else:
        exc = sys.exc_info()[1]
    if exc is None:
        return event
    event["error"] = type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        event["cause"] = type(cause).__name__
    tb: TracebackType | None = exc.__traceback__
    event["trace"] = [_frame(f) for f in traceback.extract_tb(tb)][-8:]
    return event


@functools.lru_cache(maxsize=256)
def _literals(path: str) -> frozenset[str]:
    """Every string literal in the Python source at `path` (none if it cannot be read)."""
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    return frozenset(node.value for node in ast.walk(tree)
                     if isinstance(node, ast.Constant) and isinstance(node.value, str))


def _template(record: logging.LogRecord) -> str | None:
    """The record's message if it is a string literal of the code that logged it, so made
    of no input; else None."""
    msg = record.msg
    if isinstance(msg, str) and msg in _literals(record.pathname):
        return msg
    return None


_LOGGER_NAME = re.compile(r"[A-Za-z0-9_.]{1,100}")


class _LibraryRecords(logging.Handler):
    """Library (stdlib logging) records, as relayd lines: the logger's name, and the
    template when it provably is one (else its keyed reference); never the arguments."""

    def emit(self, record: logging.LogRecord) -> None:
        template = _template(record)
        fields: dict[str, Any] = {
            "logger": record.name if _LOGGER_NAME.fullmatch(record.name) else "other",
            # `message` is no SAFE_KEY: redact() turns it into a keyed reference
            **({"template": template} if template is not None else {"message": record.msg}),
        }
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        get("relayd.library").log(record.levelno, "library", **fields)


def on_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler: the exception's type and frames only, never
    the context's message or the reprs of its task, future or handle (they quote input)."""
    exc = context.get("exception")
    get("relayd.loop").error("loop_exception",
                             exc_info=exc if isinstance(exc, BaseException) else None)


def guard_loop() -> None:
    """Install on_loop_exception on the running loop (each process calls it first)."""
    asyncio.get_running_loop().set_exception_handler(on_loop_exception)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """warnings.showwarning: the category and where, never the text."""
    path = Path(filename)
    get("relayd.warnings").warning("python_warning", type=category.__name__,
                                   trace=[f"{path.parent.name}/{path.name}:{lineno}"])


def _dumps(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


# syslog priorities: journald files a stdout line that starts with "<N>" at priority N
# (the unit's SyslogLevelPrefix=, on by default), so `journalctl -p warning` works.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def to_journal(stream: TextIO) -> bool:
    """Whether `stream` is the journal: systemd names it in $JOURNAL_STREAM as
    device:inode, and passes that on to children that inherit it (our workers)."""
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{info.st_dev}:{info.st_ino}"


def _with_priority(render: Any) -> Any:
    """The renderer, with each line prefixed by its level as a syslog priority."""
    def prefixed(logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        priority = _PRIORITY.get(str(event.get("level")), 6)
        return f"<{priority}>{render(logger, name, event)}"
    return prefixed


def setup(settings: Logging, stream: TextIO | None = None) -> None:
    """Configure structlog, and route library records through it (WARNING and up)."""
    stream = stream or sys.stdout
    console = settings.format == "console" or (settings.format == "auto" and stream.isatty())
    renderer: Any = (structlog.dev.ConsoleRenderer() if console
                     else structlog.processors.JSONRenderer(serializer=_dumps))
    if to_journal(stream):
        renderer = _with_priority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            exception_summary,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.level]),
        # one write() per line, so that lines of several processes sharing stdout never mix
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LibraryRecords)]:
        root.removeHandler(handler)
    root.addHandler(_LibraryRecords())
    root.setLevel(max(logging.WARNING, _LEVELS[settings.level]))
    warnings.showwarning = _show_warning
    global _debugging
    _debugging = _LEVELS[settings.level] <= logging.DEBUG


def set_level(level: str) -> None:
    """Change the level at run time (on reload); loggers pick it up at their next call."""
    global _debugging
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]))
    _debugging = _LEVELS[level] <= logging.DEBUG


_debugging = True  # structlog's defaults, before setup(), log every level


def debugging() -> bool:
    """Whether debug lines are logged: a per-message line at debug level is skipped before
    structlog builds a logger for it (a few µs on every message otherwise)."""
    return _debugging


def reset() -> None:
    """Undo setup() and set_reference_secret() (for tests)."""
    global _debugging
    _debugging = True
    set_reference_secret(secrets.token_bytes(32))
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LibraryRecords)]:
        root.removeHandler(handler)
    warnings.showwarning = _SHOW_WARNING


def get(name: str = "relayd") -> Any:
    return structlog.get_logger(name)
