"""How long an accepted message waits between its 250 and its arrival at the relay.

    python loadtest/delivery_delay.py [--rate 100] [--seconds 10] [--durability fsync]

Starts a LocalCluster (Redis with appendfsync always, one node, one aiosmtpd sink on
loopback), sends at a fixed rate for --seconds, every message over a fresh session, waits
for the last one, and prints the delivery delay (sink arrival minus the sender's 250): p50,
p90, p99 and max, and the accept latency (DATA's final dot to the reply) beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop
from soak import Arrivals, settle

from smtpfleet.loadgen.paced import PacedLoad
from smtpfleet.testing.localcluster import LocalCluster


def _percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    if not ordered:
        return "none"
    at = [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.5, 0.9, 0.99)]
    return " / ".join(f"{1000 * v:.1f}" for v in (*at, ordered[-1])) + " ms"


async def main(args: argparse.Namespace) -> None:
    overrides = {"queue": {"durability": args.durability}}
    async with LocalCluster(nodes=1, sinks=1, overrides=overrides, appendfsync="always") as cluster:
        arrivals = Arrivals(cluster.sink_servers[0])
        load = PacedLoad(
            [n.smtp for n in cluster.node_processes], rate=args.rate, run_id=f"dd{time.time():.0f}"
        )
        running = asyncio.create_task(load.run())
        await asyncio.sleep(args.seconds)
        load.stop()
        await running
        await settle(arrivals, load)
        delays = arrivals.delays(load)
        accepted = [sent.latency_s for sent in load.sent if sent.code == 250]
        print(f"{len(delays)} of {len(load.sent)} sent delivered, at {args.rate} msg/s")
        print(f"delivery delay after the 250, p50 / p90 / p99 / max: {_percentiles(delays)}")
        print(f"accept latency (final dot to reply), same:            {_percentiles(accepted)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--durability", default="fsync", choices=["server", "fsync"])
    uvloop.run(main(parser.parse_args()))
