"""A process's own accepts reach its own reader from memory once confirmed; nothing else does.
An accept reads the entry it wrote for its own worker when that worker has room."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from smtpfleet.envelope import NewMessage, new_qid
from smtpfleet.errors import QueueUnavailable
from smtpfleet.queue.deliveries import Delivery
from smtpfleet.queue.keys import GROUP
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.testing import eventually, node_config, running_node, send
from smtpfleet.testing.sink import Sink

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


class _Reader:
    """The worker's side of the hand-over, recording what the accepts read for it."""

    def __init__(self, consumer: str, wanting: bool = True) -> None:
        self.consumer = consumer
        self.wanting = wanting
        self.taken: list[Delivery] = []

    def wants(self, lane: str) -> bool:
        return self.wanting

    def take(self, delivery: Delivery) -> None:
        self.taken.append(delivery)


def _pending_of(client: redis.Redis, stream: str, consumer: str) -> list[str]:
    rows = client.xpending_range(stream, GROUP, "-", "+", 100, consumername=consumer)
    return [row["message_id"].decode() for row in rows]


@contextlib.asynccontextmanager
async def _queue_for(
    redis_url: str, prefix: str, reader: _Reader, **queue: Any
) -> AsyncIterator[RedisQueue]:
    """A queue whose accepts may read for `reader`, with its consumer group made."""
    overrides = {"redis": {"prefix": prefix}, "queue": queue}
    config = node_config(redis_url, [], overrides)
    spool = RedisQueue(config.redis, config.queue)
    spool.hand_over_to(reader)
    try:
        await spool.ensure_groups()
        yield spool
    finally:
        await spool.close()


def _qids(deliveries: list[Delivery]) -> list[str]:
    return [d.message.qid for d in deliveries if d.message is not None]


async def test_an_accept_reads_its_own_entry_for_its_worker(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    reader = _Reader("here")
    async with _queue_for(redis_url, prefix, reader) as here:
        message = _message(0)
        await here.enqueue(message)
        assert _qids(reader.taken) == [message.qid]
        (delivery,) = reader.taken
        stream = here.keys.stream(0, delivery.lane)
        assert _pending_of(redis_client, stream, "here") == [delivery.entry_id]
        # Nobody else gets it: it was never left unread in the stream.
        assert await here.read("there", 10, 0) == []
        body = await here.load_body(0, message.qid)
        assert (body.data, body.confirmed) == (message.data, True)


async def test_a_worker_without_room_leaves_the_entry_to_every_reader(
    redis_url: str, prefix: str
) -> None:
    reader = _Reader("here", wanting=False)
    async with _queue_for(redis_url, prefix, reader) as here:
        message = _message(0)
        await here.enqueue(message)
        assert reader.taken == []
        assert _qids(await here.read("there", 10, 0)) == [message.qid]


async def test_an_accept_behind_unread_entries_takes_the_oldest(
    redis_url: str, prefix: str
) -> None:
    # Entries nobody has read yet (a backlog) come first: the accept reads the oldest one
    # for its worker, and its own waits in the stream for the next reader, in order.
    reader = _Reader("here", wanting=False)
    async with _queue_for(redis_url, prefix, reader) as here:
        older, newer = _message(0), _message(0)
        await here.enqueue(older)
        reader.wanting = True
        await here.enqueue(newer)
        assert _qids(reader.taken) == [older.qid]
        assert _qids(await here.read("there", 10, 0)) == [newer.qid]


async def test_an_entry_taken_by_an_accept_answered_451_is_a_tombstone_for_its_worker(
    redis_url: str, prefix: str
) -> None:
    # No replica exists, so WAIT never confirms. The entry is handed over all the same, so
    # that the worker finishes it rather than leaving it pending; it finds the tombstone.
    reader = _Reader("here")
    never = {"durability": "replicated", "replicas": 1, "durability_timeout_ms": 200}
    async with _queue_for(redis_url, prefix, reader, **never) as queue:
        message = _message(0)
        with pytest.raises(QueueUnavailable):
            await queue.enqueue(message)
        assert _qids(reader.taken) == [message.qid]
        body = await queue.load_body(0, message.qid)
        assert body.data is None


async def test_a_resend_reads_nothing(redis_url: str, prefix: str) -> None:
    reader = _Reader("here")
    async with _queue_for(redis_url, prefix, reader) as queue:
        message = dataclasses.replace(_message(0), fingerprint="same-message")
        first = await queue.enqueue(message)
        again = await queue.enqueue(dataclasses.replace(message, qid=new_qid(0)))
        assert (again.duplicate, again.qid) == (True, first.qid)
        assert _qids(reader.taken) == [first.qid]


async def test_two_nodes_deliver_their_own_accepts_without_loading_a_body(
    redis_url: str, prefix: str, redis_client: redis.Redis, sink: Sink
) -> None:
    # Two node processes on one queue, all the mail sent to one of them: each message is
    # read by the node that accepted it as it is written, so no body is loaded from Redis
    # and no confirmation mark polled (the other node's reader would get about half).
    configs = [
        node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}, "node": {"id": name}})
        for name in ("node-a", "node-b")
    ]
    async with running_node(configs[0]) as node, running_node(configs[1]):
        await eventually(lambda: "relay-1" in node.health.healthy)
        before = _hmget_calls(redis_client)
        for _ in range(20):
            assert (await send(node.inbound.addresses[0])).code == 250
        await eventually(lambda: sink.count == 20)
        assert _hmget_calls(redis_client) == before


async def test_an_accept_stands_when_the_consumer_group_is_gone(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    # No group on the stream (deleted under a running node): the read fails inside the
    # script, and the accept must not fail with it.
    config = node_config(redis_url, [], {"redis": {"prefix": prefix}})
    queue = RedisQueue(config.redis, config.queue)
    reader = _Reader("here")
    queue.hand_over_to(reader)
    try:
        message = _message(0)
        result = await queue.enqueue(message)
        assert result.qid == message.qid
        assert reader.taken == []
        assert redis_client.xlen(queue.keys.stream(0, queue.keys.lanes[0])) == 1
    finally:
        await queue.close()
