"""Accept latency of one node at a fixed rate, with its delivery side busy, throttled or idle.

    python loadtest/latency.py [--rate 440] [--messages 3000] [--runs 3]

One smtpfleet node (Redis `appendfsync always`, `queue.durability: fsync`, as in bench.py)
relays to Postfix's `smtp-sink`; smtpfleet's generator sends 2 KB messages over 50 sessions
at `--rate` and reports accept latency percentiles, for three set-ups of the same node:

  - deliveries running with `delivery.concurrency` 64 (the default);
  - deliveries running with `delivery.concurrency` 16;
  - no deliveries (the only relay is paused): the accept path alone.

The accept path and the delivery workers share one event loop, so this shows how much of the
accept latency is queueing behind delivery work. After each set-up the node's garbage
collections are printed from its `smtpfleet_gc_pause_seconds` histogram: each one stalls every
session for its length. Every server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from typing import Any

import uvloop
from bench import SmtpSink, ensure_postfix_tools
from prometheus_client.parser import text_string_to_metric_families

from smtpfleet import http
from smtpfleet.loadgen import run_load
from smtpfleet.testing import run_cli
from smtpfleet.testing.localcluster import LocalCluster

# name -> (node overrides, whether the relay is paused so nothing is delivered)
SETUPS: dict[str, tuple[dict[str, Any], bool]] = {
    "deliveries, concurrency 64": ({"delivery": {"concurrency": 64}}, False),
    "deliveries, concurrency 16": ({"delivery": {"concurrency": 16}}, False),
    "no deliveries (relay paused)": ({}, True),
}
PAUSE_SETTLE_S = 6.0  # nodes read the paused set with their health checks (5 s here)


async def one_setup(name: str, sink: SmtpSink, args: argparse.Namespace) -> list[float]:
    extra, paused = SETUPS[name]
    overrides: dict[str, Any] = {
        "queue": {"durability": "fsync"},
        "inbound": {"max_sessions": 5000},
        "health": {"interval_s": 5.0},
        **extra,
    }
    cluster = LocalCluster(
        nodes=1, relays=[sink.address], overrides=overrides, appendfsync="always"
    )
    p99s = []
    async with cluster:
        assert cluster.redis is not None
        targets = [n.smtp for n in cluster.node_processes]
        if paused:
            await _pause(cluster)
        await run_load(targets, total=200, concurrency=10)  # warm-up
        for _ in range(args.runs):
            await asyncio.sleep(2.0)  # let the previous run's deliveries finish
            result = await run_load(
                targets, total=args.messages, rate=args.rate, concurrency=50, size=2048
            )
            p50, p90, p99 = (result.percentile_ms(q) for q in (0.5, 0.9, 0.99))
            print(f"  {name}: p50 {p50:.1f} ms, p90 {p90:.1f} ms, p99 {p99:.1f} ms", flush=True)
            p99s.append(p99)
        for node in cluster.node_processes:
            print(await gc_pauses(node.http_port), flush=True)
    return p99s


async def gc_pauses(port: int) -> str:
    """One line per generation: collections, their total and mean, and the bucket that
    holds the longest (`smtpfleet_gc_pause_seconds`)."""
    _, text = await http.get("/metrics", port=port)
    count: dict[str, float] = {}
    total: dict[str, float] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            generation = sample.labels.get("generation")
            if not sample.name.startswith("smtpfleet_gc_pause_seconds") or generation is None:
                continue
            if sample.name.endswith("_count"):
                count[generation] = sample.value
            elif sample.name.endswith("_sum"):
                total[generation] = sample.value
            elif sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                buckets.setdefault(generation, []).append((le, sample.value))
    lines = []
    for generation in sorted(count):
        n, ms = count[generation], total[generation] * 1000
        if not n:
            lines.append(f"    gc generation {generation}: no collection")
            continue
        longest = min((le for le, seen in buckets[generation] if seen >= n), default=0.0)
        lines.append(
            f"    gc generation {generation}: {n:.0f} collections, {ms:.0f} ms in all,"
            f" mean {ms / max(n, 1):.2f} ms, each <= {longest * 1000:g} ms"
        )
    return "\n".join(lines)


async def _pause(cluster: LocalCluster) -> None:
    config = str(cluster.node_processes[0].config_path)
    code, _, err = await run_cli("relay", "pause", "relay-1", "--config", config)
    if code != 0:
        raise RuntimeError(f"smtpfleet relay pause failed: {err}")
    await asyncio.sleep(PAUSE_SETTLE_S)


async def main(args: argparse.Namespace) -> None:
    ensure_postfix_tools()
    sink = SmtpSink()
    follower = asyncio.create_task(sink.follow())
    try:
        print(f"accept latency at {args.rate:.0f} msg/s, {args.messages} messages per run")
        medians = {name: statistics.median(await one_setup(name, sink, args)) for name in SETUPS}
    finally:
        sink.stop()
        follower.cancel()
    print("\nmedian p99 of the runs:")
    for name, p99 in medians.items():
        print(f"  {name:32} {p99:6.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=440.0)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    uvloop.run(main(parser.parse_args()))
