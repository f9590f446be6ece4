"""Many idle SMTP sessions on one node: its memory, and whether mail still goes through.

    python loadtest/sessions.py [--sessions 10000] [--hold-s 10]

Starts a one-node LocalCluster (Redis + sink on loopback) with `inbound.max_sessions` above
the count, opens that many sessions that read the banner and then idle, measures the node's
RSS from /proc before and with them open, and measures the accept rate of new connections
(one message each, `--messages` with `--concurrency` senders) before and while they are open.
Target: under 300 MB with 10,000 idle sessions, and the accept rate kept.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from pathlib import Path

import uvloop

from smtpfleet.testing.client import send
from smtpfleet.testing.localcluster import LocalCluster

OPEN_BATCH = 500  # connections opened at once: below the listener's backlog


async def accept_rate(address: tuple[str, int], messages: int, concurrency: int) -> str:
    """Messages per second and p99 accept latency, a new connection per message."""
    latencies: list[float] = []
    codes: list[int] = []
    queue = iter(range(messages))

    async def sender() -> None:
        for _ in queue:
            started = time.perf_counter()
            codes.append((await send(address)).code)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99_ms = latencies[int(len(latencies) * 0.99) - 1] * 1000
    ok = codes.count(250)
    return f"{ok / elapsed:.0f} msg/s ({ok} of {messages} got 250), p99 {p99_ms:.0f} ms"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def idle_session(host: str, port: int) -> asyncio.StreamWriter | None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
        await asyncio.wait_for(reader.readline(), 30)  # the 220 banner: the session exists
    except (OSError, TimeoutError):
        return None
    return writer


async def main(args: argparse.Namespace) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds them too
    overrides = {"inbound": {"max_sessions": args.sessions + 100}}
    async with LocalCluster(nodes=1, sinks=1, overrides=overrides) as cluster:
        node = cluster.node_processes[0]
        host, port = node.smtp
        before = rss_mb(node.pid)
        rate = args.messages, args.concurrency
        print(f"accepting, no idle sessions: {await accept_rate((host, port), *rate)}")
        writers: list[asyncio.StreamWriter] = []
        started = time.monotonic()
        for at in range(0, args.sessions, OPEN_BATCH):
            count = min(OPEN_BATCH, args.sessions - at)
            opened = await asyncio.gather(*(idle_session(host, port) for _ in range(count)))
            writers += [w for w in opened if w is not None]
        elapsed_s = time.monotonic() - started
        print(f"{len(writers)} of {args.sessions} sessions open in {elapsed_s:.1f} s")
        print(f"accepting, {len(writers)} idle sessions: {await accept_rate((host, port), *rate)}")
        total = args.messages * 2 + 1
        reply = await send((host, port))
        await cluster.sink_servers[0].wait_for(total, timeout_s=60)
        print(f"one more message: {reply.code}; all {total} delivered")
        await asyncio.sleep(args.hold_s)
        during = rss_mb(node.pid)
        per_session_kb = (during - before) * 1024 / max(1, len(writers))
        print(
            f"node RSS: {before:.0f} MB idle, {during:.0f} MB with {len(writers)} sessions "
            f"({per_session_kb:.1f} KB per session)"
        )
        for writer in writers:
            writer.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--hold-s", type=float, default=10.0)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    uvloop.run(main(parser.parse_args()))
