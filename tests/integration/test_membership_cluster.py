"""Membership on a real Redis Cluster while one primary is dead or stops answering (#10).

In the redis-cluster-primary-kill drill, live nodes were declared dead and robbed of their
deliveries: after the primary died, each node's membership check (member reads, then the
takeover's XPENDING/XCLAIM over every stream) took 2-9 s, and the node's next heartbeat
waited behind it. The node was in contact with Redis the whole time, so it never fenced,
but its beat was a lease old for its peers. Here a primary that holds neither the
heartbeats nor the cluster client's default node is frozen (SIGSTOP: its connections hang
until the socket timeout) while a dead member's entries wait on it, so every takeover
attempt stalls; the live nodes' beats must stay fresh meanwhile, and the dead member's work
must still be taken over once the primary answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from smtpfleet.cluster.membership import Membership
from smtpfleet.config import ClusterConfig, QueueConfig, RedisConfig
from smtpfleet.envelope import QueuedMessage, new_qid, now_ms
from smtpfleet.errors import QueueUnavailable
from smtpfleet.metrics import Metrics
from smtpfleet.queue.deliveries import Delivery
from smtpfleet.queue.keys import GROUP, Keys
from smtpfleet.queue.redis_cluster import ClusterStore
from smtpfleet.queue.redis_queue import RedisQueue, guarded, pipeline
from smtpfleet.testing import eventually
from smtpfleet.testing.redis_cluster import RedisClusterServers, started_cluster
from smtpfleet.testing.redis_server import LOOPBACK, RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PREFIX = "mb"
SHARDS = 16
DEAD = "node-dead"
# The drills' timing: a lease is four beats, and a socket timeout is half a lease.
CONFIG = ClusterConfig(heartbeat_interval_s=0.5, lease_s=2.0, lease_refresh_s=0.5)
SOCKET_TIMEOUT_S = 1.0
FROZEN_S = 8.0


@dataclass
class LiveNode:
    membership: Membership
    queue: RedisQueue
    adopted: list[Delivery] = field(default_factory=list)


def _redis_config(servers: RedisClusterServers, prefix: str = PREFIX) -> RedisConfig:
    return RedisConfig(
        url=servers.url,
        cluster=True,
        shards=SHARDS,
        prefix=prefix,
        socket_timeout_s=SOCKET_TIMEOUT_S,
    )


@contextlib.asynccontextmanager
async def _live_node(servers: RedisClusterServers, node_id: str) -> AsyncIterator[LiveNode]:
    """A node's membership with a Redis client of its own, as in a node process."""
    queue = RedisQueue(_redis_config(servers), QueueConfig())
    adopted: list[Delivery] = []
    membership = Membership(
        store=ClusterStore(queue),
        config=CONFIG,
        node_id=node_id,
        adopt=adopted.extend,
        metrics=Metrics(),
    )
    await membership.tick()
    task = asyncio.create_task(membership.run())
    try:
        yield LiveNode(membership, queue, adopted)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await queue.close()


def _bystander(servers: RedisClusterServers, keys: Keys) -> RedisServer:
    """A primary holding neither the heartbeats' slot nor slot 0 (the cluster client's default
    node, which it asks for the command table after every connection error)."""
    spared = {
        servers.server_for_slot(0).port,
        servers.server_for_slot(key_slot(keys.nodes().encode())).port,
    }
    return next(p for p in servers.primaries() if p.port not in spared)


async def _leave_pending_for_dead_node(
    servers: RedisClusterServers, queue: RedisQueue, keys: Keys, on: RedisServer
) -> str:
    """An entry read by a node that died since, on a shard the given primary holds, and that
    node's old heartbeat: every live node will try to take it over."""
    shard = next(
        s
        for s in keys.all_shards()
        if servers.server_for_slot(key_slot(keys.stream(s).encode())) is on
    )
    entry = QueuedMessage(new_qid(shard), "s@example.com", ("r@example.net",), now_ms())
    client = queue.client
    await client.xadd(keys.stream(shard), {"m": entry.encode()})
    await client.xreadgroup(GROUP, DEAD, {keys.stream(shard): ">"})
    await client.zadd(keys.nodes(), {DEAD: 1})
    return entry.qid


