"""structlog set-up: JSON lines in production, a readable console on a terminal."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import TextIO, cast

import structlog


class LossyStream:
    """stderr that never raises. When whatever reads the log has gone (a closed pipe, a full
    disk), lines are lost, but the proxy goes on serving calls, and a SIGTERM still stops it:
    a log call that raises would abort whatever was logging, signal handlers included."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.lost = 0  # lines that could not be written

    def write(self, text: str) -> None:
        try:
            self._stream.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed
            self.lost += 1

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    processors: list[structlog.types.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "console":
        processors.append(structlog.dev.ConsoleRenderer())
    else:  # a traceback as JSON: JSONRenderer alone would write only "exc_info": true
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, LossyStream(sys.stderr))),
        cache_logger_on_first_use=True,
    )
