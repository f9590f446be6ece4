"""Nodes for tests: a config on loopback port 0 with fast retries, and an in-process node."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from smtpfleet.config import Config, build_config
from smtpfleet.node import Node
from smtpfleet.testing.localcluster import deep_merge

# Fast schedules so tests see retries in seconds, not minutes.
FAST_RETRY: dict[str, Any] = {
    "initial_s": 0.2,
    "max_s": 1.0,
    "jitter": 0.0,
    "scheduler_interval_s": 0.1,
}


def node_config(
    redis_url: str, relays: Sequence[str], overrides: Mapping[str, Any] | None = None
) -> Config:
    """A node on 127.0.0.1 port 0 that relays for loopback clients, with fast retries."""
    tree: dict[str, Any] = {
        "node": {"hostname": "node.test", "drain_grace_s": 5.0},
        "inbound": {"listen": ["127.0.0.1:0"], "relay_networks": ["127.0.0.0/8", "::1/128"]},
        "redis": {"url": redis_url, "shards": 4},
        "http": {"listen": "127.0.0.1:0"},
        "health": {"interval_s": 0.2, "timeout_s": 1.0},
        "cluster": {"heartbeat_interval_s": 0.2, "lease_s": 1.0, "lease_refresh_s": 0.5},
        "retry": FAST_RETRY,
        "relays": [_relay(i, address) for i, address in enumerate(relays)],
    }
    return build_config(deep_merge(tree, overrides or {}), {})


def _relay(index: int, address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {"name": f"relay-{index + 1}", "host": host.strip("[]"), "port": int(port)}


@contextlib.asynccontextmanager
async def running_node(config: Config) -> AsyncIterator[Node]:
    """An in-process node; closed (not drained) on exit."""
    node = Node(config)
    await node.start()
    try:
        yield node
    finally:
        await node.close()
