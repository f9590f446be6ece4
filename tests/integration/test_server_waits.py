"""Commands that wait inside Redis answer within the client's socket timeout.

A reader's `XREADGROUP BLOCK` and an accept's `WAITAOF`/`WAIT` wait in the server. When the
wait was as long as the socket timeout (the drills' 1 s for both), a quiet stream came back
as a timeout instead of an empty answer: the connection was dropped, a WARNING logged, and
the worker's reader paused to rescan its own entries, so for a while the node took none of
its own accepts. The net-redis-cut drill then found the cut-off node holding no work, at
times, and nothing for the survivors to take over.
"""

from __future__ import annotations

import time

import pytest

from smtpfleet.envelope import NewMessage, new_qid
from smtpfleet.errors import QueueUnavailable
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.testing import node_config

pytestmark = pytest.mark.timeout(60)

SOCKET_TIMEOUT_S = 0.4


async def test_a_blocking_read_longer_than_the_socket_timeout_comes_back_empty(
    redis_url: str, prefix: str
) -> None:
    overrides = {"redis": {"prefix": prefix, "socket_timeout_s": SOCKET_TIMEOUT_S}}
    config = node_config(redis_url, [], overrides)
    queue = RedisQueue(config.redis, config.queue)
    try:
        await queue.ensure_groups()
        for _ in range(3):
            assert await queue.read("quiet", 10, block_ms=1000) == []
    finally:
        await queue.close()


async def test_a_confirmation_wait_longer_than_the_socket_timeout_is_answered_by_redis(
    redis_url: str, prefix: str
) -> None:
    # No replica exists, so WAIT never confirms: the refusal must be Redis's own answer
    # ("0 of 1 replicas"), not a socket timeout on a connection then dropped.
    overrides = {
        "redis": {"prefix": prefix, "socket_timeout_s": SOCKET_TIMEOUT_S},
        "queue": {"durability": "replicated", "replicas": 1, "durability_timeout_ms": 2000},
    }
    config = node_config(redis_url, [], overrides)
    queue = RedisQueue(config.redis, config.queue)
    message = NewMessage(
        qid=new_qid(0), sender="a@example.com", recipients=("b@example.net",), data=b"x\r\n"
    )
    try:
        started = time.monotonic()
        with pytest.raises(QueueUnavailable, match="0 of 1 replicas confirmed"):
            await queue.enqueue(message)
        # At the wait the socket timeout leaves, not the whole durability_timeout_ms.
        assert time.monotonic() - started < 1.5
    finally:
        await queue.close()
