"""A whole cluster on loopback: a real Redis, demo sink relays and N node processes.

`smtpfleet dev` runs one for people; the tests and the drills run the same thing, so what a
newcomer sees is what CI checks. Nodes are separate OS processes, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smtpfleet import http
from smtpfleet.lifecycle import PARENT_PID_ENV
from smtpfleet.testing.redis_server import RedisServer, free_port
from smtpfleet.testing.sink import Sink
from smtpfleet.testing.tls import TlsFiles, make_tls_files

READY_TIMEOUT_S = 30.0
# Ports are picked free and bound by the node a moment later: in between, the kernel may hand
# the same port to another process as the source port of an outgoing connection (both come
# from the ephemeral range). A node that lost its port that way starts again on new ones.
PORT_ATTEMPTS = 3
KEEP_WORKDIR_ENV = "SMTPFLEET_KEEP_WORKDIR"  # set: leave the logs, configs and Redis data


def deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class NodeProcess:
    """One `smtpfleet serve` child process."""

    index: int
    config_path: Path
    log_path: Path
    smtp_port: int
    http_port: int
    workers: int = 1  # > 1: `serve --workers`, worker processes behind a supervisor
    process: subprocess.Popen[bytes] | None = None
    # Elsewhere than loopback: the node's address, and a command it runs under that must exec
    # it (`ip netns exec NS`, for the network-fault tests: testing.netns_cluster).
    host: str = "127.0.0.1"
    argv_prefix: tuple[str, ...] = ()

    @property
    def smtp(self) -> tuple[str, int]:
        return (self.host, self.smtp_port)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [
                *self.argv_prefix,
                *(sys.executable, "-m", "smtpfleet", "serve", "--config", str(self.config_path)),
                *(("--workers", str(self.workers)) if self.workers > 1 else ()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # A node must not outlive the `dev` process or the test that started it.
            env={**os.environ, PARENT_PID_ENV: str(os.getpid())},
        )
        log.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(5.0)

    def wait(self, timeout_s: float) -> int | None:
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM (the node drains), then SIGKILL if it outlives the grace period."""
        self.signal(signal.SIGTERM)
        code = self.wait(grace_s)
        if code is None:
            self.kill()
        return code

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def _all_ready(self) -> bool:
        status, _ = await http.get("/readyz", port=self.http_port)
        return status == 200

    async def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Ready when the SMTP port greets with 220 (the node opens it only once Redis is ok)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"node {self.index} exited at start:\n{self.log_tail()}")
            # With workers, the first to listen greets; /readyz waits for all of them.
            if await _greets(self.smtp_port, self.host) and (
                self.workers == 1 or await self._all_ready()
            ):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"node {self.index} not ready in {timeout_s}s:\n{self.log_tail()}")


