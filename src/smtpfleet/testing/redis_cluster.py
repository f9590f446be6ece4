"""A Redis Cluster on loopback: primaries and their replicas, all real server processes.

The nodes are `RedisServer`s started with `--cluster-enabled yes`; `valkey-cli --cluster
create` (or `redis-cli`) joins them and hands out the 16384 slots. Ports stay at or below
55535 because each node's cluster bus listens on port + 10000. `cluster-node-timeout` is short
(1 s) so a killed primary's replica takes over within a few seconds, not the default 15 s.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from smtpfleet.testing.launched import Launched
from smtpfleet.testing.redis_server import (
    LOOPBACK,
    POLL_INTERVAL_S,
    PORT_ATTEMPTS,
    RedisServer,
    find_server_binary,
)
from smtpfleet.testing.tools import unavailable

MAX_PORT = 55535  # the cluster bus is port + 10000
NODE_TIMEOUT_MS = 1000
START_TIMEOUT_S = 30.0


def cluster_port() -> int:
    """A free port whose bus port (port + 10000) is free too, both at most 65535."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port > MAX_PORT:
            port = 20000 + port % (MAX_PORT - 20000)
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) on loopback")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def find_cli_binary(server: Path | None = None) -> Path:
    """valkey-cli / redis-cli beside the server binary, else on PATH."""
    server = server or find_server_binary()
    for name in ("valkey-cli", "redis-cli"):
        beside = server.parent / name
        if beside.exists():
            return beside
        found = shutil.which(name)
        if found:
            return Path(found)
    raise RuntimeError("no valkey-cli or redis-cli found (needed for --cluster create)")


