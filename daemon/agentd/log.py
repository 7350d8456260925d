"""structlog set-up: JSON lines off a TTY (journald), a readable console on one.

Every logger is bound to the component that owns it (`get_logger("bus")`) and, inside
plugins, to the plugin. Records from the standard library (aiohttp's included) go through
the same processors, so every line has the same shape and names its component.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# journald reads a leading "<N>" as the line's priority (SyslogLevelPrefix=yes).
_SYSLOG_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def get_logger(component: str, **context: Any) -> structlog.stdlib.BoundLogger:
    """A logger whose every line carries `component` and the given context."""
    # Initial values, not .bind(): a lazy logger made at import time must pick up the
    # configuration that configure_logging() installs later.
    logger: structlog.stdlib.BoundLogger = structlog.get_logger("agentd", component=component, **context)
    return logger


def _component_from_logger_name(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    record = event.get("_record")
    if "component" not in event and record is not None:
        event["component"] = record.name
    return event


class _JournaldFormatter(structlog.stdlib.ProcessorFormatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelname.lower(), 6)
        return f"<{priority}>{super().format(record)}"


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (stdout) in the chosen format.

    Args:
        level: the lowest level written (debug, info, warning, error).
        fmt: "json", "console", or "auto" (console when the stream is a TTY).
        stream: where lines go; stdout by default.
    """
    stream = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _component_from_logger_name,
    ]
    renderer: Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer()
        # Without frames' locals: they hold secrets (a request's bearer token, a task's
        # args, a plugin's settings) that have no place in a journal.
        shared.append(structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)))
    else:
        renderer = structlog.dev.ConsoleRenderer()
    # The list in place, not a new one: a logger cached on its first use keeps the list it
    # was made with, so a new list would leave it on the old configuration (and out of
    # structlog's capture_logs, which changes the configured list in place too).
    processors = structlog.get_config()["processors"]
    processors[:] = [
        structlog.stdlib.filter_by_level,
        *shared,
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ]
    structlog.configure(
        processors=processors,
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter_class = (
        _JournaldFormatter
        if as_json and os.environ.get("JOURNAL_STREAM")
        else structlog.stdlib.ProcessorFormatter
    )
    formatter = formatter_class(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
