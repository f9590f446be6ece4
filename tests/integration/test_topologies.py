"""The core of the suite on all three Redis topologies: one Redis, Sentinel, Redis Cluster.

The same in-process node and the same cases on each: accept and deliver, a 4xx retried to
success, and the takeover of a killed node's pending entries. One small set per topology for
the module (a primary, one replica and one Sentinel; a 3-primary cluster without replicas):
failovers and killed primaries are test_sentinel.py's and test_redis_cluster.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from smtpfleet.config import Config
from smtpfleet.envelope import NewMessage, new_qid, now_ms
from smtpfleet.queue.redis_cluster import ClusterStore
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.testing import (
    eventually,
    make_message,
    message_ids,
    node_config,
    running_node,
    send,
)
from smtpfleet.testing.redis_cluster import started_cluster
from smtpfleet.testing.redis_server import RedisServer
from smtpfleet.testing.sentinel import SentinelSet
from smtpfleet.testing.sink import Sink

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.slow,
]

SHARDS = 8


@pytest.fixture(scope="module", params=["single", "sentinel", "cluster"])
def topology(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[dict[str, Any]]:
    """The `redis` settings of a node on this topology."""
    if request.param == "single":
        yield {"url": redis_server.url}
    elif request.param == "sentinel":
        with SentinelSet(replicas=1, sentinels=1) as servers:
            # The URL gives only the database number when Sentinels are configured.
            yield {"url": "redis://127.0.0.1:1/0", "sentinels": servers.sentinel_addresses}
    else:
        servers = started_cluster(primaries=3, replicas=0)
        try:
            yield {"url": servers.url, "cluster": True}
        finally:
            servers.close()


def _config(topology: dict[str, Any], sink: Sink, prefix: str) -> Config:
    redis = {**topology, "prefix": prefix, "shards": SHARDS}
    return node_config(redis["url"], [sink.address], {"redis": redis})


async def test_accepted_mail_of_every_shard_is_delivered_once(
    topology: dict[str, Any], sink: Sink, prefix: str
) -> None:
    async with running_node(_config(topology, sink, prefix)) as node:
        tags = [f"<core-{n}@topology.test>" for n in range(24)]
        for n, tag in enumerate(tags):
            rcpt = [f"r@d{n}.example"]  # domains spread over the shards
            data = make_message(recipients=rcpt, message_id=tag)
            assert (await send(node.inbound.addresses[0], recipients=rcpt, data=data)).code == 250
        await eventually(lambda: set(tags) <= set(message_ids([sink])), timeout_s=15)
        assert max(message_ids([sink]).values()) == 1
        await eventually(lambda: node.worker.in_flight == 0)
        assert await node.queue.depth() == {"stream": 0, "retry": 0, "dead": 0}


async def test_a_tempfail_is_retried_to_success(
    topology: dict[str, Any], sink: Sink, prefix: str
) -> None:
    sink.faults.data_replies = ["451 4.3.0 Try again later"]
    async with running_node(_config(topology, sink, prefix)) as node:
        assert (await send(node.inbound.addresses[0])).code == 250
        await eventually(lambda: sink.count == 1, timeout_s=15)
        assert len(sink.rejected) == 1  # the first attempt really reached the relay
        await eventually(lambda: node.worker.in_flight == 0)
        assert await node.queue.depth() == {"stream": 0, "retry": 0, "dead": 0}


async def test_a_killed_nodes_pending_entries_are_taken_over(
    topology: dict[str, Any], sink: Sink, prefix: str
) -> None:
    config = _config(topology, sink, prefix)
    tags = [f"<pending-{shard}@topology.test>" for shard in range(SHARDS)]
    queue = RedisQueue(config.redis, config.queue)
    try:
        await _leave_pending_for_dead_node(queue, tags)
    finally:
        await queue.close()
    async with running_node(config) as node:
        await eventually(lambda: set(tags) <= set(message_ids([sink])), timeout_s=15)
        await eventually(lambda: node.worker.in_flight == 0)
        assert await node.queue.depth() == {"stream": 0, "retry": 0, "dead": 0}
    assert sink.count == SHARDS


async def _leave_pending_for_dead_node(queue: RedisQueue, tags: list[str]) -> None:
    """What a node killed mid-delivery leaves: one entry per shard read by it (pending in its
    name), their bodies, and a heartbeat long past its lease."""
    await queue.ensure_groups()
    for shard, tag in enumerate(tags):
        message = NewMessage(
            qid=new_qid(shard),
            sender="sender@example.com",
            recipients=("rcpt@example.net",),
            data=make_message(message_id=tag),
        )
        await queue.enqueue(message)
    read: list[object] = []
    while len(read) < len(tags):
        read += await queue.read("node-dead", 64, 200)
    await ClusterStore(queue).heartbeat("node-dead", now_ms() - 60_000, {"role": "active"}, 60_000)
