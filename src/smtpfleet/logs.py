"""Logging: JSON lines by default when stderr is not a terminal, readable text when it is.

Events carry their fields as `extra={"event": "...", ...}`; the JSON formatter puts every
such field at the top level, so one SMTP transaction or delivery attempt is one line with
its queue id, relay and reply code. Never log message bodies or credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sys
import time
from typing import Any, TextIO

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _iso_utc(created: float) -> str:
    """ISO 8601 in UTC with milliseconds; time.strftime is several times cheaper than datetime."""
    micros = round(created * 1_000_000)  # as datetime rounds, so 1.001 stays .001
    return f"{_second(micros // 1_000_000)}.{micros // 1000 % 1000:03d}+00:00"


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    # Hundreds of records share each second under load.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


class TickHandler(logging.StreamHandler[TextIO]):
    """Records logged in one turn of the event loop leave in one write at its end, instead of
    a write (a system call) per line: two lines per message under load. Outside a running
    loop (start-up, threads, shutdown) each record is written at once. A crash loses at most
    the current turn's lines."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.emit_line(line)

    def emit_line(self, line: str) -> None:
        """A line formatted already, written as `emit` writes a record's."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._lines.append(line + self.terminator)
            self.flush()
            return
        if not self._lines:
            loop.call_soon(self.flush)
        self._lines.append(line + self.terminator)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # made by createLock in __init__
            lines, self._lines = self._lines, []
            if lines and self.stream is not None:
                # Nowhere left to say it (stderr closed or a broken pipe): logging never
                # takes the node down.
                with contextlib.suppress(OSError, ValueError):
                    self.stream.write("".join(lines))
                    self.stream.flush()


_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))  # built once, not per line


def _json_line(created: float, level: str, logger: str, msg: str, fields: dict[str, Any]) -> str:
    entry: dict[str, Any] = {"ts": _iso_utc(created), "level": level, "logger": logger, "msg": msg}
    for key, value in fields.items():
        # A field named like the line's own keys (`ts`, `level`, ...) does not replace them:
        # a log shipper must be able to trust when, how bad and from where.
        if key not in _STANDARD and key not in entry and not key.startswith("_"):
            entry[key] = value
    return _ENCODER.encode(entry)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = vars(record)
        if record.exc_info:
            fields = {**fields, "exc": self.formatException(record.exc_info)}
        return _json_line(
            record.created, record.levelname.lower(), record.name, record.getMessage(), fields
        )


def info_event(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """`logger.info(msg, extra=fields)`, for the lines logged per message (an accept, a
    delivery attempt). When the line would go only to the node's own JSON handler, it is
    written there as that handler would write it, without a LogRecord, the handler's lock and
    the formatter's walk over the record: about half the cost of a line, and two lines per
    message were 6-8 % of a node's CPU. Any other set-up (a handler or filter added, text
    lines, a test's capture) takes the logging path unchanged."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _json_handler_only(logger)
    if handler is None:
        logger.info(msg, extra=fields)
    else:
        handler.emit_line(_json_line(time.time(), "info", logger.name, msg, fields))


def _json_handler_only(logger: logging.Logger) -> TickHandler | None:
    """The handler a record of `logger` would reach, if it is the only one, ours, in JSON,
    and no filter on the way could drop or change the record."""
    found: logging.Handler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    if (
        type(found) is not TickHandler
        or type(found.formatter) is not JsonFormatter
        or found.filters
        or found.level > logging.INFO
    ):
        return None
    return found


def configure_logging(level: str, fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = TickHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if use_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    # Two records per message under load: skip what no formatter of ours prints (the
    # logging HOWTO's "Optimization" list). Source file and line would cost a stack walk each.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every connection and command at INFO; our handler logs what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
