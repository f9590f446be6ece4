"""Group commit against a real Redis: one confirmation per batch, replies to their callers."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from smtpfleet.queue.batcher import Batcher
from smtpfleet.testing.redis_server import free_port

pytestmark = pytest.mark.timeout(60)


def calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_concurrent_accepts_share_one_fsync_confirmation(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client, lambda: ("WAITAOF", 1, 0, 1000))
    before = calls(redis_client, "waitaof")
    replies = await asyncio.gather(
        *(batcher.call(("INCRBY", f"{prefix}:n:{i}", i), confirm=True) for i in range(200))
    )
    waits = calls(redis_client, "waitaof") - before
    await client.aclose()
    # Each caller gets its own reply and the confirmation, which reports one fsynced AOF.
    assert [r[0] for r in replies] == list(range(200))
    assert all(r[1].reply[0] == 1 for r in replies)
    assert waits < 10  # 200 accepts, a handful of batches: not one fsync wait each


async def test_an_error_reply_fails_only_its_caller_and_order_is_kept(
    redis_url: str, prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(client)
    await client.hset(f"{prefix}:h", "f", "v")
    batcher.send(("SET", f"{prefix}:k", "first"))
    bad, good = await asyncio.gather(
        batcher.call(("INCR", f"{prefix}:h")), batcher.call(("GET", f"{prefix}:k"))
    )
    await client.aclose()
    assert isinstance(bad[0], ResponseError)
    assert "WRONGTYPE" in str(bad[0])
    assert good == [b"first"]  # the unawaited SET went out before the GET


async def test_a_lost_connection_fails_every_caller_of_the_batch() -> None:
    client = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    batcher = Batcher(client)
    results = await asyncio.gather(
        *(batcher.call(("PING",)) for _ in range(5)), return_exceptions=True
    )
    await client.aclose()
    assert all(isinstance(r, RedisConnectionError) for r in results), results


async def test_the_observer_hears_each_batch_and_its_confirmation(
    redis_url: str, prefix: str
) -> None:
    seen: list[tuple[int, bool]] = []
    client = aioredis.Redis.from_url(redis_url)
    batcher = Batcher(
        client, lambda: ("PING",), observe=lambda n, confirmed: seen.append((n, confirmed))
    )
    await asyncio.gather(
        *(
            batcher.call(("INCR", f"{prefix}:a"), ("INCR", f"{prefix}:b"), confirm=True)
            for _ in range(5)
        ),
        batcher.call(("INCR", f"{prefix}:c")),
    )
    await batcher.call(("INCR", f"{prefix}:c"))
    await client.aclose()
    # One event-loop turn's callers share a batch (11 commands, one confirmation); a lone
    # call without `confirm` is a batch without one.
    assert seen == [(11, True), (1, False)]