async def _watch_beats(
    client: aioredis.Redis, keys: Keys, live: set[str], until: float
) -> dict[str, int]:
    """The oldest each live node's heartbeat got (ms), as a peer reading Redis would see it."""
    worst = dict.fromkeys(live, 0)
    while time.monotonic() < until:
        beats = dict(await client.zrange(keys.nodes(), 0, -1, withscores=True))
        now = now_ms()
        for node in live:
            worst[node] = max(worst[node], now - int(beats.get(node.encode(), 0)))
        await asyncio.sleep(0.05)
    return worst


def _qids(deliveries: list[Delivery]) -> set[str]:
    return {d.message.qid for d in deliveries if d.message is not None}


def _freeze(server: RedisServer) -> None:
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)


def _thaw(server: RedisServer) -> None:
    if server.pid is not None:
        os.kill(server.pid, signal.SIGCONT)


async def test_a_takeover_stalled_by_a_frozen_primary_does_not_hold_back_heartbeats() -> None:
    servers = started_cluster(primaries=3, replicas=0)  # no replica: the frozen one stays
    keys = Keys(PREFIX, SHARDS)
    frozen = _bystander(servers, keys)
    try:
        async with _live_node(servers, "node-a") as a, _live_node(servers, "node-b") as b:
            await a.queue.ensure_groups()
            dead_qid = await _leave_pending_for_dead_node(servers, a.queue, keys, frozen)
            beats_at = servers.server_for_slot(key_slot(keys.nodes().encode()))
            reader = aioredis.Redis(host=LOOPBACK, port=beats_at.port)
            _freeze(frozen)
            try:
                worst = await _watch_beats(
                    reader, keys, {"node-a", "node-b"}, time.monotonic() + FROZEN_S
                )
            finally:
                _thaw(frozen)
                await reader.aclose()
            lease_ms = CONFIG.lease_s * 1000
            assert all(age < lease_ms for age in worst.values()), worst
            assert {"node-a", "node-b"} <= a.membership.live & b.membership.live
            # The dead node's entry is still taken over, once its primary answers again.
            await eventually(lambda: dead_qid in _qids([*a.adopted, *b.adopted]), timeout_s=30)
            assert not a.membership.fenced
            assert not b.membership.fenced
    finally:
        _thaw(frozen)
        servers.close()


async def test_heartbeats_reach_their_primary_while_the_default_node_is_dead() -> None:
    """redis-py re-reads the slot table after a connection error and asked its default node
    (slot 0's primary) for the command table each time: while that primary was dead, every
    heartbeat failed though its own primary was fine, and peers took the node's work over."""
    servers = started_cluster(primaries=3, replicas=0)  # no replica: it stays dead
    try:
        first = servers.server_for_slot(0)
        prefix = next(
            f"hb{n}"
            for n in range(100)
            if servers.server_for_slot(key_slot(Keys(f"hb{n}", SHARDS).nodes().encode()))
            is not first
        )
        queue = RedisQueue(_redis_config(servers, prefix), QueueConfig())
        try:
            store = ClusterStore(queue)
            await store.heartbeat("node-a", now_ms(), {}, 60_000)
            assert queue.client.get_default_node().port == first.port  # type: ignore[union-attr]
            on_dead = next(
                f"{{k{n}}}"
                for n in range(1000)
                if servers.server_for_slot(key_slot(f"{{k{n}}}".encode())) is first
            )
            first.kill()
            for _ in range(3):
                with pytest.raises(QueueUnavailable):  # its own primary is gone: "away"
                    await _read_through_pipeline(queue, on_dead)
                assert await store.heartbeat("node-a", now_ms(), {}, 60_000) is not None
                assert "node-a" in await store.members()
        finally:
            await queue.close()
    finally:
        servers.close()


async def _read_through_pipeline(queue: RedisQueue, key: str) -> None:
    async with pipeline(queue.client, transaction=False) as pipe:
        pipe.get(key)
        await guarded(pipe.execute)
