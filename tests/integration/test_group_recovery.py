"""A Redis that lost its data has no consumer group: the readers make it again and deliver.

Redis restarted without persistence, flushed by hand, or a replica promoted before it had the
data: the streams and their `delivery` group are gone. Accepts go on (`XADD` makes the stream),
but every `XREADGROUP` answers NOGROUP. Before, each node's reader retried that for ever and
nothing accepted since was delivered until the nodes restarted.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import redis

from smtpfleet.envelope import EntryState, NewMessage, new_qid
from smtpfleet.errors import QueueUnavailable
from smtpfleet.queue.keys import GROUP
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.testing import eventually, node_config, send
from smtpfleet.testing.localcluster import LocalCluster

pytestmark = pytest.mark.timeout(90)


def _message() -> NewMessage:
    return NewMessage(
        qid=new_qid(0),
        sender="a@example.com",
        recipients=("b@example.net",),
        data=b"Subject: regrouped\r\n\r\nbody\r\n",
    )


def _destroy_groups(client: redis.Redis, queue: RedisQueue) -> int:
    return sum(client.xgroup_destroy(s, GROUP) for _, _, s in queue.keys.all_streams())


async def test_reads_claims_and_stats_make_a_lost_group_again(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    config = node_config(redis_url, [], {"redis": {"prefix": prefix}})
    queue = RedisQueue(config.redis, config.queue)
    try:
        await queue.ensure_groups()
        message = _message()
        await queue.enqueue(message)
        assert _destroy_groups(redis_client, queue) == len(queue.keys.all_streams())

        (delivery,) = await queue.read("reader", 10, 0)
        assert delivery.message is not None
        assert delivery.message.qid == message.qid
        assert await queue.read("reader", 10, 0) == []  # made once, at id 0: no second copy

        _destroy_groups(redis_client, queue)
        # The takeover sweep: a new group has nothing pending to take over, and the entry is
        # new to it again (what was in flight when the group went is delivered once more).
        assert await queue.claim_idle("survivor", 0, 10) == []
        (again,) = await queue.read("survivor", 10, 0)
        assert again.message is not None
        assert again.message.qid == message.qid

        _destroy_groups(redis_client, queue)
        figures = await queue.stats(0)
        assert (figures[EntryState.READY], figures[EntryState.IN_FLIGHT]) == (1.0, 0.0)
    finally:
        await queue.close()


async def test_a_node_delivers_again_after_redis_lost_everything() -> None:
    async with LocalCluster(nodes=1, sinks=1) as cluster:
        assert cluster.redis is not None
        (sink,) = cluster.sink_servers
        node = cluster.node_processes[0]
        assert (await send(node.smtp)).code == 250
        await eventually(lambda: sink.count == 1, timeout_s=10)

        client = redis.Redis.from_url(cluster.redis.url)
        try:
            client.flushall()  # what a restart without persistence leaves
        finally:
            client.close()
        await asyncio.sleep(0.5)  # the reader is back in its blocking read by now
        replies = [await send(node.smtp) for _ in range(3)]
        assert [r.code for r in replies] == [250, 250, 250]
        await eventually(lambda: sink.count == 4, timeout_s=20)
        assert "making the consumer groups again" in node.log_tail(500)


async def test_a_redis_that_never_answers_making_groups_is_unavailable_not_a_crash() -> None:
    """At start a node makes its groups: a Redis that accepts and then says nothing must end
    in `cannot start: ...` (QueueUnavailable), not a redis-py TimeoutError traceback."""
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        config = node_config(url, [], {"redis": {"socket_timeout_s": 0.2}})
        queue = RedisQueue(config.redis, config.queue)
        try:
            with pytest.raises(QueueUnavailable):
                await queue.ensure_groups()
        finally:
            await queue.close()
    finally:
        silent.close()
