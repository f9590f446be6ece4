"""A lean SMTP load generator: many concurrent sessions, each reusing its connection.

It speaks SMTP over raw asyncio streams (`session`: no per-message client objects) so that
one process can drive a few thousand messages a second, and it measures what a sender sees:
the reply code of every message, the accept latency (final dot sent → reply read), and why
messages were not accepted (the first few distinct causes: connection refused, a name that
does not resolve, the server's own refusal). Every message carries a unique tag in its
Message-ID, so the sinks can be reconciled against what was accepted.

A run ends when its count is sent or its duration is up (no message starts after it; the
replies to those sent are still read), or when `stop` is set (Ctrl-C): then the sends in
flight are abandoned and the result says `interrupted`.
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
from typing import Any

from smtpfleet.loadgen.messages import message_bytes
from smtpfleet.loadgen.session import (
    GREETING_TIMEOUT_S,
    Session,
    SessionError,
    open_session,
    seconds,
)

NO_REPLY = 0  # the code recorded for a message that got no final reply
OPEN_GRACE_S = 2.0  # the least a session's connection and greeting may take, run ending or not
MAX_CAUSES = 5  # distinct causes of failure kept (with counts); the rest are only counted
OTHER_CAUSES = "(other causes)"


@dataclass
class LoadResult:
    run_id: str = ""
    sent: int = 0
    codes: collections.Counter[int] = field(default_factory=collections.Counter)
    latencies_s: list[float] = field(default_factory=list)
    accepted_ids: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    # Why messages were not accepted: the first MAX_CAUSES distinct causes, each with its count
    # (OTHER_CAUSES: the count of every later one).
    causes: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False  # stopped by `stop` (Ctrl-C) before its count or duration

    @property
    def accepted(self) -> int:
        return self.codes[250]

    def note_cause(self, cause: str) -> None:
        if cause in self.causes or len(self.causes) < MAX_CAUSES:
            self.causes[cause] = self.causes.get(cause, 0) + 1
        else:
            self.causes[OTHER_CAUSES] = self.causes.get(OTHER_CAUSES, 0) + 1

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
            "causes": dict(self.causes),
            "interrupted": self.interrupted,
        }


class _Pacer:
    """Spreads sends evenly at `rate` per second across all sessions (None: as fast as can be)."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1 / rate if rate else 0.0
        self._next = time.perf_counter()

    async def wait(self, deadline: float) -> bool:
        """Wait for the next send's slot; False when that slot is past `deadline`, once the
        deadline has come (a rate of 0.05 msg/s in a 3 s run sent its second message at
        20 s: the run lasts its duration, and its rate is what was asked for)."""
        if not self._interval:
            return time.perf_counter() < deadline
        now = time.perf_counter()
        slot, self._next = max(self._next, now), max(self._next, now) + self._interval
        if slot >= deadline:
            await asyncio.sleep(max(0.0, deadline - now))
            return False
        if slot > now:
            await asyncio.sleep(slot - now)
        return True


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
        self.deadline = time.perf_counter() + duration_s if duration_s else float("inf")

    def next_number(self) -> int | None:
        """The next message's number, or None once the count or the duration is reached."""
        n = next(self._counter)
        if (self._total is not None and n >= self._total) or time.perf_counter() >= self.deadline:
            return None
        return n

    def record(self, tag: str, code: int, cause: str | None = None) -> None:
        self.result.sent += 1
        self.result.codes[code] += 1
        if code == 250:
            self.result.accepted_ids.append(tag)
        elif cause is not None:
            self.result.note_cause(cause)


class _Client:
    """One sender: a session reused for `per_session` messages, reopened after 421 or an error."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._session: Session | None = None
        self._used = 0

    async def run(self) -> None:
        try:
            while (n := self._run.next_number()) is not None:
                if not await self._run.pacer.wait(self._run.deadline):
                    return
                tag = f"{self._run.result.run_id}-{n}"
                self._run.record(tag, *await self._send(tag))
        finally:  # also when the run is stopped (cancelled) mid-message
            self._close()

    async def _send(self, tag: str) -> tuple[int, str | None]:
        """One message: its final reply code (NO_REPLY when the session failed), and why it
        was not accepted (None when it was)."""
        run = self._run
        try:
            session = await self._ready_session()
        except OSError as exc:  # SessionError, which says what went wrong, is one
            return NO_REPLY, str(exc)
        try:
            async with asyncio.timeout(run.timeout_s):
                code, latency_s = await session.send(message_bytes(tag, run.size))
        except (TimeoutError, OSError) as exc:  # SessionError is an OSError
            self._close()
            return NO_REPLY, _cause(session, exc, run.timeout_s)
        if latency_s is not None:
            run.result.latencies_s.append(latency_s)
        self._used += 1
        if code == 421 or not session.usable:
            self._close()
        return code, None if code == 250 else session.refused()

    async def _ready_session(self) -> Session:
        if self._session is None or self._used >= self._run.per_session:
            self._close()
            host, port = next(self._run.endpoints)
            # A session opened near the end of a --duration run waits for its connection and
            # greeting only as long as the run has left, but at least OPEN_GRACE_S (a healthy
            # server greets in milliseconds): a server that never greets (an HTTP server)
            # cannot stretch a 2 s run to the greeting timeout.
            left_s = self._run.deadline - time.perf_counter()
            greeting_s = min(GREETING_TIMEOUT_S, max(left_s, OPEN_GRACE_S))
            self._session = await open_session(
                host, port, self._run.timeout_s, self._run.starttls, greeting_s
            )
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
    stop: asyncio.Event | None = None,
) -> LoadResult:
    """Send `total` messages, or for `duration_s`, over `concurrency` sessions; with a TLS
    context, every connection upgrades with STARTTLS before its first message. Setting `stop`
    ends the run at once: what was sent so far is the result, marked `interrupted`."""
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
    clients = asyncio.gather(*(_Client(run).run() for _ in range(concurrency)))
    try:
        result.interrupted = await _until_done_or_stopped(clients, stop)
    except BaseException:
        # Cancelled from outside (an interrupted drill measuring its peak): the senders stop
        # too, each closing its session, before the cancellation goes on.
        clients.cancel()
        await asyncio.gather(clients, return_exceptions=True)
        raise
    finally:
        if progress is not None:
            progress.cancel()
    result.elapsed_s = time.perf_counter() - started
    if on_progress is not None:
        on_progress(result)
    return result


async def _report(result: LoadResult, on_progress: Callable[[LoadResult], None]) -> None:
    while True:
        await asyncio.sleep(0.5)
        on_progress(result)


def _cause(session: Session, exc: Exception, timeout_s: float) -> str:
    if isinstance(exc, SessionError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"{session.where}: no reply to {session.step} within {seconds(timeout_s)} s"
    reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
    return f"{session.where}: {reason} at {session.step}"


async def _until_done_or_stopped(clients: asyncio.Future[Any], stop: asyncio.Event | None) -> bool:
    """Wait for the clients to finish; True when `stop` came first (they are then cancelled,
    each closing its session)."""
    if stop is None:
        await clients
        return False
    stopped: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
    either: set[asyncio.Future[object]] = {clients, stopped}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if clients.done():
        clients.result()  # an error of a client surfaces here, as it did without `stop`
        return False
    clients.cancel()
    await asyncio.gather(clients, return_exceptions=True)
    return True
