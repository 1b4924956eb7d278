"""structlog set up for journald: JSON lines on stdout, or a console renderer on a terminal.

Nothing here logs identifiers: callers bind only stages, outcomes, reasons, timings and
keyed references (relayd.opaque.reference).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

from relayd.config import Logging

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _dumps(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


def setup(settings: Logging) -> None:
    console = settings.format == "console" or (settings.format == "auto" and sys.stdout.isatty())
    renderer: Any = (structlog.dev.ConsoleRenderer() if console
                     else structlog.processors.JSONRenderer(serializer=_dumps))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )


def get(name: str = "relayd") -> Any:
    return structlog.get_logger(name)
