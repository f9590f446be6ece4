"""Cluster behaviour with real node processes, real Redis and real relays (issue: cluster).

Relays are aiosmtpd sinks in this process; nodes are `smtpfleet serve` processes; faults are
real: SIGKILL, SIGTERM, a relay's listener going away, a proxy that cuts one node's path.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis

from smtpfleet import http
from smtpfleet.config import HealthConfig, RedisConfig
from smtpfleet.queue.keys import Keys
from smtpfleet.testing import (
    FAST_RETRY,
    FaultProxy,
    LocalCluster,
    SteadyLoad,
    eventually,
    message_ids,
    send,
)
from smtpfleet.testing.sink import Sink

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow, pytest.mark.solo]

HEALTH = {"interval_s": 0.5, "timeout_s": 1.0, "fall": 2, "rise": 2}
CLUSTER = {"heartbeat_interval_s": 0.5, "lease_s": 2.0, "lease_refresh_s": 0.5}
FAST: dict[str, Any] = {
    "retry": FAST_RETRY,
    "health": HEALTH,
    "cluster": CLUSTER,
    "routing": {"key": "message_id"},
}
DETECTION_BOUND_S = HEALTH["fall"] * HEALTH["interval_s"] + HEALTH["timeout_s"]
SLACK_S = 2.0
# A relay that failed real deliveries (passive checks) stays ejected for `ejection_s` even
# once its health checks pass again, as Envoy's outlier ejection does: a relay that comes
# back soon after it went away rejoins within that, then the checks' `rise`.
REJOIN_BOUND_S = HealthConfig().ejection_s + DETECTION_BOUND_S + SLACK_S
KEYS = Keys(RedisConfig().prefix, RedisConfig().shards)  # the local cluster's defaults


async def load_moves_on(load: SteadyLoad, by: int = 20) -> None:
    """Wait until `by` more messages were accepted: the load runs on through what happened."""
    start = len(load.accepted)
    await eventually(lambda: len(load.accepted) >= start + by, timeout_s=15)


def relay_entries(
    sinks: Sequence[Sink | FaultProxy], priorities: Sequence[int] = ()
) -> list[dict[str, Any]]:
    entries = []
    for i, sink in enumerate(sinks):
        host, _, port = sink.address.rpartition(":")
        entry: dict[str, Any] = {"name": f"relay-{i + 1}", "host": host, "port": int(port)}
        if priorities:
            entry["priority"] = priorities[i]
        entries.append(entry)
    return entries


async def views(cluster: LocalCluster, relay: str) -> dict[str, str]:
    """Each node's own view of one relay, as published in Redis."""
    assert cluster.redis is not None
    client = aioredis.Redis.from_url(cluster.redis.url, decode_responses=True)
    try:
        return {
            # "1" up, "0" or "0 <reason>" down: the state is the first character.
            f"node-{n.index}": ((await client.hget(KEYS.view(f"node-{n.index}"), relay)) or "?")[0]
            for n in cluster.node_processes
            if n.running
        }
    finally:
        await client.aclose()


async def all_see(cluster: LocalCluster, relay: str, state: str) -> bool:
    return set((await views(cluster, relay)).values()) == {state}


async def all_route_to(cluster: LocalCluster, relay: str) -> bool:
    """Every node routes to the relay again: its cluster verdict and its own view say up.
    The views in Redis come first; each node reads the others' on its next check."""
    for node in cluster.node_processes:
        if not node.running:
            continue
        status, body = await http.get("/metrics", port=node.http_port, host=node.host)
        text = body.decode() if status == 200 else ""
        for view in ("cluster", "node"):
            if f'smtpfleet_relay_up{{relay="{relay}",view="{view}"}} 1.0' not in text:
                return False
    return True


async def test_sigkill_of_a_node_under_load_loses_nothing() -> None:
    async with LocalCluster(nodes=3, sinks=2, overrides=FAST) as cluster:
        for sink in cluster.sink_servers:
            sink.faults.delay_s = 0.01  # deliveries take a while, so some are in flight
        load = SteadyLoad([n.smtp for n in cluster.node_processes])
        running = asyncio.create_task(load.run(senders=6))
        await eventually(lambda: sum(s.count for s in cluster.sink_servers) >= 100)
        cluster.node_processes[0].kill()
        killed_at = time.monotonic()
        await load_moves_on(load, by=50)
        load.stop()
        await running
        assert set(load.codes) == {250}, "a sender saw an error it could not fail over from"
        await load.wait_delivered(cluster, timeout_s=CLUSTER["lease_s"] + 10)
        recovery_s = time.monotonic() - killed_at
        assert recovery_s <= CLUSTER["lease_s"] + 10
        duplicates = sum(c - 1 for c in message_ids(cluster.sink_servers).values())
        assert duplicates <= 64  # at most the victim's deliveries in flight at the kill


async def test_stopped_relay_is_ejected_fast_and_rejoins() -> None:
    async with LocalCluster(nodes=3, sinks=2, overrides=FAST) as cluster:
        doomed, survivor = cluster.sink_servers
        port = doomed.port
        survivor_before = survivor.count
        load = SteadyLoad([n.smtp for n in cluster.node_processes])
        running = asyncio.create_task(load.run(senders=4))
        await eventually(lambda: doomed.count >= 20)  # the doomed relay has its share
        await doomed.stop()
        stopped_at = time.monotonic()
        await eventually(
            lambda: all_see(cluster, "relay-1", "0"), timeout_s=DETECTION_BOUND_S + SLACK_S
        )
        detection_s = time.monotonic() - stopped_at
        await load_moves_on(load)
        load.stop()
        await running
        assert set(load.codes) == {250}  # senders never noticed
        await load.wait_delivered(cluster, timeout_s=15)
        assert survivor.count > survivor_before
        assert detection_s <= DETECTION_BOUND_S + SLACK_S

        reborn = Sink(port=port, name="relay-1-again")
        await reborn.start()
        try:
            await eventually(lambda: all_see(cluster, "relay-1", "1"), timeout_s=REJOIN_BOUND_S)
            await eventually(lambda: all_route_to(cluster, "relay-1"), timeout_s=5)
            for _ in range(20):
                assert (await send(cluster.node_processes[0].smtp)).code == 250
            await eventually(lambda: reborn.count > 0, timeout_s=10)
        finally:
            await reborn.stop()


