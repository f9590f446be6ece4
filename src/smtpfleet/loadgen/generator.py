"""A lean SMTP load generator: many concurrent sessions, each reusing its connection.

It speaks SMTP over raw asyncio streams (no per-message client objects) so that one process
can drive a few thousand messages a second, and it measures what a sender sees: the reply
code of every message and the accept latency (final dot sent → reply read). Every message
carries a unique tag in its Message-ID, so the sinks can be reconciled against what was
accepted.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from smtpfleet.loadgen.messages import RECIPIENT, SENDER, message_bytes


@dataclass
class LoadResult:
    run_id: str = ""
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

    def summary(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "accepted": self.accepted,
            "elapsed_s": round(self.elapsed_s, 3),
            "accepted_per_s": round(self.accepted / self.elapsed_s, 1) if self.elapsed_s else 0,
            "codes": {str(code): n for code, n in sorted(self.codes.items())},
            "latency_ms": {
                "p50": round(self.percentile_ms(0.50), 2),
                "p90": round(self.percentile_ms(0.90), 2),
                "p99": round(self.percentile_ms(0.99), 2),
                "max": round(max(self.latencies_s, default=0) * 1000, 2),
            },
        }


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

    async def send(self, data: bytes) -> tuple[int, float | None]:
        """MAIL, RCPT, DATA and the message: the final reply code, and the accept latency
        (the message with its final dot written to its reply read; None when not sent)."""
        for command in (f"MAIL FROM:<{SENDER}>\r\n", f"RCPT TO:<{RECIPIENT}>\r\n"):
            code = await self.command(command.encode())
            if code != 250:
                await self.command(b"RSET\r\n")
                return code, None
        code = await self.command(b"DATA\r\n")
        if code != 354:
            return code, None
        started = time.perf_counter()
        code = await self.command(data)
        return code, time.perf_counter() - started


async def _open(
    host: str, port: int, timeout_s: float, starttls: ssl.SSLContext | None = None
) -> _Session:
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
        session = _Session(reader, writer)
        try:
            if await session.reply() != 220:
                raise ConnectionError("no 220 greeting")
            await _ehlo(session)
            if starttls is not None:
                if await session.command(b"STARTTLS\r\n") != 220:
                    raise ConnectionError("STARTTLS refused")
                await writer.start_tls(starttls, server_hostname=host)
                await _ehlo(session)  # RFC 3207 §4.2: the session starts over under TLS
        except BaseException:
            writer.close()
            raise
    return session


async def _ehlo(session: _Session) -> None:
    if await session.command(b"EHLO loadgen.smtpfleet\r\n") != 250:
        raise ConnectionError("EHLO refused")


class _Pacer:
    """Spreads sends evenly at `rate` per second across all sessions (None: as fast as can be)."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1 / rate if rate else 0.0
        self._next = time.perf_counter()

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.perf_counter()
        slot, self._next = max(self._next, now), max(self._next, now) + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


class _Run:
    """What every client of one run shares: the message numbers, targets, pace and result."""

    def __init__(
        self,
        targets: Sequence[tuple[str, int]],
        *,
        total: int | None,
        duration_s: float | None,
        rate: float | None,
        size: int,
        per_session: int,
        timeout_s: float,
        starttls: ssl.SSLContext | None = None,
    ) -> None:
        self.result = LoadResult(run_id=uuid.uuid4().hex[:10])
        self.endpoints = itertools.cycle(targets)
        self.pacer = _Pacer(rate)
        self.size = size
        self.per_session = per_session
        self.timeout_s = timeout_s
        self.starttls = starttls
        self._counter = itertools.count()
        self._total = total
        self._deadline = time.perf_counter() + duration_s if duration_s else float("inf")

    def next_number(self) -> int | None:
        """The next message's number, or None once the count or the duration is reached."""
        n = next(self._counter)
        if (self._total is not None and n >= self._total) or time.perf_counter() >= self._deadline:
            return None
        return n

    def record(self, tag: str, code: int) -> None:
        self.result.sent += 1
        self.result.codes[code] += 1
        if code == 250:
            self.result.accepted_ids.append(tag)


class _Client:
    """One sender: a session reused for `per_session` messages, reopened after 421 or an error."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._session: _Session | None = None
        self._used = 0

    async def run(self) -> None:
        while (n := self._run.next_number()) is not None:
            await self._run.pacer.wait()
            tag = f"{self._run.result.run_id}-{n}"
            self._run.record(tag, await self._send(tag))
        self._close()

    async def _send(self, tag: str) -> int:
        """One message; its final reply code, 0 when the session failed."""
        run = self._run
        try:
            session = await self._ready_session()
            async with asyncio.timeout(run.timeout_s):
                code, latency_s = await session.send(message_bytes(tag, run.size))
            if latency_s is not None:
                run.result.latencies_s.append(latency_s)
            self._used += 1
            if code == 421:
                self._close()
        except (OSError, ConnectionError, ValueError, TimeoutError):
            self._session = None
            return 0
        return code

    async def _ready_session(self) -> _Session:
        if self._session is None or self._used >= self._run.per_session:
            self._close()
            host, port = next(self._run.endpoints)
            self._session = await _open(host, port, self._run.timeout_s, self._run.starttls)
            self._used = 0
        return self._session

    def _close(self) -> None:
        if self._session is not None:
            self._session.writer.close()
            self._session = None


async def run_load(
    targets: Sequence[tuple[str, int]],
    *,
    total: int | None = None,
    duration_s: float | None = None,
    rate: float | None = None,
    concurrency: int = 50,
    size: int = 2048,
    per_session: int = 100,
    timeout_s: float = 30.0,
    on_progress: Callable[[LoadResult], None] | None = None,
    starttls: ssl.SSLContext | None = None,
) -> LoadResult:
    """Send `total` messages, or for `duration_s`, over `concurrency` sessions; with a TLS
    context, every connection upgrades with STARTTLS before its first message."""
    if total is None and duration_s is None:
        raise ValueError("give a message count or a duration")
    run = _Run(
        targets,
        total=total,
        duration_s=duration_s,
        rate=rate,
        size=size,
        per_session=per_session,
        timeout_s=timeout_s,
        starttls=starttls,
    )
    result = run.result
    started = time.perf_counter()
    progress = asyncio.create_task(_report(result, on_progress)) if on_progress else None
    await asyncio.gather(*(_Client(run).run() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - started
    if progress is not None:
        progress.cancel()
    if on_progress is not None:
        on_progress(result)
    return result


async def _report(result: LoadResult, on_progress: Callable[[LoadResult], None]) -> None:
    while True:
        await asyncio.sleep(0.5)
        on_progress(result)
