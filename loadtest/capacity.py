"""Redis cost per message, measured: what docs/capacity.md states, with the command beside it.

    python loadtest/capacity.py [--messages 2000] [--size 10000] [--shards 16]
                                [--durability server|fsync]

One in-process node against a fresh Redis (127.0.0.1, `appendfsync everysec`), one relay (a
sink on loopback). Phases, each read from Redis's own counters (INFO commandstats, memory,
cpu, stats, replication) before and after, minus the background the idle node costs
(heartbeats, health views, the retry scheduler's polls) over the same time:
  1. accept with the relay down: the messages wait in the stream; commands, network bytes,
     replication-stream bytes and Redis CPU per accept, and `used_memory` per queued message;
  2. deliver: the relay comes up and the backlog drains; the same per delivery;
  3. retry: every message is first refused with 451 at RCPT (it goes to the retry set), then
     delivered; the cost of a retry cycle is this phase minus an accept and a delivery.
Prints one table; `--json` for the raw figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from smtpfleet.node import Node
from smtpfleet.testing import make_message, node_config, running_node, send
from smtpfleet.testing.redis_server import RedisServer, free_port
from smtpfleet.testing.sink import Sink

BUSY = "busy@example.net"
SENDERS = 20  # concurrent SMTP sessions (a new one per message, like MX traffic)
IDLE_S = 3.0
CPU_FIELDS = ("used_cpu_sys", "used_cpu_user")
MIN_CALLS = 0.05


@dataclass
class Snapshot:
    at: float
    calls: dict[str, int]
    memory: int
    cpu_s: float
    net_in: int
    net_out: int
    aof_size: int

    @classmethod
    async def take(cls, client: Any) -> Snapshot:
        info = await client.info("everything")
        calls = {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in info.items()
            if name.startswith("cmdstat_")
        }
        return cls(
            at=time.monotonic(),
            calls=calls,
            memory=int(info["used_memory"]),
            cpu_s=sum(float(info[f]) for f in CPU_FIELDS),
            net_in=int(info["total_net_input_bytes"]),
            net_out=int(info["total_net_output_bytes"]),
            aof_size=int(info["aof_current_size"]),
        )


@dataclass
class Cost:
    """What one phase cost Redis, per message, with the idle background taken out."""

    calls: dict[str, float] = field(default_factory=dict)
    memory_b: float = 0.0
    cpu_us: float = 0.0
    net_in_b: float = 0.0
    net_out_b: float = 0.0
    aof_b: float = 0.0

    @property
    def commands(self) -> float:
        """The commands a message causes (at least 0.05 per message; idle polls left out)."""
        return sum(v for v in self.calls.values() if v >= MIN_CALLS)

    def minus(self, *others: Cost) -> Cost:
        calls = dict(self.calls)
        for other in others:
            for name, n in other.calls.items():
                calls[name] = calls.get(name, 0.0) - n
        return Cost(
            calls={k: v for k, v in calls.items() if abs(v) >= 0.005},
            memory_b=self.memory_b - sum(o.memory_b for o in others),
            cpu_us=self.cpu_us - sum(o.cpu_us for o in others),
            net_in_b=self.net_in_b - sum(o.net_in_b for o in others),
            net_out_b=self.net_out_b - sum(o.net_out_b for o in others),
            aof_b=self.aof_b - sum(o.aof_b for o in others),
        )


def cost(before: Snapshot, after: Snapshot, idle: Cost, messages: int) -> Cost:
    """Per message. Commands are net of `idle` (the background per second, scaled to the
    phase's duration: polls a busy node replaces by real work come out negative); CPU, bytes
    and memory are gross, so the idle node's share is in them (an upper bound)."""
    seconds = after.at - before.at
    names = set(after.calls) | set(idle.calls)
    calls = {
        n: (after.calls.get(n, 0) - before.calls.get(n, 0) - idle.calls.get(n, 0.0) * seconds)
        / messages
        for n in names
    }
    return Cost(
        calls={k: v for k, v in calls.items() if abs(v) >= 0.005},
        memory_b=(after.memory - before.memory) / messages,
        cpu_us=(after.cpu_s - before.cpu_s) / messages * 1e6,
        net_in_b=(after.net_in - before.net_in) / messages,
        net_out_b=(after.net_out - before.net_out) / messages,
        aof_b=(after.aof_size - before.aof_size) / messages,
    )


async def measure(
    client: Any, idle: Cost, messages: int, phase: Callable[[], Awaitable[None]]
) -> tuple[Cost, float]:
    before = await Snapshot.take(client)
    await phase()
    after = await Snapshot.take(client)
    return cost(before, after, idle, messages), after.at - before.at


async def send_all(node: Node, count: int, body: str, recipient: str) -> None:
    """`count` messages, each its own Message-ID (the same one twice is deduplicated)."""
    address = node.inbound.addresses[0]
    left = iter(range(count))

    async def sender() -> None:
        for _ in left:
            data = make_message(recipients=[recipient], body=body)
            reply = await send(address, recipients=[recipient], data=data)
            if reply.code != 250:
                raise RuntimeError(f"accept refused: {reply.code} {reply.text}")

    await asyncio.gather(*(sender() for _ in range(SENDERS)))


async def until(predicate: Callable[[], Awaitable[bool] | bool], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("capacity: a phase did not finish in time")
        await asyncio.sleep(0.05)


def body_of(size: int) -> str:
    line = "x" * 76 + "\r\n"
    return (line * (size // len(line) + 1))[:size]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n, body = args.messages, body_of(args.size)
    port = free_port()
    # No AOF rewrite while measuring: the file's growth is the bytes each message writes.
    with RedisServer(extra_args=["--auto-aof-rewrite-percentage", "0"]) as server:
        sink = Sink(port=port, record=False)
        overrides = {
            "redis": {"shards": args.shards},
            "queue": {"durability": args.durability},
            # The scheduler polls every shard at its default interval (the test bench's is
            # 0.1 s); a refused message comes back after a second.
            "retry": {"initial_s": 1.0, "max_s": 1.0, "scheduler_interval_s": 1.0},
            "delivery": {"concurrency": 16},
            "cluster": {"heartbeat_interval_s": 1.0, "lease_s": 5.0, "lease_refresh_s": 2.0},
            "health": {"interval_s": 1.0, "timeout_s": 1.0},
        }
        config = node_config(server.url, [f"127.0.0.1:{port}"], overrides)
        client = aioredis.Redis.from_url(server.url)
        try:
            async with running_node(config) as node:
                return await _phases(node, client, sink, n, body)
        finally:
            await sink.stop()
            await client.aclose()


async def _idle(client: Any, seconds: float = IDLE_S) -> Cost:
    """What the idle node costs Redis per second (the retry scheduler polls every shard)."""
    before = await Snapshot.take(client)
    await asyncio.sleep(seconds)
    return cost(before, await Snapshot.take(client), Cost(), 1)


async def _phases(node: Node, client: Any, sink: Sink, n: int, body: str) -> dict[str, Any]:
    await asyncio.sleep(3.0)  # the relay is seen down; the node settles
    idle_down = await _idle(client)
    accept, accept_s = await measure(
        client, idle_down, n, lambda: send_all(node, n, body, "rcpt@example.net")
    )
    stats = await node.queue.stats(2**50)
    queued = stats["ready"] + stats["in_flight"]

    async def deliver() -> None:
        await sink.start()
        await until(lambda: sink.count >= n)
        await until(_settled(node))

    before = await Snapshot.take(client)
    await deliver()
    after = await Snapshot.take(client)
    idle_up = await _idle(client)  # the relay up, nothing queued
    delivered = cost(before, after, idle_up, n)

    async def retry() -> None:
        sink.faults.rcpt_replies = {BUSY: "451 4.2.1 Mailbox busy, try later"}
        await send_all(node, n, body, BUSY)
        await until(lambda: len(sink.refused_recipients) >= n)
        sink.faults.rcpt_replies = {}
        await until(lambda: sink.count >= 2 * n)
        await until(_settled(node))

    cycle, retry_s = await measure(client, idle_up, n, retry)
    attempts = len(sink.refused_recipients)
    retried = cycle.minus(accept, delivered)
    scale = n / attempts  # per refused attempt: a message may have been refused twice
    per_retry = Cost(
        {k: v * scale for k, v in retried.calls.items()},
        retried.memory_b * scale,
        retried.cpu_us * scale,
        retried.net_in_b * scale,
        retried.net_out_b * scale,
        retried.aof_b * scale,
    )
    return {
        "messages": n,
        "message_bytes": len(make_message(body=body)),
        "queued_while_relay_down": queued,
        "idle_per_s_relay_down": idle_down.__dict__,
        "idle_per_s_relay_up": idle_up.__dict__,
        "accept": {**accept.__dict__, "seconds": accept_s},
        "deliver": {**delivered.__dict__, "seconds": after.at - before.at},
        "retry": {**per_retry.__dict__, "seconds": retry_s, "refused_attempts": attempts},
    }


def _settled(node: Node) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        stats = await node.queue.stats(2**50)
        return stats["ready"] + stats["in_flight"] + stats["retry"] == 0

    return check


def report(figures: dict[str, Any]) -> str:
    lines = [
        f"{figures['messages']} messages of {figures['message_bytes']} bytes; "
        f"{figures['queued_while_relay_down']:.0f} queued while the relay was down",
        f"{'per msg':<10}{'secs':>6}{'commands':>9}{'CPU us':>8}{'net in B':>10}{'net out B':>10}"
        f"{'AOF B':>9}{'memory B':>10}  commands",
    ]
    for phase in ("accept", "deliver", "retry"):
        c = figures[phase]
        calls = sum(v for v in c["calls"].values() if v >= MIN_CALLS)
        top = " ".join(
            f"{k}={v:.2f}"
            for k, v in sorted(c["calls"].items(), key=lambda kv: -kv[1])
            if v >= MIN_CALLS
        )
        lines.append(
            f"{phase:<10}{c['seconds']:>6.1f}{calls:>9.1f}{c['cpu_us']:>8.0f}{c['net_in_b']:>10.0f}"
            f"{c['net_out_b']:>10.0f}{c['aof_b']:>9.0f}{c['memory_b']:>10.0f}  {top}"
        )
    cpu = figures["accept"]["cpu_us"] + figures["deliver"]["cpu_us"]
    lines.append(
        f"Redis CPU per message accepted and delivered: {cpu:.0f} us (idle share included) "
        f"-> about {1e6 / cpu:,.0f} messages/s per Redis core"
    )
    for state in ("down", "up"):
        idle = figures[f"idle_per_s_relay_{state}"]
        lines.append(
            f"idle node, relay {state}: {sum(idle['calls'].values()):.0f} commands/s "
            f"(subtracted from the counts), {idle['cpu_us'] / 1e4:.1f} % of a Redis core"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=10_000, help="body bytes per message")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--durability", choices=["server", "fsync"], default="server")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    print(json.dumps(figures, indent=2) if args.json else report(figures))


if __name__ == "__main__":
    main()
