"""A semaphore that serves its waiters by priority: a relay's connection slots, by traffic class.

asyncio.Semaphore wakes waiters in arrival order, so under a bulk backlog a transactional
message would queue behind every bulk message already waiting for one of the relay's
connections. Here the lowest priority number goes first, then arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class Hold:
    """One holder's slot. `passed`: it went straight to a waiter (`pass_on`), so leaving the
    gate frees nothing."""

    passed: bool = False


class PriorityGate(Generic[T]):
    """At most `slots` holders at once; a freed slot goes to the waiter of the lowest
    priority number (0: the first traffic class), in arrival order among equals. A waiter
    may carry a token, through which a holder can hand it its slot directly (`pass_on`)."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future[None], T | None]] = []
        self._arrivals = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, future, _ in self._waiters if not future.done())

    @contextlib.asynccontextmanager
    async def held(self, priority: int = 0, token: T | None = None) -> AsyncIterator[Hold]:
        await self._acquire(priority, token)
        hold = Hold()
        try:
            yield hold
        finally:
            if not hold.passed:
                self._release()

    def pass_on(self, hold: Hold, take: Callable[[T], bool]) -> T | None:
        """Give `hold`'s slot to the next waiter in line, if it carries a token that `take`
        accepts; its token, or None (the slot stays with `hold`). Only the next waiter: one
        further back would overtake it."""
        while self._waiters:
            future, token = self._waiters[0][2:]
            if future.done():  # cancelled while waiting
                heapq.heappop(self._waiters)
                continue
            if token is None or not take(token):
                return None
            heapq.heappop(self._waiters)
            future.set_result(None)
            hold.passed = True
            return token
        return None

    async def _acquire(self, priority: int, token: T | None) -> None:
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._arrivals), future, token))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted as we were cancelled: pass the slot on
            raise

    def _release(self) -> None:
        while self._waiters:
            future = heapq.heappop(self._waiters)[2]
            if not future.done():  # a cancelled waiter's future is done: skip it
                future.set_result(None)
                return
        self._free += 1
