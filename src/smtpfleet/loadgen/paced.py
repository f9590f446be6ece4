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

import aiosmtplib

from smtpfleet.loadgen.messages import RECIPIENT, SENDER, message_bytes


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
        while not self._stop:
            n = next(counter)
            task = asyncio.create_task(self._one(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if tasks:
            await asyncio.gather(*tasks)

    async def _one(self, n: int) -> None:
        tag = f"{self.run_id}-{n}"
        data = message_bytes(tag, self.size)[:-3]  # aiosmtplib adds the final dot itself
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
        client = aiosmtplib.SMTP(hostname=host, port=port, timeout=self.timeout_s, start_tls=False)
        try:
            async with client:
                await client.mail(SENDER)
                await client.rcpt(RECIPIENT)
                started = time.monotonic()
                response = await client.data(data)
                return response.code, time.monotonic() - started
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, 0.0
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return 0, 0.0
