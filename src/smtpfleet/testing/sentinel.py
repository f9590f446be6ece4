"""A Sentinel set on loopback: a primary, its replicas and three Sentinels, all real processes.

The same server binary runs every role (`valkey-server` and `redis-server` both take
`--sentinel`). Timings are short so a failover takes a second or two, not the production
default of 30 s: `down-after-milliseconds` 1000, `failover-timeout` 5000.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from smtpfleet.testing.launched import Launched
from smtpfleet.testing.redis_server import (
    LOOPBACK,
    POLL_INTERVAL_S,
    RedisServer,
    find_server_binary,
    free_port,
)

MASTER_NAME = "smtpfleet"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
START_TIMEOUT_S = 30.0  # discovery takes a few hello rounds; more on a loaded machine


class SentinelProcess:
    """One Sentinel: a server binary in Sentinel mode with its own (rewritable) config file."""

    def __init__(self, binary: Path, workdir: Path, master_port: int, quorum: int) -> None:
        self.port = free_port()
        self.binary = binary
        self.config_path = workdir / f"sentinel-{self.port}.conf"
        self.log_path = workdir / f"sentinel-{self.port}.log"
        self.config_path.write_text(
            f"port {self.port}\n"
            f"bind {LOOPBACK}\n"
            f"logfile {self.log_path}\n"
            f"dir {workdir}\n"
            f"sentinel monitor {MASTER_NAME} {LOOPBACK} {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> None:
        self._process = subprocess.Popen(  # noqa: S603 - a server binary we located ourselves
            [str(self.binary), str(self.config_path), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def command(self, *args: Any) -> Any:
        with redis.Redis(LOOPBACK, self.port, socket_timeout=1.0, decode_responses=True) as client:
            return client.execute_command(*args)

    def serving(self) -> bool:
        with contextlib.suppress(redis.RedisError):
            return bool(self.command("PING"))
        return False

    def stop(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class SentinelSet(Launched):
    """A primary, `replicas` replicas and `sentinels` Sentinels (quorum: a majority)."""

    def __init__(self, *, replicas: int = 2, sentinels: int = 3, appendfsync: str = "always"):
        self.workdir = Path(tempfile.mkdtemp(prefix="smtpfleet-sentinel-"))
        self.binary = find_server_binary()
        self.primary = RedisServer(data_dir=self.workdir / "primary", appendfsync=appendfsync)
        self.replicas: list[RedisServer] = []
        self._replica_count = replicas
        self._appendfsync = appendfsync
        self._sentinel_count = sentinels
        self.sentinels: list[SentinelProcess] = []

    @property
    def sentinel_addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    @property
    def servers(self) -> list[RedisServer]:
        return [self.primary, *self.replicas]

    def start(self) -> None:
        self.primary.start()
        for i in range(self._replica_count):
            replica = RedisServer(
                data_dir=self.workdir / f"replica-{i}",
                appendfsync=self._appendfsync,
                extra_args=["--replicaof", LOOPBACK, str(self.primary.port)],
            )
            replica.start()
            self.replicas.append(replica)
        self._wait(self._replicas_synced, "replicas to sync")
        quorum = self._sentinel_count // 2 + 1
        for _ in range(self._sentinel_count):
            sentinel = SentinelProcess(self.binary, self.workdir, self.primary.port, quorum)
            sentinel.start()
            self.sentinels.append(sentinel)
        self._wait(lambda: all(s.serving() for s in self.sentinels), "sentinels to start")
        self._wait(self._sentinels_know_everyone, "sentinels to discover each other")

    def master_port(self) -> int | None:
        """The primary's port as the first answering Sentinel sees it."""
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError):
                reply = sentinel.command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
                if reply:
                    return int(reply[1])
        return None

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def failover(self, timeout_s: float = 20.0) -> int:
        """`SENTINEL FAILOVER` (a forced, coordinated switch); the new primary's port."""
        old = self.master_port()
        self.sentinels[0].command("SENTINEL", "FAILOVER", MASTER_NAME)
        self._wait(lambda: self.master_port() not in (None, old), "the failover", timeout_s)
        new = self.master_port()
        assert new is not None
        return new

    def kill_primary(self, timeout_s: float = 20.0) -> int:
        """SIGKILL the current primary; wait until the Sentinels promote a replica."""
        old = self.master_port()
        assert old is not None
        self.server_on(old).kill()
        self._wait(lambda: self.master_port() not in (None, old), "a promotion", timeout_s)
        new = self.master_port()
        assert new is not None
        return new

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of every Sentinel's log: why a failover took the turn it took."""
        parts = []
        for sentinel in self.sentinels:
            text = (
                sentinel.log_path.read_text(errors="replace") if sentinel.log_path.exists() else ""
            )
            parts.append(f"--- sentinel {sentinel.port}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- waiting -------------------------------------------------------------------------

    def _replicas_synced(self) -> bool:
        with redis.Redis(LOOPBACK, self.primary.port, socket_timeout=1.0) as client:
            info = client.info("replication")
        online = [k for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        synced = sum(info[k].get("state") == "online" for k in online)
        return bool(synced >= self._replica_count)

    def _sentinels_know_everyone(self) -> bool:
        for sentinel in self.sentinels:
            try:
                master = sentinel.command("SENTINEL", "MASTER", MASTER_NAME)
            except redis.RedisError:
                return False
            fields: dict[str, Any] = master  # redis-py parses this reply into a dict
            if int(fields["num-slaves"]) < self._replica_count:
                return False
            if int(fields["num-other-sentinels"]) < self._sentinel_count - 1:
                return False
        return True

    @staticmethod
    def _wait(ready: Callable[[], bool], what: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinel set: timed out waiting for {what}")
            time.sleep(POLL_INTERVAL_S * 5)
