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
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._lines.append(line)
            self.flush()
            return
        if not self._lines:
            loop.call_soon(self.flush)
        self._lines.append(line)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # made by createLock in __init__
            lines, self._lines = self._lines, []
            if lines and self.stream is not None:
                # Nowhere left to say it (stderr closed or a broken pipe): logging never
                # takes the node down.
                with contextlib.suppress(OSError, ValueError):
                    self.stream.write("".join(lines))
                    self.stream.flush()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


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
