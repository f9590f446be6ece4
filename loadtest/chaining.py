"""The delivery side alone, with and without pipelining across messages on busy sessions.

    python loadtest/chaining.py [--messages 6000] [--rounds 3] [--concurrency 64]
                                [--connections 8]

One `RelayClient` (in this process, on uvloop) sends to Postfix's `smtp-sink` (which
advertises PIPELINING), `--concurrency` messages at a time over at most `--connections`
sessions, so most messages wait for a busy session, as a node's deliveries do under load. Two
modes alternate within each round: chained (a waiting message's envelope goes in the same
write as the body before it) and not (each message's envelope in a write of its own; chaining
is left out as it is for a relay with a per-second budget, which this client, having no shared
limits, never enforces). Each mode is counted until the sink has every message, and prints
wall time, this process's CPU and write system calls per message (`/proc/self/io` `syscw`:
exact, where CPU time on a shared VM is not), and the sink's CPU per message.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import uvloop
from bench import SmtpSink, cpu_seconds

from smtpfleet.config import DeliveryConfig, RelayConfig
from smtpfleet.relays.pool import RelayClient, SessionSettings

BODY = b"Subject: chaining\r\n\r\n" + (b"y" * 76 + b"\r\n") * 25  # about 2 KB, as the bench


def writes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    return 0


def client(sink: SmtpSink, connections: int, chained: bool) -> RelayClient:
    host, port = sink.address.rsplit(":", 1)
    relay = RelayConfig(
        name="sink",
        host=host,
        port=int(port),
        max_connections=connections,
        # A per-second budget turns chaining off; with no shared limits it is never enforced.
        max_messages_per_s=0.0 if chained else 1e9,
    )
    config = DeliveryConfig(connect_timeout_s=5.0, command_timeout_s=30.0)
    return RelayClient(relay, SessionSettings(config, "chaining.bench", lease_ttl_s=30.0))


async def run(sink: SmtpSink, args: argparse.Namespace, chained: bool) -> str:
    relays = client(sink, args.connections, chained)
    await relays.send("s@example.com", ["warm@example.net"], BODY)  # sessions open
    start_count = sink.count + 1
    numbers = iter(range(args.messages))

    async def sender() -> None:
        for n in numbers:
            verdicts = await relays.send(f"s{n}@example.com", [f"r{n}@example.net"], BODY)
            if not all(v.code == 250 for v in verdicts.values()):
                raise RuntimeError(f"message {n}: {verdicts}")

    cpu0, sink0, writes0 = cpu_seconds([os.getpid()]), cpu_seconds([sink.proc.pid]), writes()
    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(args.concurrency)))
    await sink.wait_for(start_count + args.messages - 1)
    wall = time.perf_counter() - started
    n = args.messages
    cpu = (cpu_seconds([os.getpid()]) - cpu0) * 1000 / n
    sink_cpu = (cpu_seconds([sink.proc.pid]) - sink0) * 1000 / n
    await relays.close()
    return (
        f"{'chained' if chained else 'one write per envelope':24} {n / wall:6.0f} msg/s  "
        f"client {cpu:.3f} ms/msg  writes {(writes() - writes0) / n:.2f}/msg  "
        f"sink {sink_cpu:.3f} ms/msg"
    )


async def main(args: argparse.Namespace) -> None:
    sink = SmtpSink()
    follower = asyncio.create_task(sink.follow())
    try:
        for round_ in range(args.rounds):
            order = (True, False) if round_ % 2 == 0 else (False, True)
            for chained in order:
                print(f"round {round_ + 1}: {await run(sink, args, chained)}", flush=True)
    finally:
        sink.stop()
        follower.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--connections", type=int, default=8)
    uvloop.run(main(parser.parse_args()))
