"""A process's own accepts reach its own reader from memory once confirmed; nothing else does."""

from __future__ import annotations

import pytest
import redis

from smtpfleet.envelope import NewMessage, new_qid
from smtpfleet.errors import QueueUnavailable
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.testing import node_config

pytestmark = pytest.mark.timeout(30)


def _hmget_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


def _message(shard: int) -> NewMessage:
    return NewMessage(
        qid=new_qid(shard),
        sender="s@example.com",
        recipients=("r@example.net",),
        data=b"Subject: handed over\r\n\r\nbody\r\n",
    )


async def test_the_accepting_process_reads_its_confirmed_body_without_a_round_trip(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    config = node_config(
        redis_url, [], {"redis": {"prefix": prefix}, "queue": {"durability": "fsync"}}
    )
    here = RedisQueue(config.redis, config.queue)
    elsewhere = RedisQueue(config.redis, config.queue)  # another node process
    try:
        ours, theirs = _message(0), _message(1)
        await here.enqueue(ours)
        await here.enqueue(theirs)

        before = _hmget_calls(redis_client)
        body = await here.load_body(0, ours.qid)
        assert (body.data, body.confirmed) == (ours.data, True)
        assert _hmget_calls(redis_client) == before  # from memory, no poll for the mark

        # Any other process reads the same body from Redis, as before.
        body = await elsewhere.load_body(1, theirs.qid)
        assert body.data == theirs.data
        assert _hmget_calls(redis_client) == before + 1

        # Handed over once: a second read of the same entry (a retry) goes to Redis.
        body = await here.load_body(0, ours.qid)
        assert body.data == ours.data
        assert _hmget_calls(redis_client) == before + 2
    finally:
        await here.close()
        await elsewhere.close()


async def test_an_accept_answered_451_is_never_handed_over_from_memory(
    redis_url: str, prefix: str
) -> None:
    # No replica exists, so WAIT never confirms: the copy written is tombstoned, and the
    # accepting process's own reader must see the tombstone, not the body it still held.
    overrides = {
        "redis": {"prefix": prefix},
        "queue": {"durability": "replicated", "replicas": 1, "durability_timeout_ms": 200},
    }
    config = node_config(redis_url, [], overrides)
    queue = RedisQueue(config.redis, config.queue)
    try:
        message = _message(0)
        with pytest.raises(QueueUnavailable):
            await queue.enqueue(message)
        body = await queue.load_body(0, message.qid)
        assert body.data is None
    finally:
        await queue.close()
