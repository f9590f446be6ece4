"""A lean SMTP load generator: many concurrent sessions, each reusing its connection.

It speaks SMTP over raw asyncio streams (no per-message client objects) so that one process
can drive a few thousand messages a second, and it measures what a sender sees: the reply
code of every message and the accept latency (final dot sent → reply read).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    sent: int = 0
    codes: collections.Counter[int] = field(default_factory=collections.Counter)
    latencies_s: list[float] = field(default_factory=list)
    accepted_ids: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def accepted(self) -> int:
        return self.codes[250]

    def percentile_ms(self, fraction: float) -> float:
        if not self.latencies_s:
            return 0.0
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def message_bytes(tag: str, size: int) -> bytes:
    head = (
        f"From: <load@example.com>\r\nTo: <sink@example.net>\r\nSubject: load {tag}\r\n"
        f"Message-ID: <{tag}@loadgen.smtpfleet>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body + b".\r\n"


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self) -> int:
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            if line[3:4] != b"-":
                return int(line[:3])

    async def command(self, text: bytes) -> int:
        self.writer.write(text)
        return await self.reply()

    async def send(self, data: bytes) -> int:
        """MAIL, RCPT, DATA and the message; the final reply code."""
        for command in (b"MAIL FROM:<load@example.com>\r\n", b"RCPT TO:<sink@example.net>\r\n"):
            code = await self.command(command)
            if code != 250:
                await self.command(b"RSET\r\n")
                return code
        code = await self.command(b"DATA\r\n")
        if code != 354:
            return code
        return await self.command(data)


async def _open(host: str, port: int) -> _Session:
    reader, writer = await asyncio.open_connection(host, port)
    session = _Session(reader, writer)
    if await session.reply() != 220:
        raise ConnectionError("no 220 greeting")
    if await session.command(b"EHLO loadgen.smtpfleet\r\n") != 250:
        raise ConnectionError("EHLO refused")
    return session


async def run_load(
    targets: Sequence[tuple[str, int]],
    *,
    total: int,
    concurrency: int = 50,
    size: int = 2048,
    per_session: int = 100,
) -> LoadResult:
    """Send `total` messages over `concurrency` sessions spread across `targets`."""
    result = LoadResult()
    counter = itertools.count()
    run_id = uuid.uuid4().hex[:8]
    endpoints = itertools.cycle(targets)

    async def client() -> None:
        session: _Session | None = None
        used = 0
        while (n := next(counter)) < total:
            tag = f"{run_id}-{n}"
            data = message_bytes(tag, size)
            try:
                if session is None or used >= per_session:
                    if session is not None:
                        session.writer.close()
                    session, used = await _open(*next(endpoints)), 0
                started = time.perf_counter()
                code = await session.send(data)
                result.latencies_s.append(time.perf_counter() - started)
                used += 1
            except (OSError, ConnectionError, ValueError):
                code, session = 0, None
            result.sent += 1
            result.codes[code] += 1
            if code == 250:
                result.accepted_ids.append(tag)
        if session is not None:
            session.writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - started
    return result
