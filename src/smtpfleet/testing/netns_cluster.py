"""The local cluster, each piece in its own network namespace, for faults in the network.

Redis runs in a namespace of its own, each node in its own, and the sink relays in the test's
namespace, each on an address of its own; all are joined by a `testing.netns.Fabric` (a bridge
in a hub namespace), so a fault between any two of them is a fault on the wire between two
addresses. Everything stays on addresses the fabric created (10.231.X.Y, or fd5f:…::Y with
`ipv6=True`); nothing listens on a shared interface. Ports are fixed (each namespace has its
own port space).

It is a `LocalCluster`, so the drills run on it unchanged (`Scenario.netns`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smtpfleet.testing.localcluster import KEEP_WORKDIR_ENV, LocalCluster, NodeProcess, deep_merge
from smtpfleet.testing.netns import Fabric, Member
from smtpfleet.testing.redis_server import RedisServer
from smtpfleet.testing.sink import Sink
from smtpfleet.testing.tls import make_tls_files

REDIS_PORT = 6379
SMTP_PORT = 2525
HTTP_PORT = 9100
RELAY_PORT = 2525


@dataclass
class NetnsCluster(LocalCluster):
    """Redis and the nodes in namespaces of their own; sinks on the test's side of the wire."""

    fabric: Fabric = field(default_factory=Fabric)
    redis_member: Member | None = None
    node_members: dict[int, Member] = field(default_factory=dict)
    ipv6: bool = False  # everything talks over the fabric's IPv6 addresses (Fabric.ipv6)

    async def start(self) -> None:
        self.fabric.ipv6 = self.fabric.ipv6 or self.ipv6
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="smtpfleet-netns-"))
            self._own_workdir = True
        self.tls = make_tls_files(self.workdir / "tls")
        if not self.fabric.started:  # a test may have put its own processes on it first
            await asyncio.to_thread(self.fabric.start)
        await asyncio.to_thread(self._start_redis)
        for i in range(self.sinks):
            address = self.fabric.add_host_address()
            sink = Sink(address, RELAY_PORT, name=f"relay-{i + 1}", pipelining=True)
            await sink.start()
            self.sink_servers.append(sink)
        for i in range(self.nodes):
            self.node_processes.append(self._new_node(i + 1))
        for node in self.node_processes:
            node.start()
        await asyncio.gather(*(n.wait_ready() for n in self.node_processes))

    def _start_redis(self) -> None:
        assert self.workdir is not None
        member = self.redis_member = self.fabric.add_member("redis")
        self.redis = RedisServer(
            data_dir=self.workdir / "redis",
            appendfsync=self.appendfsync,
            host=member.address,
            port=REDIS_PORT,
            wrapper=self.fabric.exec_prefix(member),
            # Protected mode refuses clients from other addresses when there is no password;
            # here every client is on another address, all of them on the private fabric.
            extra_args=("--protected-mode", "no"),
        )
        self.redis.start()
        self.redis_url = self.redis.url

    def node_config(self, index: int, smtp_port: int, http_port: int) -> dict[str, Any]:
        address = self.node_members[index].address
        on_fabric = {
            "inbound": {
                "listen": [hostport(address, smtp_port)],
                "relay_networks": self.fabric.networks,
            },
            "http": {"listen": hostport(address, http_port)},
        }
        return deep_merge(super().node_config(index, smtp_port, http_port), on_fabric)

    def _new_node(self, index: int) -> NodeProcess:
        assert self.workdir is not None
        member = self.node_members[index] = self.fabric.add_member(f"node{index}")
        path = self.workdir / f"node-{index}.yaml"
        config = self.node_config(index, SMTP_PORT, HTTP_PORT)
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return NodeProcess(
            index,
            path,
            self.workdir / f"node-{index}.log",
            SMTP_PORT,
            HTTP_PORT,
            self.workers,
            host=member.address,
            argv_prefix=tuple(self.fabric.exec_prefix(member)),
        )

    def node_member(self, index: int) -> Member:
        return self.node_members[index]

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "smtp": [hostport(n.host, n.smtp_port) for n in self.node_processes],
            "metrics": [
                f"http://{hostport(n.host, n.http_port)}/metrics" for n in self.node_processes
            ],
            "fabric": self.fabric.networks[0],
        }

    async def stop(self) -> None:
        keep = bool(os.environ.get(KEEP_WORKDIR_ENV))
        workdir, own = self.workdir, self._own_workdir
        self._own_workdir = False  # removed below, after the fabric is gone
        try:
            await super().stop()
        finally:
            await asyncio.to_thread(self.fabric.close)
            if own and workdir is not None and not keep:
                shutil.rmtree(workdir, ignore_errors=True)


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
