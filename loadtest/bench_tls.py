"""STARTTLS on every connection: does smtpfleet keep its ratio to Postfix? (issue #12)

    sudo python loadtest/bench_tls.py [--messages 3000] [--sessions 50] [--runs 3]

`smtp-source` speaks no TLS, so both shapes here are driven by smtpfleet's own generator
(`run_load`, a new connection per message), once in clear and once upgrading every connection
with STARTTLS, against the same paths as bench.py's headline rows:
  - smtpfleet, 1 node (1 worker, then one worker per core), Redis `appendfsync always` and
    `queue.durability: fsync`;
  - Postfix 3.7 as a relay with `smtpd_tls_security_level = may`;
both with the same throwaway certificate (trustme's ECDSA P-256 key) and TLS 1.2 or newer,
each counted at `smtp-sink` until the last accepted message is delivered. The figure that
matters is the ratio to Postfix in each column: the claim is that TLS does not make it worse.
The generator is Python and does a full handshake per connection (no session resumption): it
takes CPU from the servers on a small machine, equally for every path.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).parent))
import bench  # the sibling script: its sink, Postfix set-up and CPU accounting

from smtpfleet.loadgen import run_load
from smtpfleet.testing.localcluster import LocalCluster
from smtpfleet.testing.tls import TlsFiles, make_tls_files

MODES = ("clear", "STARTTLS")


async def throughput(
    sink: bench.SmtpSink,
    target: tuple[str, int],
    args: argparse.Namespace,
    tls: TlsFiles | None,
    pids: list[int],
) -> tuple[float, float]:
    """msg/s until the last accepted message is at the sink, and node CPU ms per message."""
    before, cpu_before = sink.count, bench.cpu_seconds(pids)
    started = time.perf_counter()
    result = await run_load(
        [target],
        total=args.messages,
        concurrency=args.sessions,
        size=args.size,
        per_session=1,
        starttls=tls.client_context() if tls else None,
    )
    if result.accepted < args.messages:
        raise RuntimeError(f"only {result.accepted} of {args.messages} accepted: {result.codes}")
    await sink.wait_for(before + result.accepted)
    elapsed = time.perf_counter() - started
    cpu_ms = (bench.cpu_seconds(pids) - cpu_before) * 1000 / result.accepted
    return result.accepted / elapsed, cpu_ms


async def measure(
    name: str,
    sink: bench.SmtpSink,
    target: tuple[str, int],
    args: argparse.Namespace,
    tls: TlsFiles,
    pids: list[int],
) -> dict[str, tuple[float, float]]:
    warm = await run_load([target], total=100, concurrency=10, starttls=tls.client_context())
    await sink.wait_for(sink.count)  # nothing of the warm-up still in flight
    del warm
    figures = {}
    for mode in MODES:
        rate, cpu = await throughput(sink, target, args, tls if mode == "STARTTLS" else None, pids)
        cpu_text = f", node CPU {cpu:.2f} ms/msg" if pids else ""
        print(f"  {name}, {mode}: {rate:.0f} msg/s{cpu_text}", flush=True)
        figures[mode] = (rate, cpu)
    return figures


async def smtpfleet(
    sink: bench.SmtpSink, args: argparse.Namespace, tls: TlsFiles, workers: int
) -> dict[str, tuple[float, float]]:
    overrides: dict[str, Any] = {
        "queue": {"durability": "fsync"},
        "inbound": {
            "max_sessions": 5000,
            "tls": {"cert_file": str(tls.cert_file), "key_file": str(tls.key_file)},
        },
        "health": {"interval_s": 5.0},
    }
    cluster = LocalCluster(
        nodes=1, workers=workers, relays=[sink.address], overrides=overrides, appendfsync="always"
    )
    async with cluster:
        node = cluster.node_processes[0]
        name = "smtpfleet, 1 node" + (f" x {workers} workers" if workers > 1 else "")
        return await measure(name, sink, node.smtp, args, tls, [node.pid])


async def one_run(args: argparse.Namespace, tls: TlsFiles) -> dict[str, dict[str, Any]]:
    sink = bench.SmtpSink()
    follower = asyncio.create_task(sink.follow())
    try:
        rows = {"smtpfleet, 1 node": await smtpfleet(sink, args, tls, 1)}
        rows["smtpfleet, 1 node x 2 workers"] = await smtpfleet(sink, args, tls, 2)
        postfix_tls = (
            f"smtpd_tls_cert_file = {tls.cert_file}",
            f"smtpd_tls_key_file = {tls.key_file}",
            "smtpd_tls_security_level = may",
            "smtpd_tls_protocols = >=TLSv1.2",
            "smtpd_tls_received_header = yes",
        )
        with bench.postfix_relay(sink, postfix_tls) as postfix:
            rows["Postfix 3.7 relay"] = await measure(
                "Postfix 3.7 relay", sink, postfix, args, tls, []
            )
        return rows
    finally:
        sink.stop()
        follower.cancel()


def report(runs: list[dict[str, dict[str, Any]]], args: argparse.Namespace) -> None:
    def median(path: str, mode: str, i: int) -> float:
        return statistics.median(run[path][mode][i] for run in runs)

    print(
        f"\n{args.messages} messages of {args.size} B, a new connection per message, "
        f"{args.sessions} concurrent senders (smtpfleet's generator), median of {len(runs)}\n"
    )
    print(
        "| path | clear msg/s | vs Postfix | STARTTLS msg/s | vs Postfix "
        "| node CPU ms/msg clear / TLS |"
    )
    print("|---|---|---|---|---|---|")
    postfix = "Postfix 3.7 relay"
    for path in runs[0]:
        cells = []
        for mode in MODES:
            rate = median(path, mode, 0)
            cells += [f"{rate:,.0f}", f"{rate / median(postfix, mode, 0):.2f}x"]
        cpu = (
            f"{median(path, 'clear', 1):.2f} / {median(path, 'STARTTLS', 1):.2f}"
            if path != postfix
            else "-"
        )
        print(f"| {path} | {' | '.join(cells)} | {cpu} |")


async def main(args: argparse.Namespace) -> None:
    bench.ensure_postfix_tools()
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as directory:
        tls = make_tls_files(Path(directory))
        runs = []
        for i in range(args.runs):
            print(f"run {i + 1} of {args.runs}", flush=True)
            runs.append(await one_run(args, tls))
    report(runs, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3_000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=1)
    uvloop.run(main(parser.parse_args()))