class RedisClusterServers(Launched):
    """`primaries` primaries with `replicas` replicas each, joined into one cluster."""

    def __init__(self, *, primaries: int = 3, replicas: int = 1, appendfsync: str = "everysec"):
        self.workdir = Path(tempfile.mkdtemp(prefix="smtpfleet-rcluster-"))
        self.binary = find_server_binary()
        self.cli = find_cli_binary(self.binary)
        self._replicas = replicas
        self._appendfsync = appendfsync
        self.servers = [self._server(f"node-{i}") for i in range(primaries * (1 + replicas))]

    def _server(self, name: str) -> RedisServer:
        return RedisServer(
            port=cluster_port(),
            data_dir=self.workdir / name,
            appendfsync=self._appendfsync,
            binary=self.binary,
            extra_args=[
                *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                *("--cluster-node-timeout", str(NODE_TIMEOUT_MS)),
                # A replica whose primary died long ago may still take over (tests kill
                # primaries on purpose); the whole cluster keeps serving with slots down.
                *("--cluster-replica-validity-factor", "0"),
                *("--cluster-require-full-coverage", "no"),
            ],
        )

    def _start_one(self, index: int) -> None:
        """Start server `index`; on new ports when its pair was taken since it was picked (a
        client's ephemeral port can land on the bus port, port + 10000, in the meantime)."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            server = self.servers[index]
            try:
                server.start()
                return
            except RuntimeError:
                if attempt == PORT_ATTEMPTS or "Address already in use" not in server.log_tail():
                    raise
            self.servers[index] = self._server(f"node-{index}-{attempt}")

    @property
    def addresses(self) -> list[str]:
        return [f"{LOOPBACK}:{s.port}" for s in self.servers]

    @property
    def url(self) -> str:
        """A seed node's URL (`redis.url` with `redis.cluster: true`)."""
        return self.servers[0].url

    def start(self) -> None:
        for index in range(len(self.servers)):
            self._start_one(index)
        subprocess.run(  # noqa: S603 - a CLI binary we located ourselves
            [
                str(self.cli),
                "--cluster",
                "create",
                *self.addresses,
                *("--cluster-replicas", str(self._replicas), "--cluster-yes"),
            ],
            capture_output=True,
            check=True,
            timeout=START_TIMEOUT_S,
        )
        self.wait_ok()

    def client(self, server: RedisServer) -> redis.Redis:
        return redis.Redis(LOOPBACK, server.port, socket_timeout=2.0, decode_responses=True)

    def nodes(self) -> list[dict[str, object]]:
        """CLUSTER NODES as one running node sees it: address, role, slots, flags."""
        for server in self.servers:
            if not server.running:
                continue
            with contextlib.suppress(redis.RedisError), self.client(server) as client:
                raw = client.execute_command("CLUSTER", "NODES")
                return _parse_nodes(raw if isinstance(raw, str) else "")
        return []

    def primaries(self) -> list[RedisServer]:
        """The running servers that are primaries now."""
        ports = {
            int(str(row["address"]).rsplit(":", 1)[1])
            for row in self.nodes()
            if row["role"] == "master" and "fail" not in str(row["flags"])
        }
        return [s for s in self.servers if s.port in ports and s.running]

    def server_for_slot(self, slot: int) -> RedisServer:
        for row in self.nodes():
            if row["role"] != "master" or "fail" in str(row["flags"]):
                continue
            ranges: list[tuple[int, int]] = row["slots"]  # type: ignore[assignment]
            if any(low <= slot <= high for low, high in ranges):
                port = int(str(row["address"]).rsplit(":", 1)[1])
                return next(s for s in self.servers if s.port == port)
        raise LookupError(f"no primary holds slot {slot}")

    def cluster_ok(self) -> bool:
        """Every running node says cluster_state:ok and sees all slots served."""
        for server in self.servers:
            if not server.running:
                continue
            try:
                with self.client(server) as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    replication = client.info("replication")
            except redis.RedisError:
                return False
            text = info if isinstance(info, str) else ""
            if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
                return False
            # A replica counts once it is in sync: WAIT would otherwise time out meanwhile.
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def wait_ok(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self._wait(self.cluster_ok, "cluster_state:ok on every node", timeout_s)

    def kill(self, server: RedisServer, timeout_s: float = START_TIMEOUT_S) -> None:
        """SIGKILL a node, then wait until a replica serves its slots (a primary's failover)."""
        was_primary = server in self.primaries()
        server.kill()
        if was_primary:
            self._wait(
                lambda: (
                    server.port not in {s.port for s in self.primaries()}
                    and len(self.primaries()) == len(self.servers) // (1 + self._replicas)
                ),
                "a replica to take over the killed primary's slots",
                timeout_s,
            )
        self.wait_ok(timeout_s)

    def move_slot(self, slot: int) -> RedisServer:
        """Move one slot, keys and all, from its primary to another, as `--cluster reshard`
        does (IMPORTING/MIGRATING, MIGRATE in batches, SETSLOT NODE); the new primary."""
        source = self.server_for_slot(slot)
        target = next(p for p in self.primaries() if p is not source)
        with self.client(source) as src, self.client(target) as dst:
            src_id = src.execute_command("CLUSTER", "MYID")
            dst_id = dst.execute_command("CLUSTER", "MYID")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", LOOPBACK, target.port, "", 0, 5000, "KEYS", *keys)
            for node in (dst, src):
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for server in self.primaries():
            with contextlib.suppress(redis.RedisError), self.client(server) as other:
                other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return target

    def start_node(self, server: RedisServer, timeout_s: float = START_TIMEOUT_S) -> None:
        """Bring a stopped node back (it rejoins from its nodes.conf, as a replica if replaced)."""
        server.start()
        self.wait_ok(timeout_s)

    def close(self) -> None:
        for server in self.servers:
            server.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _wait(ready: Callable[[], bool], what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster: timed out waiting for {what}")
            time.sleep(POLL_INTERVAL_S * 5)


def _parse_nodes(raw: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for line in raw.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        flags = parts[2]
        slots: list[tuple[int, int]] = []
        for item in parts[8:]:
            if item.startswith("["):  # a slot being migrated or imported
                continue
            low, _, high = item.partition("-")
            slots.append((int(low), int(high or low)))
        rows.append(
            {
                "id": parts[0],
                "address": parts[1].split("@", 1)[0],
                "flags": flags,
                "role": "master" if "master" in flags else "replica",
                "primary_id": parts[3],
                "slots": slots,
            }
        )
    return rows


def started_cluster(primaries: int = 3, replicas: int = 1) -> RedisClusterServers:
    """A started cluster (the caller closes it), or `unavailable()`: skipped locally where no
    cluster can be built, a failure under CI."""
    try:
        servers = RedisClusterServers(primaries=primaries, replicas=replicas)
    except RuntimeError as exc:
        unavailable(f"cannot build a Redis Cluster here: {exc}")
    try:
        servers.start()
    except (RuntimeError, subprocess.SubprocessError) as exc:
        servers.close()
        unavailable(f"cannot create a Redis Cluster here: {exc}")
    return servers