async def _greets(port: int, host: str = "127.0.0.1") -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        banner = await asyncio.wait_for(reader.readline(), 2.0)
        writer.write(b"QUIT\r\n")
        return banner.startswith(b"220")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class LocalCluster:
    """Redis + sinks + nodes on 127.0.0.1; an async context manager."""

    nodes: int = 3
    workers: int = 1  # worker processes per node (`serve --workers`)
    sinks: int = 2
    relays: Sequence[str] = ()  # HOST:PORT of real relays; when given, no sinks are started
    overrides: Mapping[str, Any] = field(default_factory=dict)
    node_overrides: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)  # by index (1..)
    appendfsync: str = "everysec"
    workdir: Path | None = None
    drain_grace_s: float = 10.0
    log_messages: bool = False  # the demo sinks log each message (`smtpfleet dev`)
    sink_keep: int | None = None  # messages each sink keeps (None: all, to reconcile them)
    # An existing Redis to use instead of starting one (with `redis.sentinels` in the overrides
    # the nodes use only its database number): the Sentinel drills bring their own set.
    redis_url: str | None = None
    redis: RedisServer | None = None
    tls: TlsFiles | None = None  # the nodes' throwaway certificate (STARTTLS), made by start()
    sink_servers: list[Sink] = field(default_factory=list)
    node_processes: list[NodeProcess] = field(default_factory=list)
    _own_workdir: bool = False  # made by start(); removed by stop() unless KEEP_WORKDIR_ENV

    async def __aenter__(self) -> LocalCluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self.workdir is None:
            # mkdtemp, not TemporaryDirectory: that one removes itself at exit or when
            # collected, whatever KEEP_WORKDIR_ENV says.
            self.workdir = Path(tempfile.mkdtemp(prefix="smtpfleet-"))
            self._own_workdir = True
        # A throwaway CA and certificate, so every node offers STARTTLS out of the box.
        self.tls = make_tls_files(self.workdir / "tls")
        if self.redis_url is None:
            self.redis = RedisServer(data_dir=self.workdir / "redis", appendfsync=self.appendfsync)
            self.redis.start()
            self.redis_url = self.redis.url
        if not self.relays:
            for i in range(self.sinks):
                # Advertising PIPELINING, as real relays do: deliveries take the path they
                # take in production (the envelope in one write, chained on busy sessions).
                sink = Sink(
                    name=f"relay-{i + 1}",
                    keep=self.sink_keep,
                    log_messages=self.log_messages,
                    pipelining=True,
                )
                await sink.start()
                self.sink_servers.append(sink)
        for i in range(self.nodes):
            self.node_processes.append(self._new_node(i + 1))
        for node in self.node_processes:
            node.start()
        await asyncio.gather(*(self._until_ready(i) for i in range(len(self.node_processes))))

    async def _until_ready(self, position: int) -> None:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            node = self.node_processes[position]
            try:
                await node.wait_ready()
                return
            except RuntimeError:
                if attempt == PORT_ATTEMPTS or "address already in use" not in node.log_tail():
                    raise
            self.node_processes[position] = self._new_node(node.index)
            self.node_processes[position].start()

    def relay_addresses(self) -> list[str]:
        return list(self.relays) or [s.address for s in self.sink_servers]

    def node_config(self, index: int, smtp_port: int, http_port: int) -> dict[str, Any]:
        assert self.redis_url is not None
        assert self.tls is not None
        # A mapping under `relays` in the overrides applies to every relay (e.g. a shared rate
        # limit for a drill); a list replaces them.
        overrides = dict(self.overrides)
        every_relay = (
            overrides.pop("relays") if isinstance(overrides.get("relays"), Mapping) else {}
        )
        relays = []
        for i, address in enumerate(self.relay_addresses()):
            host, _, port = address.rpartition(":")
            relay = {"name": f"relay-{i + 1}", "host": host.strip("[]"), "port": int(port)}
            relays.append({**relay, **every_relay})
        base: dict[str, Any] = {
            "node": {"id": f"node-{index}", "hostname": "localhost"},
            "inbound": {
                "listen": [f"127.0.0.1:{smtp_port}"],
                "relay_networks": ["127.0.0.0/8", "::1/128"],
                "tls": {"cert_file": str(self.tls.cert_file), "key_file": str(self.tls.key_file)},
            },
            "http": {"listen": f"127.0.0.1:{http_port}"},
            "redis": {"url": self.redis_url},
            "retry": {"initial_s": 5.0, "max_s": 60.0},
            "relays": relays,
        }
        base["node"]["drain_grace_s"] = self.drain_grace_s
        merged = deep_merge(base, overrides)
        return deep_merge(merged, self.node_overrides.get(index, {}))

    def _new_node(self, index: int) -> NodeProcess:
        assert self.workdir is not None
        smtp_port, http_port = free_port(), free_port()
        path = self.workdir / f"node-{index}.yaml"
        config = self.node_config(index, smtp_port, http_port)
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        log_path = self.workdir / f"node-{index}.log"
        return NodeProcess(index, path, log_path, smtp_port, http_port, self.workers)

    def info(self) -> dict[str, Any]:
        return {
            "smtp": [f"127.0.0.1:{n.smtp_port}" for n in self.node_processes],
            "pids": [n.pid for n in self.node_processes],
            "metrics": [f"http://127.0.0.1:{n.http_port}/metrics" for n in self.node_processes],
            "redis": self.redis_url,
            "relays": self.relay_addresses(),
            "tls_ca": str(self.tls.ca_file) if self.tls is not None else None,
            "logs": str(self.workdir),
        }

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(
                loop.run_in_executor(None, n.stop, self.drain_grace_s + 5)
                for n in self.node_processes
            )
        )
        for sink in self.sink_servers:
            await sink.stop()
        if self.redis is not None:
            self.redis.close()
        if self._own_workdir and self.workdir is not None and not os.environ.get(KEEP_WORKDIR_ENV):
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._own_workdir = False
