"""Per-client limits: what a client is counted as, and when its counts become a refusal. Pure.

Three counts per client address, kept for the whole cluster by a `ClientCounter`
(inbound/counters.py; the Redis one is queue/client_limits.py):

- concurrent sessions, checked once the client is known (after a PROXY header) and before the
  banner: over the limit, the banner is replaced by 421 4.7.0 and the connection closes;
- MAIL commands in the last minute, checked at MAIL: 451 4.7.1;
- recipients accepted in the last minute, checked at MAIL (the minute is spent) and at each
  RCPT: 451 4.7.1.

"The last minute" is a sliding estimate over two fixed minutes (`sliding`): the previous
minute's count weighted by how much of it is still inside the last 60 s, plus this minute's.
A fixed window alone lets a client send twice the limit across a minute boundary.

`LocalClientCounter` is this node's own count, in memory: the limits when no Redis is
configured, and the fallback of the Redis counter while Redis is away (never no limit).
`DataRate` measures how fast a client sends DATA.
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from smtpfleet import replies
from smtpfleet.config import InboundLimitsConfig

MINUTE_MS: Final = 60_000
MAX_TRACKED_CLIENTS: Final = 100_000  # the in-memory counter forgets the oldest beyond this


class Limit(StrEnum):
    """Each kind of limit: the metric label of its refusals."""

    SESSIONS = "sessions"
    MESSAGES = "messages"
    RECIPIENTS = "recipients"
    DATA_RATE = "data_rate"


@dataclass(frozen=True)
class ClientLimits:
    """The limits per client address; 0 is unlimited."""

    sessions: int = 0
    messages_per_minute: int = 0
    recipients_per_minute: int = 0

    @classmethod
    def from_config(cls, config: InboundLimitsConfig) -> ClientLimits:
        return cls(config.sessions, config.messages_per_minute, config.recipients_per_minute)

    @property
    def enabled(self) -> bool:
        return bool(self.sessions or self.messages_per_minute or self.recipients_per_minute)


@dataclass(frozen=True)
class Usage:
    """A client's use of the last minute, as a MAIL sees it (that MAIL included)."""

    messages: float
    recipients: float

    def at_least(self, other: Usage) -> Usage:
        """The larger of two views of the same client (the cluster's and this node's)."""
        return Usage(max(self.messages, other.messages), max(self.recipients, other.recipients))


def client_key(address: str, ipv6_prefix_length: int) -> str:
    """What a client is counted as: its IPv4 address (also when IPv4-mapped), or its IPv6
    network of the given length (one host often holds a whole /64); anything else as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix_length), strict=False))
    return str(ip)


def minute_of(now_ms: int) -> tuple[int, float]:
    """The fixed minute `now_ms` falls in, and the fraction of it that has passed."""
    minute, into = divmod(now_ms, MINUTE_MS)
    return minute, into / MINUTE_MS


def sliding(previous: float, current: float, elapsed: float) -> float:
    """Events in the last 60 s, estimated from two fixed minutes (Cloudflare's estimate):
    the previous minute's count as if spread evenly, the part of it still in the window."""
    return previous * (1.0 - elapsed) + current


def session_refusal(sessions: int, limits: ClientLimits) -> str | None:
    """The reply instead of the banner, or None; `sessions` includes the new one."""
    if limits.sessions and sessions > limits.sessions:
        return replies.CLIENT_TOO_MANY_SESSIONS
    return None


def mail_refusal(usage: Usage, limits: ClientLimits) -> tuple[Limit, str] | None:
    """Refuse a MAIL when it is one message too many, or the minute's recipients are spent."""
    if limits.messages_per_minute and usage.messages > limits.messages_per_minute:
        return Limit.MESSAGES, replies.CLIENT_TOO_MANY_MESSAGES
    if limits.recipients_per_minute and usage.recipients >= limits.recipients_per_minute:
        return Limit.RECIPIENTS, replies.CLIENT_TOO_MANY_RECIPIENTS
    return None


def rcpt_refusal(at_mail: float, since_mail: int, limits: ClientLimits) -> str | None:
    """Refuse a RCPT when the recipients counted at MAIL plus those accepted since fill the
    minute. (Decided without asking Redis again: see queue/client_limits.py for the bound.)"""
    if limits.recipients_per_minute and at_mail + since_mail >= limits.recipients_per_minute:
        return replies.CLIENT_TOO_MANY_RECIPIENTS
    return None


class LocalClientCounter:
    """A `ClientCounter` of this node's sessions and minutes, in memory (clock in ms)."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self._clock = clock
        self._sessions: dict[str, set[str]] = {}
        # client -> minute -> [messages, recipients]; only the last two minutes are kept
        self._minutes: dict[str, dict[int, list[int]]] = {}

    async def open_session(self, client: str, token: str) -> int:
        tokens = self._sessions.setdefault(client, set())
        tokens.add(token)
        return len(tokens)

    async def close_session(self, client: str, token: str, recipients: int) -> None:
        tokens = self._sessions.get(client, set())
        tokens.discard(token)
        if not tokens:
            self._sessions.pop(client, None)
        if recipients:
            self._add(client, 0, recipients)

    async def add_message(self, client: str, recipients: int) -> Usage:
        minute, elapsed = minute_of(self._clock())
        counts = self._add(client, 1, recipients)
        previous = counts.get(minute - 1, [0, 0])
        current = counts[minute]
        return Usage(
            sliding(previous[0], current[0], elapsed), sliding(previous[1], current[1], elapsed)
        )

    def _add(self, client: str, messages: int, recipients: int) -> dict[int, list[int]]:
        minute, _ = minute_of(self._clock())
        counts = self._minutes.pop(client, {})
        self._minutes[client] = counts  # last in the dict: the most recently counted
        for old in [m for m in counts if m < minute - 1]:
            del counts[old]
        current = counts.setdefault(minute, [0, 0])
        current[0] += messages
        current[1] += recipients
        if len(self._minutes) > MAX_TRACKED_CLIENTS:
            del self._minutes[next(iter(self._minutes))]  # the least recently counted client
        return counts


class DataRate:
    """How fast one DATA arrives: too slow once a whole window has passed since it began and
    the last window brought fewer than `min_bps` bytes per second. Times in seconds."""

    def __init__(self, min_bps: int, window_s: float, started_s: float) -> None:
        self._min_bytes = min_bps * window_s
        self._window_s = window_s
        self._started_s = started_s
        self._seconds: collections.deque[list[int]] = collections.deque()  # [second, bytes]

    def add(self, now_s: float, size: int) -> None:
        second = int(now_s)
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += size
        else:
            self._seconds.append([second, size])
        self._forget(now_s)

    def too_slow(self, now_s: float) -> bool:
        if now_s - self._started_s < self._window_s:
            return False  # the grace: a whole window first
        self._forget(now_s)
        return sum(size for _, size in self._seconds) < self._min_bytes

    def _forget(self, now_s: float) -> None:
        horizon = now_s - self._window_s
        while self._seconds and self._seconds[0][0] + 1 <= horizon:
            self._seconds.popleft()
