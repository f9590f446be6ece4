"""Measure failover: relay detection time, node takeover time and duplicates per kill.

    python loadtest/failover.py [--runs 5]

Each run starts a local cluster (3 node processes, 2 sink relays, real Redis) under steady
load, then (a) stops a relay and times until every node's published view says it is down,
and (b) SIGKILLs a node and times until every message it had accepted is delivered,
counting duplicates at the sinks. Medians over the runs are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import redis.asyncio as aioredis
import uvloop

from smtpfleet.config import RedisConfig
from smtpfleet.queue.keys import Keys
from smtpfleet.testing import FAST_RETRY, LocalCluster, SteadyLoad, message_ids

HEALTH = {"interval_s": 1.0, "timeout_s": 2.0, "fall": 2, "rise": 2}
CLUSTER = {"heartbeat_interval_s": 1.0, "lease_s": 5.0, "lease_refresh_s": 2.0}
OVERRIDES: dict[str, Any] = {"retry": FAST_RETRY, "health": HEALTH, "cluster": CLUSTER}


async def relay_detection_s(cluster: LocalCluster) -> float:
    assert cluster.redis is not None
    client = aioredis.Redis.from_url(cluster.redis.url, decode_responses=True)
    await cluster.sink_servers[0].stop()
    started = time.monotonic()
    defaults = RedisConfig()  # the local cluster does not change the prefix or the shards
    keys = [
        Keys(defaults.prefix, defaults.shards).view(f"node-{n.index}")
        for n in cluster.node_processes
    ]
    while True:
        states = [await client.hget(key, "relay-1") for key in keys]
        if all(s is not None and str(s).startswith("0") for s in states):  # "0 <reason>"
            break
        await asyncio.sleep(0.02)
    await client.aclose()
    return time.monotonic() - started


async def kill_node(cluster: LocalCluster, load: SteadyLoad) -> tuple[float, int]:
    victim = cluster.node_processes[0]
    victim.kill()
    killed = time.monotonic()
    await asyncio.sleep(1.0)
    load.stop()
    while not set(load.accepted) <= set(message_ids(cluster.sink_servers)):  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    recovered = time.monotonic() - killed
    await asyncio.sleep(1.0)
    duplicates = sum(c - 1 for c in message_ids(cluster.sink_servers).values())
    return recovered, duplicates


async def one_run() -> tuple[float, float, int]:
    async with LocalCluster(nodes=3, sinks=2, overrides=OVERRIDES) as cluster:
        for sink in cluster.sink_servers:
            sink.faults.delay_s = 0.01
        load = SteadyLoad([n.smtp for n in cluster.node_processes])
        running = asyncio.create_task(load.run(senders=6))
        await asyncio.sleep(2.0)
        recovered, duplicates = await kill_node(cluster, load)
        await running
    async with LocalCluster(nodes=3, sinks=2, overrides=OVERRIDES) as cluster:
        detection = await relay_detection_s(cluster)
    return detection, recovered, duplicates


async def main(runs: int) -> None:
    results = [await one_run() for _ in range(runs)]
    for i, (detection, recovered, duplicates) in enumerate(results, 1):
        print(f"run {i}: detection {detection:.2f}s, takeover {recovered:.2f}s, dups {duplicates}")
    bound = HEALTH["fall"] * HEALTH["interval_s"] + HEALTH["timeout_s"]
    print(
        f"median of {runs}: relay detection {statistics.median(r[0] for r in results):.2f}s "
        f"(bound fall*interval+timeout = {bound:.1f}s), "
        f"takeover after SIGKILL {statistics.median(r[1] for r in results):.2f}s "
        f"(lease {CLUSTER['lease_s']}s), "
        f"duplicates per kill {statistics.median(r[2] for r in results)}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    uvloop.run(main(parser.parse_args().runs))
