"""Many idle SMTP sessions on one node: its memory, and whether mail still goes through.

    python loadtest/sessions.py [--sessions 10000] [--hold-s 10]

Starts a one-node LocalCluster (Redis + sink on loopback) with `inbound.max_sessions` above
the count, opens that many sessions that read the banner and then idle, measures the node's
RSS from /proc before and with them open, and sends one message on a fresh session at the
same time. Target: under 300 MB with 10,000 idle sessions.
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
        writers: list[asyncio.StreamWriter] = []
        started = time.monotonic()
        for at in range(0, args.sessions, OPEN_BATCH):
            count = min(OPEN_BATCH, args.sessions - at)
            opened = await asyncio.gather(*(idle_session(host, port) for _ in range(count)))
            writers += [w for w in opened if w is not None]
        elapsed_s = time.monotonic() - started
        print(f"{len(writers)} of {args.sessions} sessions open in {elapsed_s:.1f} s")
        reply = await send((host, port))
        await cluster.sink_servers[0].wait_for(1, timeout_s=30)
        print(f"a message through meanwhile: {reply.code}, delivered")
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
    uvloop.run(main(parser.parse_args()))
