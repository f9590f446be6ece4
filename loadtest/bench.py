"""End-to-end throughput of smtpfleet against the direct-to-sink ceiling, in one run.

    python loadtest/bench.py [--messages 20000] [--concurrency 50] [--durability fsync]

Every figure is counted at the sink (a separate process), so "delivered" means delivered.
Scenarios: (a) load generator straight to the sink, (b) through one smtpfleet node,
(c) through three. The ratio smtpfleet/ceiling is printed; the Postfix comparison is the
proof-tools issue's benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import uvloop

from smtpfleet.loadgen import run_load
from smtpfleet.localcluster import LocalCluster


@dataclass
class Figure:
    name: str
    delivered_per_s: float
    accepted: int
    p50_ms: float
    p99_ms: float


class SinkProcess:
    """`python -m smtpfleet.sink` in its own process, so it does not share the generator's core."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smtpfleet.sink", "--report-s", "0.05"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().split()
        self.address = first[1]
        self.count = 0

    async def follow(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.proc.stdout is not None
        while line := await loop.run_in_executor(None, self.proc.stdout.readline):
            self.count = int(line.split()[1])

    async def wait_for(self, count: int, timeout_s: float) -> float:
        deadline = time.perf_counter() + timeout_s
        while self.count < count and time.perf_counter() < deadline:  # noqa: ASYNC110 - counts arrive on a pipe
            await asyncio.sleep(0.02)
        return time.perf_counter()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def measure(
    name: str, sink: SinkProcess, targets: list[tuple[str, int]], args: argparse.Namespace
) -> Figure:
    before = sink.count
    started = time.perf_counter()
    result = await run_load(
        targets, total=args.messages, concurrency=args.concurrency, size=args.size
    )
    finished = await sink.wait_for(before + result.accepted, timeout_s=120)
    delivered = sink.count - before
    return Figure(
        name,
        delivered / (finished - started),
        result.accepted,
        result.percentile_ms(0.5),
        result.percentile_ms(0.99),
    )


async def scenario_cluster(nodes: int, sink: SinkProcess, args: argparse.Namespace) -> Figure:
    overrides = {
        "queue": {"durability": args.durability},
        "inbound": {"max_sessions": 5000},
    }
    appendfsync = "always" if args.durability == "fsync" else "everysec"
    async with LocalCluster(
        nodes=nodes, relays=[sink.address], overrides=overrides, appendfsync=appendfsync
    ) as cluster:
        targets = [n.smtp for n in cluster.node_processes]
        await run_load(targets, total=200, concurrency=10)  # warm-up
        return await measure(f"smtpfleet, {nodes} node(s)", sink, targets, args)


async def main(args: argparse.Namespace) -> None:
    sink = SinkProcess()
    follower = asyncio.create_task(sink.follow())
    host, port = sink.address.rsplit(":", 1)
    figures: dict[str, list[Figure]] = {}
    try:
        for _ in range(args.runs):
            ceiling = await measure("direct to sink (ceiling)", sink, [(host, int(port))], args)
            figures.setdefault(ceiling.name, []).append(ceiling)
            for nodes in (1, 3):
                figure = await scenario_cluster(nodes, sink, args)
                figures.setdefault(figure.name, []).append(figure)
    finally:
        sink.stop()
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    report(figures, args)


def report(figures: dict[str, list[Figure]], args: argparse.Namespace) -> None:
    print(
        f"\n{args.messages} messages of {args.size} B, {args.concurrency} sessions, "
        f"durability {args.durability}, median of {args.runs} run(s)\n"
    )
    print(f"{'path':32} {'delivered msg/s':>16} {'accept p50 ms':>14} {'p99 ms':>8}")
    medians = {}
    for name, runs in figures.items():
        rate = statistics.median(f.delivered_per_s for f in runs)
        medians[name] = rate
        p50 = statistics.median(f.p50_ms for f in runs)
        p99 = statistics.median(f.p99_ms for f in runs)
        print(f"{name:32} {rate:16.0f} {p50:14.1f} {p99:8.1f}")
    ceiling = medians.pop("direct to sink (ceiling)")
    for name, rate in medians.items():
        print(f"ratio {name} / ceiling: {rate / ceiling:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--durability", choices=["server", "fsync"], default="fsync")
    uvloop.run(main(parser.parse_args()))
