"""This process's own accepts, handed to this process's own reader from memory.

A reader often gets a new entry before its accept is confirmed (the entry is visible as soon
as the `ENQUEUE` script ran; the `WAITAOF`/`WAIT` and the `ok` mark come after), and would then
poll the body's mark in Redis (docs/architecture.md, the delivery path). When the accept ran
in this very process, the accept path already holds the body and learns the outcome first: the
reader waits for that outcome instead, and takes the body from memory once it is confirmed.
Anything else (another process's accept, a failed or duplicate accept, a body no longer held)
goes the Redis way, as before: this only ever saves round trips, it decides nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

# A body waits this long for a reader of this process (which takes a fresh entry within
# milliseconds, unless a backlog is ahead of it); after that, another process most likely read
# its entry. It also bounds how long a reader waits here for an accept still in flight; after
# that the reader polls Redis as before.
KEEP_S: Final = 3.0
# At most this much message data is held; beyond it, new accepts are not held (the reader
# loads their bodies from Redis).
MAX_BYTES: Final = 16 * 1024 * 1024


@dataclass(slots=True)
class _Held:
    data: bytes
    since: float
    confirmed: asyncio.Future[bool]


class LocalAccepts:
    """Bodies of this process's accepts, from just before the write until a reader takes them."""

    def __init__(
        self,
        *,
        keep_s: float = KEEP_S,
        max_bytes: int = MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keep_s = keep_s
        self._max_bytes = max_bytes
        self._clock = clock
        # In the order accepts began, oldest first (O(1) at the front, unlike a dict's).
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._bytes = 0

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._held)

    def begin(self, qid: str, data: bytes) -> bool:
        """Hold the body of an accept about to be written; False: not held (no room)."""
        now = self._clock()
        self._expire(now)
        if self._bytes + len(data) > self._max_bytes or qid in self._held:
            return False
        future = asyncio.get_running_loop().create_future()
        self._held[qid] = _Held(data, now, future)
        self._bytes += len(data)
        return True

    def settle(self, qid: str, confirmed: bool) -> None:
        """The accept's outcome: confirmed (the client gets 250 for this copy), or not."""
        held = self._held.get(qid)
        if held is None:
            return
        if confirmed:
            if not held.confirmed.done():
                held.confirmed.set_result(True)
        else:
            self._drop(qid)

    async def take(self, qid: str) -> bytes | None:
        """The body of an accept of this process, once confirmed; None: not held here, or
        not confirmed (failed, a duplicate, or still unsettled when its time ran out)."""
        self._expire(self._clock())
        held = self._held.get(qid)
        if held is None:
            return None
        # Shielded: a reader cancelled while it waits must not cancel the outcome itself.
        confirmed = await asyncio.shield(held.confirmed)
        if self._held.get(qid) is held:
            self._drop(qid)
        return held.data if confirmed else None

    def _expire(self, now: float) -> None:
        while self._held:
            qid = next(iter(self._held))
            if now - self._held[qid].since < self._keep_s:
                break
            self._drop(qid)

    def _drop(self, qid: str) -> None:
        held = self._held.pop(qid)
        self._bytes -= len(held.data)
        if not held.confirmed.done():
            held.confirmed.set_result(False)  # a reader waiting here goes the Redis way
