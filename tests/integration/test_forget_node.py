"""A dead node's deregistration against a node started again under the same id (a pod
restarted in place). A survivor judges a node dead from a heartbeat it read, then claims and
counts its pending entries (round trips per stream) before it deregisters it: a probe saw the
node come back in that window and be removed after it had beaten again (fenced a second),
and showed that its consumer's entries read meanwhile were dropped with the consumer (their
FINISH then acknowledged nothing, and a retry it would schedule was lost)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from smtpfleet.config import QueueConfig, RedisConfig
from smtpfleet.delivery.outcome import DONE
from smtpfleet.envelope import NewMessage, new_qid
from smtpfleet.queue.keys import GROUP
from smtpfleet.queue.redis_cluster import ClusterStore
from smtpfleet.queue.redis_queue import RedisQueue

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def store(redis_url: str, prefix: str) -> AsyncIterator[ClusterStore]:
    queue = RedisQueue(RedisConfig(url=redis_url, prefix=prefix, shards=2), QueueConfig())
    await queue.ensure_groups()
    try:
        yield ClusterStore(queue)
    finally:
        await queue.close()


async def test_a_node_that_beat_again_since_it_was_judged_dead_is_not_removed(
    store: ClusterStore,
) -> None:
    await store.heartbeat("node-x", 1_000, {}, 60_000)
    judged_by = (await store.members())["node-x"]
    await store.heartbeat("node-x", 9_000, {}, 60_000)  # started again, beating
    assert await store.forget_node("node-x", judged_by) is False
    assert (await store.members())["node-x"] == 9_000
    assert await store.forget_node("node-x", 9_000) is True  # dead again, for good
    assert "node-x" not in await store.members()


async def test_a_consumer_is_deleted_only_with_nothing_pending(store: ClusterStore) -> None:
    queue = store._queue
    message = NewMessage(new_qid(0), "a@example.com", ("b@example.net",), b"Subject: x\r\n\r\n")
    await queue.enqueue(message)
    (read,) = await queue.read("node-x", 10, 0)  # the node, back, read an entry
    await store.forget_node("node-x")
    assert await store.pending_count("node-x") == 1  # still its own: it can finish it
    await queue.finish(read, DONE)
    assert await store.pending_count("node-x") == 0
    await store.forget_node("node-x")
    consumers = [
        c["name"]
        for _, _, stream in queue.keys.all_streams()
        for c in await queue.client.xinfo_consumers(stream, GROUP)
    ]
    assert not {b"node-x", "node-x"} & set(consumers), consumers
