"""Configuration drift between two real nodes on one real Redis: status says who differs and
in what, the gauge is 1 on both while they differ and 0 once they agree, and a node without a
relay does not vote on it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from smtpfleet.config import Config
from smtpfleet.node import Node
from smtpfleet.testing import eventually, node_config, run_cli, running_node
from smtpfleet.testing.sink import Sink

pytestmark = pytest.mark.timeout(90)

DRIFT = "smtpfleet_config_drift"
FINGERPRINTS = "smtpfleet_config_fingerprints"
NOWHERE = "127.0.0.1:1"  # refused at once: a relay every node that has it sees down


def config(redis_url: str, prefix: str, node_id: str, relays: list[str]) -> Config:
    overrides = {"redis": {"prefix": prefix}, "node": {"id": node_id}}
    return node_config(redis_url, relays, overrides)


def gauge(node: Node, name: str) -> float | None:
    return node.metrics.registry.get_sample_value(name)


async def status(prefix: str, redis_url: str, *extra: str) -> tuple[int, str, str]:
    env = {"SMTPFLEET_REDIS__PREFIX": prefix, "SMTPFLEET_REDIS__SHARDS": "4"}
    return await run_cli("status", "--redis", redis_url, *extra, env=env)


async def status_json(prefix: str, redis_url: str) -> Any:
    code, out, err = await status(prefix, redis_url, "--json")
    assert code == 0, err
    return json.loads(out)


async def test_status_and_the_gauge_show_drift_until_the_configs_agree(
    redis_url: str, prefix: str, sink: Sink, sink_b: Sink
) -> None:
    both = config(redis_url, prefix, "node-a", [sink.address, sink_b.address])
    one = config(redis_url, prefix, "node-b", [sink.address])
    async with running_node(both) as a:
        async with running_node(one) as b:
            await eventually(lambda: gauge(a, DRIFT) == 1 and gauge(b, DRIFT) == 1, timeout_s=15)
            assert gauge(a, FINGERPRINTS) == gauge(b, FINGERPRINTS) == 2

            data = await status_json(prefix, redis_url)
            assert data["config"]["drift"] is True
            assert data["config"]["distinct"] == 2
            assert data["config"]["differing"] == {"node-b": ["relay relay-2 missing"]}
            digests = {n["id"]: n["config"] for n in data["nodes"]}
            assert digests["node-a"] != digests["node-b"]
            code, table, err = await status(prefix, redis_url)
            assert code == 0, err
            assert "config drift: node-b differs: relay relay-2 missing" in table

        # node-b comes back with the same configuration as node-a: no drift any more.
        same = config(redis_url, prefix, "node-b", [sink.address, sink_b.address])
        async with running_node(same) as b:
            await eventually(
                lambda: gauge(b, FINGERPRINTS) == 1 and gauge(a, FINGERPRINTS) == 1, timeout_s=15
            )
            assert gauge(a, DRIFT) == gauge(b, DRIFT) == 0
            data = await status_json(prefix, redis_url)
            assert data["config"]["drift"] is False
            assert data["config"]["differing"] == {}
            code, table, _ = await status(prefix, redis_url)
            assert "config drift" not in table


async def test_a_node_without_a_relay_does_not_vote_on_it(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    # node-a has relay-1 (up) and relay-2 (down from everywhere); node-b has only relay-1.
    # Two live nodes: had node-b's silence on relay-2 counted as "up", node-a's "down" would
    # be no majority and relay-2 would stay up for the cluster.
    with_r2 = config(redis_url, prefix, "node-a", [sink.address, NOWHERE])
    without = config(redis_url, prefix, "node-b", [sink.address])
    async with running_node(with_r2) as a, running_node(without) as b:
        await eventually(lambda: a.membership.live == {"node-a", "node-b"}, timeout_s=10)
        await eventually(lambda: a.health.verdict.get("relay-2") is False, timeout_s=15)
        assert a.membership.live == {"node-a", "node-b"}
        assert a.health.verdict["relay-1"] is True
        assert "relay-2" not in b.health.verdict
        data = await status_json(prefix, redis_url)
        relays = {r["name"]: r for r in data["relays"]}
        assert relays["relay-2"]["verdict"] == "down"
        assert relays["relay-2"]["views"] == {"node-a": "down"}
        assert relays["relay-1"]["verdict"] == "up"


async def test_a_removed_relay_leaves_the_nodes_view_at_its_next_publish(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    # Each publish replaces the node's whole view, so no stale vote on a removed relay lingers.
    async with running_node(config(redis_url, prefix, "node-a", [sink.address, NOWHERE])) as a:
        await eventually(lambda: a.health.verdict.get("relay-2") is False, timeout_s=15)
        views = await a.store.views(["node-a"])
        assert set(views["node-a"]) == {"relay-1", "relay-2"}
    async with running_node(config(redis_url, prefix, "node-a", [sink.address])) as a:

        async def relay_2_gone() -> bool:
            return set((await a.store.views(["node-a"]))["node-a"]) == {"relay-1"}

        await eventually(relay_2_gone, timeout_s=10)
