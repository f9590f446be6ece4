"""What a node does per message for a client that pipelines (RFC 2920) and for one that does not.

    python loadtest/pipelining.py [--messages 1500] [--rounds 2] [--sessions 30]

Starts a LocalCluster (Redis with appendfsync always, one node with `durability: fsync`,
`smtp-sink` as its relay), then sends rounds of messages, a new connection each, in two
modes one after the other: lock-step (MAIL, RCPT, DATA, each after the last one's reply) and
pipelined (the three in one write, as a sending MTA does once EHLO offers PIPELINING). Each
mode is counted until its last message reached the sink, and prints the node's CPU per
message and its write system calls per message (`/proc/PID/io` `syscw`: exact, where CPU time
on a shared VM is not).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from pathlib import Path

import uvloop
from bench import SmtpSink, cpu_seconds

from smtpfleet.testing.localcluster import LocalCluster

ENVELOPE = (b"MAIL FROM:<s@example.com>\r\n", b"RCPT TO:<a@example.net>\r\n", b"DATA\r\n")
BODY_LINES = 25  # about 2 KB, as the bench sends


def message(number: int) -> bytes:
    head = b"Subject: pipelining\r\nMessage-ID: <%d@pipelining.bench>\r\n\r\n" % number
    return head + (b"y" * 76 + b"\r\n") * BODY_LINES + b".\r\n"


def writes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("syscw:"):
                total += int(line.split()[1])
    return total


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line or line[3:4] != b"-":
            return line[:3]


async def one_message(address: tuple[str, int], number: int, pipelined: bool) -> bytes:
    """One connection, one message: the final reply's code."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        await _reply(reader)
        writer.write(b"EHLO pipelining.bench\r\n")
        await _reply(reader)
        if pipelined:
            writer.write(b"".join(ENVELOPE))
            codes = [await _reply(reader) for _ in ENVELOPE]
        else:
            codes = []
            for command in ENVELOPE:
                writer.write(command)
                codes.append(await _reply(reader))
        if codes[-1] != b"354":
            return codes[-1]
        writer.write(message(number))
        final = await _reply(reader)
        writer.write(b"QUIT\r\n")
        await _reply(reader)
        return final
    finally:
        writer.close()


async def load(
    address: tuple[str, int],
    numbers: itertools.count[int],
    total: int,
    sessions: int,
    pipelined: bool,
) -> None:
    todo = iter(range(total))

    async def sender() -> None:
        for _ in todo:
            code = await one_message(address, next(numbers), pipelined)
            if code != b"250":
                raise RuntimeError(f"a message got {code!r}")

    await asyncio.gather(*(sender() for _ in range(sessions)))


async def main(args: argparse.Namespace) -> None:
    sink = SmtpSink()
    following = asyncio.create_task(sink.follow())
    overrides = {
        "queue": {"durability": "fsync"},
        "inbound": {"max_sessions": 5000, "accepted_domains": ["example.net"]},
    }
    numbers = itertools.count()  # Message-IDs never repeat: the node drops a repeat
    try:
        async with LocalCluster(
            nodes=1, relays=[sink.address], overrides=overrides, appendfsync="always"
        ) as cluster:
            node = cluster.node_processes[0]
            pids = [node.pid]
            await load(node.smtp, numbers, 300, args.sessions, pipelined=False)  # warm up
            await sink.wait_for(300)
            delivered = 300
            for _ in range(args.rounds):
                for pipelined in (False, True):
                    cpu, calls, started = cpu_seconds(pids), writes(pids), time.perf_counter()
                    await load(node.smtp, numbers, args.messages, args.sessions, pipelined)
                    delivered += args.messages
                    await sink.wait_for(delivered)
                    n = args.messages
                    print(
                        f"{'pipelined' if pipelined else 'lock-step'}: "
                        f"{(cpu_seconds(pids) - cpu) * 1000 / n:.2f} ms node CPU/msg, "
                        f"{(writes(pids) - calls) / n:.2f} writes/msg, "
                        f"{n / (time.perf_counter() - started):.0f} msg/s",
                        flush=True,
                    )
    finally:
        sink.stop()
        following.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=30)
    uvloop.run(main(parser.parse_args()))
