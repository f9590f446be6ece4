"""Steady, paced load that records what every sender saw, for drills.

Each message goes over a fresh session to one node and, on a connection failure or a 4xx,
to the next node, as an MTA tries the next MX. Only when every node refused is the failure
"client-visible". Every message is tagged (loadgen.messages.message_bytes), so deliveries can be
reconciled and timed.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from smtpfleet.loadgen.messages import RECIPIENT, SENDER, message_bytes
from smtpfleet.loadgen.session import Session

# What a session that is refused before the DATA reply counts as: no reply code to speak of.
NO_REPLY = 0


@dataclass(frozen=True)
class Sent:
    tag: str
    at: float  # monotonic time the first attempt started
    code: int  # the final reply after failover (0: no node reachable)
    latency_s: float  # of the final attempt: DATA's final dot to the reply
    attempts: int  # nodes tried
    done: float | None = None  # monotonic time the final reply came (None: not recorded)


@dataclass
class PacedLoad:
    targets: Sequence[tuple[str, int]]
    rate: float = 50.0
    size: int = 2048
    timeout_s: float = 12.0
    run_id: str = "drill"
    sent: list[Sent] = field(default_factory=list)
    _stop: bool = False

    def stop(self) -> None:
        self._stop = True

    async def run(self) -> None:
        counter = itertools.count()
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while not self._stop:
                n = next(counter)
                task = asyncio.create_task(self._one(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            # Cancelled (an interrupted drill): the sends in flight end with the run, each
            # closing its session, rather than go on against a cluster being shut down.
            pending = list(tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, n: int) -> None:
        tag = f"{self.run_id}-{n}"
        data = message_bytes(tag, self.size)
        started = time.monotonic()
        code, latency, attempts = 0, 0.0, 0
        for i in range(len(self.targets)):
            attempts += 1
            host, port = self.targets[(n + i) % len(self.targets)]
            code, latency = await self._attempt(host, port, data)
            if code == 250 or 500 <= code < 600:
                break
        self.sent.append(Sent(tag, started, code, latency, attempts, time.monotonic()))

    async def _attempt(self, host: str, port: int, data: bytes) -> tuple[int, float]:
        """One session on the raw-stream client of the load generator (an aiosmtplib client
        per message costs the drill's loop too much at hundreds of messages a second)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    return await _transaction(Session(reader, writer), data)
                finally:
                    writer.write(b"QUIT\r\n")
                    writer.close()
        except _Refused as refused:
            return refused.code, 0.0
        except (OSError, TimeoutError, ValueError):
            return NO_REPLY, 0.0


class _Refused(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


async def _transaction(session: Session, data: bytes) -> tuple[int, float]:
    """Greeting, EHLO, MAIL, RCPT, DATA, the message: its code and the dot-to-reply time."""
    greeting = await session.reply()
    if greeting != 220:
        raise _Refused(greeting)  # e.g. 421 from a draining node
    steps = (
        (b"EHLO loadgen.smtpfleet\r\n", 250),
        (f"MAIL FROM:<{SENDER}>\r\n".encode(), 250),
        (f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250),
        (b"DATA\r\n", 354),
    )
    for command, expected in steps:
        code = await session.command(command)
        if code != expected:
            raise _Refused(code)
    started = time.monotonic()
    code = await session.command(data)
    return code, time.monotonic() - started
