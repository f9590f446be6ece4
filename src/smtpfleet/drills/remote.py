"""A cluster the drill did not start: its SMTP endpoints, its Redis, and the recording relays
(`smtpfleet.testing.recording_relay`) it delivers to, read over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from smtpfleet.config import Config
from smtpfleet.drills.measures import takeovers_in
from smtpfleet.testing.sink import ReceivedMessage

HTTP_TIMEOUT_S = 5.0


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as reply:  # noqa: S310 - a URL the target file names
        body: bytes = reply.read()
    return body


@dataclass
class RemoteSink:
    """The record of one recording relay, fetched incrementally (`refresh`)."""

    url: str
    name: str
    messages: list[ReceivedMessage] = field(default_factory=list)
    refused_recipients: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    # One fetch at a time: two that start from the same count would both append the same
    # page, and the next would then skip as many messages (counted twice, and "lost").
    _fetching: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def count(self) -> int:
        return len(self.messages)

    async def refresh(self) -> None:
        async with self._fetching:
            await self._fetch()

    async def _fetch(self) -> None:
        raw = await asyncio.to_thread(fetch, f"{self.url}/received?from={len(self.messages)}")
        page: dict[str, Any] = json.loads(raw)
        # The relay's wall clock to our monotonic one (same host, or NTP-close hosts).
        offset_s = time.monotonic() - time.time()
        self.messages.extend(_as_message(m, offset_s) for m in page["messages"])
        self.refused_recipients = ["?"] * int(page["refused_recipients"])
        self.rejected = ["?"] * int(page["rejected"])


def _as_message(record: dict[str, Any], offset_s: float) -> ReceivedMessage:
    # The Message-ID lines are all the drill reads of a message (its tag; a DSN's original).
    head = "".join(f"Message-ID: {mid}\r\n" for mid in record["message_ids"]) + "\r\n"
    return ReceivedMessage(
        sender=record["sender"],
        recipients=tuple(record["recipients"]),
        data=head.encode(),
        peer="",
        at=float(record["at_unix"]) + offset_s,
    )


@dataclass
class RemoteCluster:
    smtp: Sequence[tuple[str, int]]
    config: Config  # the Redis settings (URL or Sentinels, prefix, shards) of the cluster
    sinks: list[RemoteSink]
    metrics_urls: Sequence[str] = ()
    # The nodes count takeovers since they started, earlier drills' included: this drill's
    # are those beyond the count when it began (`mark_start`).
    takeovers_before: int = 0

    async def refresh(self) -> None:
        await asyncio.gather(*(s.refresh() for s in self.sinks), return_exceptions=True)

    async def mark_start(self) -> None:
        self.takeovers_before = await self._takeovers_total() or 0

    async def takeovers(self) -> int | None:
        """Takeovers since `mark_start` on the nodes' /metrics pages; None when the target
        names none."""
        total = await self._takeovers_total()
        return None if total is None else max(0, total - self.takeovers_before)

    async def _takeovers_total(self) -> int | None:
        if not self.metrics_urls:
            return None
        pages = await asyncio.gather(
            *(asyncio.to_thread(fetch, u) for u in self.metrics_urls), return_exceptions=True
        )
        return sum(takeovers_in(p) for p in pages if isinstance(p, bytes))
