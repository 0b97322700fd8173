"""structlog set-up: one JSON object per line on stdout (or console rendering for humans).

Logging never blocks the event loop: records go to stdout through a non-blocking writer. When
nobody reads stdout fast enough, what the pipe cannot take waits in a bounded buffer; when that
is full, new records are dropped whole and counted (`log_records_dropped`), never cut.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, cast

import structlog

from proxy.calllog import JsonCallLog
from proxy.linewriter import NonBlockingLineWriter


class _LineLogger:
    """What structlog's logger factory hands out: every level writes one line."""

    def __init__(self, writer: NonBlockingLineWriter, name: str = "") -> None:
        self.name = name
        self.msg = self.log = self.debug = self.info = self.warn = self.warning = \
            self.error = self.err = self.critical = self.fatal = self.failure = \
            self.exception = writer.write_line


_writer: NonBlockingLineWriter | None = None
_setup: tuple[str, str, dict[str, str]] | None = None  # (format, level, levels) configured
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "exception": logging.ERROR,
           "critical": logging.CRITICAL, "fatal": logging.CRITICAL, "msg": logging.INFO}


def flush() -> bool:
    """Retry log output that stdout could not take yet; True when nothing waits."""
    return True if _writer is None else _writer.flush()


def records_dropped() -> int:
    """Log records dropped in this process because stdout was not read fast enough."""
    return 0 if _writer is None else _writer.dropped


def _level_number(level: str) -> int:
    return getattr(logging, level.upper(), logging.INFO)


def logger_level(name: str, level: str, levels: dict[str, str]) -> int:
    """The lowest level logged for logger `name`: its own entry, its closest parent's
    (`sip700.calls` inherits from `sip700`), else the global level."""
    while True:
        if name in levels:
            return _level_number(levels[name])
        if "." not in name:
            return _level_number(level)
        name = name.rsplit(".", 1)[0]


def resolve_format(fmt: str, stream: object | None = None) -> tuple[str, bool]:
    """(json or console, colours?) for `fmt`: auto means console on a terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        tty = bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        tty = False
    if fmt == "auto":
        fmt = "console" if tty else "json"
    return fmt, tty


def configure_logging(level: str = "info", fmt: str = "json",
                      levels: dict[str, str] | None = None) -> None:
    """Configure structlog once for the process; cheap loggers, filtered by level up front.

    `fmt`: json, console (coloured when stdout is a terminal) or auto (console on a
    terminal, json otherwise). `levels`: a level per logger name (`sip700.calls: warning`),
    its children included; loggers are filtered up front at the lowest of all levels, then
    per name.
    """
    global _writer, _setup
    fmt, tty = resolve_format(fmt)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=tty)
    )
    levels = dict(levels or {})
    processors: list[structlog.typing.Processor] = []
    if levels:
        cache: dict[str, int] = {}

        def by_logger(logger: object, method: str, event: dict) -> dict:
            name = getattr(logger, "name", "")
            floor = cache.get(name)
            if floor is None:
                floor = cache[name] = logger_level(name, level, levels)
            if _LEVELS.get(method, logging.INFO) < floor:
                raise structlog.DropEvent
            return event

        processors.append(by_logger)
    processors += [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":  # the console renderer formats tracebacks itself
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    if _writer is None:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stdout.flush()  # anything printed before goes out first
        _writer = NonBlockingLineWriter(sys.stdout.fileno())
        os.register_at_fork(after_in_child=_writer.forget_pending)
    writer = _writer
    loggers: dict[str, _LineLogger] = {}

    def factory(*args: object) -> _LineLogger:
        name = str(args[0]) if args else ""
        logger = loggers.get(name)
        if logger is None:
            logger = loggers[name] = _LineLogger(writer, name)
        return logger

    _setup = (fmt, level, levels)
    lowest = min([_level_number(level), *(_level_number(v) for v in levels.values())])
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lowest),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def _drop(event: str, **fields: Any) -> None:
    return None


def info_logger(name: str) -> Callable[..., None]:
    """`structlog.get_logger(name).info`, for a logger on the per-message path (the call log).

    With JSON output, the same line is rendered here directly, with the keys in structlog's
    order (the fields, then event, level, timestamp), in less than half of structlog's time
    (4.2 against 9.2 µs a call line, writer included), which its processor chain spends. A
    logger whose level drops info lines gets a function that does nothing; the console format
    goes through structlog.
    """
    if _setup is None or _setup[0] != "json" or _writer is None:
        return cast("Callable[..., None]", structlog.get_logger(name).info)
    _, level, levels = _setup
    if logger_level(name, level, levels) > logging.INFO:
        return _drop
    # compiled with the core; the line rendered once the loop pass's sends are out
    return JsonCallLog(_writer.write_line, _encode, write_later=_writer.write_later)


# structlog's JSONRenderer: json.dumps's defaults, what JSON cannot hold written as its repr.
# The C encoder made once: JSONEncoder.encode makes a new one for every line.
_ENCODER = json.JSONEncoder(default=repr)
_C_ENCODER = json.encoder.c_make_encoder and json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None, repr, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)


def _encode(fields: dict[str, Any]) -> str:
    if _C_ENCODER is None:
        return _ENCODER.encode(fields)
    return "".join(_C_ENCODER(fields, 0))