async def test_one_node_cut_off_from_one_relay_does_not_evict_it_for_the_cluster() -> None:
    async with Sink(name="relay-1") as sink_a, Sink(name="relay-2") as sink_b:
        proxy = FaultProxy(("127.0.0.1", sink_b.port))
        await proxy.start()
        direct = relay_entries([sink_a, sink_b])
        via_proxy = relay_entries([sink_a, proxy])
        cluster = LocalCluster(
            nodes=3,
            relays=[sink_a.address, sink_b.address],
            overrides={**FAST, "relays": direct},
            node_overrides={1: {"relays": via_proxy}},
        )
        async with cluster:
            await eventually(lambda: all_see(cluster, "relay-2", "1"), timeout_s=5)
            proxy.set_mode("refuse")
            await eventually(
                lambda: _views_are(
                    cluster, "relay-2", {"node-1": "0", "node-2": "1", "node-3": "1"}
                ),
                timeout_s=DETECTION_BOUND_S + SLACK_S,
            )
            before_b = sink_b.count
            cut_off, healthy = cluster.node_processes[0], cluster.node_processes[1]
            for _ in range(20):
                assert (await send(cut_off.smtp)).code == 250
                assert (await send(healthy.smtp)).code == 250
            await eventually(lambda: sink_a.count + sink_b.count >= 40, timeout_s=10)
            assert sink_b.count > before_b  # the others still use relay-2
            assert proxy.mode == "refuse"
        await proxy.stop()


async def _views_are(cluster: LocalCluster, relay: str, expected: dict[str, str]) -> bool:
    return await views(cluster, relay) == expected


async def test_standby_tier_takes_over_and_traffic_returns() -> None:
    async with Sink(name="primary") as primary, Sink(name="standby") as standby:
        relays = relay_entries([primary, standby], priorities=[10, 20])
        overrides = {**FAST, "relays": relays}
        async with LocalCluster(nodes=2, relays=[primary.address], overrides=overrides) as cluster:
            node = cluster.node_processes[0].smtp
            for _ in range(5):
                assert (await send(node)).code == 250
            await eventually(lambda: primary.count == 5, timeout_s=5)
            assert standby.count == 0
            port = primary.port
            await primary.stop()
            for _ in range(5):
                assert (await send(node)).code == 250
            await eventually(lambda: standby.count == 5, timeout_s=10)  # failover
            back = Sink(port=port, name="primary-again")
            await back.start()
            try:
                await eventually(lambda: all_see(cluster, "relay-1", "1"), timeout_s=REJOIN_BOUND_S)
                await eventually(lambda: all_route_to(cluster, "relay-1"), timeout_s=5)
                for _ in range(5):
                    assert (await send(node)).code == 250
                await eventually(lambda: back.count == 5, timeout_s=10)  # failback
                assert standby.count == 5
            finally:
                await back.stop()


async def test_sigterm_drain_under_load_loses_nothing() -> None:
    async with LocalCluster(nodes=3, sinks=2, overrides=FAST) as cluster:
        load = SteadyLoad([n.smtp for n in cluster.node_processes])
        running = asyncio.create_task(load.run(senders=6))
        await eventually(lambda: sum(s.count for s in cluster.sink_servers) >= 100)
        leaving = cluster.node_processes[0]
        leaving.signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, leaving.wait, 20.0) == 0
        await load_moves_on(load)
        load.stop()
        await running
        assert set(load.codes) == {250}
        await load.wait_delivered(cluster, timeout_s=15)
        assert max(message_ids(cluster.sink_servers).values()) == 1


async def test_a_killed_nodes_relay_connections_stop_counting_when_it_is_declared_dead() -> None:
    async with Sink(name="relay-1") as sink:
        relays = [{**relay_entries([sink])[0], "max_connections": 1}]
        overrides = {**FAST, "relays": relays}
        async with LocalCluster(nodes=2, relays=[sink.address], overrides=overrides) as cluster:
            assert cluster.redis is not None
            client = aioredis.Redis.from_url(cluster.redis.url, decode_responses=True)
            leases = KEYS.relay_connections("relay-1")
            sink.faults.delay_s = 1.0  # the one session stays busy long enough to kill its node
            try:
                assert (await send(cluster.node_processes[0].smtp)).code == 250
                await eventually(lambda: client.zcard(leases), timeout_s=5)
                holder = (await client.zrange(leases, 0, 0))[0].split(":")[0]
            finally:
                await client.aclose()
            victim = next(n for n in cluster.node_processes if f"node-{n.index}" == holder)
            survivor = next(n for n in cluster.node_processes if n is not victim)
            victim.kill()
            killed_at = time.monotonic()
            sink.faults.delay_s = 0.0
            assert (await send(survivor.smtp)).code == 250
            # Both messages need the relay's one connection; the dead node's lease must lapse
            # with its membership (lease_s), not hold the relay for half a minute.
            await eventually(lambda: len(message_ids([sink])) == 2, timeout_s=15)
            assert time.monotonic() - killed_at <= CLUSTER["lease_s"] + 4 * SLACK_S
