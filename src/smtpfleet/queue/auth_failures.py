"""Failed SMTP AUTH attempts per client IP, counted for the whole cluster in Redis.

One key per client IP (`Keys.auth_failures`) holds the count of its failures in a fixed window:
the first failure creates it with the window as its expiry, later ones increment it (``SET NX
PX`` then ``INCR`` in one transaction, so a key never lives without its expiry). A client that
spreads its guesses over every node meets the same count on each.

When Redis is away the node still counts on its own (`fallback`, this node's counter, which
sees every failure here either way): the limit becomes per node, never none. Each call waits
for Redis at most `timeout_s`, so a slow Redis slows an AUTH attempt by that much at most.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import redis.asyncio as aioredis

from smtpfleet.errors import QueueUnavailable
from smtpfleet.queue.keys import Keys
from smtpfleet.queue.redis_queue import guarded

if TYPE_CHECKING:
    from smtpfleet.inbound.failures import FailureCounter

log = logging.getLogger(__name__)

TIMEOUT_S: Final = 1.0


class RedisFailureCounter:
    """A `FailureCounter` shared by every node through Redis, per node when Redis is away."""

    def __init__(
        self,
        redis: aioredis.Redis | aioredis.RedisCluster,
        keys: Keys,
        *,
        window_s: float,
        fallback: FailureCounter,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._window_ms = max(1, round(window_s * 1000))
        self._fallback = fallback
        self._timeout_s = timeout_s
        self._away = False  # Redis failed last time: logged once per outage

    async def failures(self, client: str) -> int:
        here = await self._fallback.failures(client)
        shared = await self._ask(lambda: self._redis.get(self._keys.auth_failures(client)))
        return max(here, int(shared or 0))

    async def add_failure(self, client: str) -> int:
        here = await self._fallback.add_failure(client)
        shared = await self._ask(lambda: self._add(self._keys.auth_failures(client)))
        return max(here, int(shared or 0))

    async def _add(self, key: str) -> Any:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(key, 0, px=self._window_ms, nx=True)
            pipe.incr(key)
            _, count = await pipe.execute()
        return count

    async def _ask(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Redis's answer, or None (and this node's count is used) when it is away."""
        try:
            async with asyncio.timeout(self._timeout_s):
                answer = await guarded(call)
        except (QueueUnavailable, TimeoutError) as exc:
            if not self._away:
                log.warning("AUTH failure limit is per node while Redis is away: %s", exc)
            self._away = True
            return None
        if self._away:
            log.info("AUTH failure limit is cluster-wide again")
        self._away = False
        return answer
