"""A survivor takes over a dead node's pending entries (in-process node, real Redis and sink)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from smtpfleet.envelope import QueuedMessage, new_qid, now_ms
from smtpfleet.queue.keys import GROUP, Keys
from smtpfleet.testing import eventually, make_message, message_ids, node_config, running_node
from smtpfleet.testing.sink import Sink

pytestmark = pytest.mark.timeout(60)

SHARDS = 4


async def _leave_pending_for_dead_node(
    client: aioredis.Redis, keys: Keys, entry_id: str, shards: list[int]
) -> list[str]:
    """What a node killed mid-delivery leaves: entries read by it, bodies, an old heartbeat.

    Stream ids are per stream, so entries of different shards often share one (same
    millisecond); here they do on purpose.
    """
    tags = []
    for shard in shards:
        tag = f"<same-id-{shard}@takeover.test>"
        qid = new_qid(shard)
        entry = QueuedMessage(qid, "sender@example.com", ("rcpt@example.net",), now_ms())
        await client.hset(
            keys.body(shard, qid), mapping={"d": make_message(message_id=tag), "ok": "1"}
        )
        await client.xgroup_create(keys.stream(shard), GROUP, id="0", mkstream=True)
        await client.xadd(keys.stream(shard), {"m": entry.encode()}, id=entry_id)
        await client.xreadgroup(GROUP, "node-dead", {keys.stream(shard): ">"})
        tags.append(tag)
    await client.zadd(keys.nodes(), {"node-dead": 1})
    return tags


async def test_entries_of_different_shards_with_the_same_stream_id_are_all_taken_over(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    keys = Keys(prefix=prefix, shards=SHARDS)
    client = aioredis.Redis.from_url(redis_url)
    try:
        tags = await _leave_pending_for_dead_node(client, keys, "1000-0", [1, 2, 3])
    finally:
        await client.aclose()
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix, "shards": SHARDS}})
    async with running_node(config) as node:
        await eventually(lambda: set(tags) <= set(message_ids([sink])), timeout_s=10)
        await eventually(lambda: node.worker.in_flight == 0)
        assert await node.queue.depth() == {"stream": 0, "retry": 0, "dead": 0}
    assert sink.count == 3
