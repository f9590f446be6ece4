"""A long run at half of peak: does a node's memory stay flat, and is any message late?

    python loadtest/soak.py [--minutes 30] [--rate R] [--nodes 1]

Starts a LocalCluster (Redis with appendfsync always, the nodes, one sink on loopback),
measures the peak accept rate with a new connection per message (unless --rate is given),
then sends at half of it for --minutes, every message over a fresh session. Every
--sample-s it prints each node's RSS and the slowest delivery so far (sink arrival minus
the sender's 250). At the end it waits for the last accepted message and reports: RSS at
the start of the steady phase, its maximum and at the end (flat means the end is within a
few MB of the start), lost and duplicated messages, and the delivery delays (p50, p99, max,
and how many took longer than --late-s). Not part of CI: it takes as long as you ask.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import uvloop

from smtpfleet.loadgen.generator import run_load
from smtpfleet.loadgen.messages import RECIPIENT, tag_of
from smtpfleet.loadgen.paced import PacedLoad
from smtpfleet.loadgen.reconcile import reconcile
from smtpfleet.testing.localcluster import LocalCluster
from smtpfleet.testing.sink import Sink

PEAK_S = 10.0
SETTLE_S = 60.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Arrivals:
    """Drains the sink as it goes (a soak must not keep every body): tag -> arrival times."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.at: dict[str, list[float]] = {}

    def drain(self) -> None:
        messages = self.sink.messages
        while messages:
            message = messages.popleft()
            tag = tag_of(message.data)
            if tag is not None:
                self.at.setdefault(tag, []).append(message.at)

    def delays(self, load: PacedLoad) -> list[float]:
        """Seconds from each accepted message's 250 to its first arrival at the sink."""
        out = []
        for sent in load.sent:
            arrivals = self.at.get(sent.tag)
            if sent.code == 250 and arrivals and sent.done is not None:
                out.append(max(0.0, min(arrivals) - sent.done))
        return out


async def peak_rate(targets: list[tuple[str, int]]) -> float:
    result = await run_load(targets, duration_s=PEAK_S, concurrency=50, size=2048, per_session=1)
    return result.accepted / result.elapsed_s if result.elapsed_s else 0.0


async def sample(
    pids: list[int], arrivals: Arrivals, load: PacedLoad, every_s: float, rss: list[list[float]]
) -> None:
    started = time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        arrivals.drain()
        delays = arrivals.delays(load)
        for series, pid in zip(rss, pids, strict=True):
            series.append(rss_mb(pid))
        now = " ".join(f"{series[-1]:.0f}" for series in rss)
        accepted = sum(1 for s in load.sent if s.code == 250)
        print(
            f"{time.monotonic() - started:6.0f} s  accepted {accepted}  "
            f"delivered {len(arrivals.at)}  node RSS MB {now}  "
            f"slowest delivery {max(delays, default=0.0):.2f} s",
            flush=True,
        )


async def settle(arrivals: Arrivals, load: PacedLoad) -> None:
    accepted = {s.tag for s in load.sent if s.code == 250}
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        arrivals.drain()
        if accepted <= arrivals.at.keys():
            return
        await asyncio.sleep(0.2)


def report(
    args: argparse.Namespace, arrivals: Arrivals, load: PacedLoad, rss: list[list[float]]
) -> None:
    accepted = [s.tag for s in load.sent if s.code == 250]
    pairs = [(tag, (RECIPIENT,)) for tag, ats in arrivals.at.items() for _ in ats]
    outcome = reconcile(accepted, pairs)
    delays = sorted(arrivals.delays(load))
    refused = sum(1 for s in load.sent if s.code != 250)
    print(f"\nsent {len(load.sent)}, accepted {len(accepted)}, refused {refused}")
    print(f"lost {len(outcome.lost)}, duplicated {sum(n - 1 for n in outcome.duplicated.values())}")
    if delays:
        p99 = delays[max(0, int(len(delays) * 0.99) - 1)]
        late = sum(1 for d in delays if d > args.late_s)
        print(
            f"delivery delay: p50 {statistics.median(delays):.3f} s, p99 {p99:.3f} s, "
            f"max {delays[-1]:.3f} s; {late} over {args.late_s:.0f} s"
        )
    for node, series in enumerate(rss, start=1):
        print(
            f"node {node} RSS MB: start {series[0]:.0f}, max {max(series):.0f}, "
            f"end {series[-1]:.0f}"
        )


async def main(args: argparse.Namespace) -> None:
    async with LocalCluster(nodes=args.nodes, sinks=1) as cluster:
        targets = [n.smtp for n in cluster.node_processes]
        pids = [n.pid for n in cluster.node_processes]
        rate = args.rate
        if rate is None:
            peak = await peak_rate(targets)
            rate = round(peak / 2, 1)
            print(f"peak {peak:.0f} msg/s with a new connection per message; soaking at {rate}")
        arrivals = Arrivals(cluster.sink_servers[0])
        await asyncio.sleep(2)
        arrivals.drain()
        arrivals.at.clear()  # the peak run's messages are not part of the soak
        rss: list[list[float]] = [[rss_mb(pid)] for pid in pids]
        load = PacedLoad(targets, rate=rate, run_id=f"soak{int(time.time())}")
        running = asyncio.create_task(load.run())
        sampler = asyncio.create_task(sample(pids, arrivals, load, args.sample_s, rss))
        await asyncio.sleep(args.minutes * 60)
        load.stop()
        await running
        await settle(arrivals, load)
        sampler.cancel()
        for series, pid in zip(rss, pids, strict=True):
            series.append(rss_mb(pid))
        report(args, arrivals, load, rss)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=None, help="default: half of the peak")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--late-s", type=float, default=5.0)
    uvloop.run(main(parser.parse_args()))
