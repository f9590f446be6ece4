"""The queue on a real Redis Cluster: 3 primaries, 3 replicas on loopback (valkey-cli --cluster).

Every accept goes to its shard's primary with its WAIT on the same connection; reads are one
XREADGROUP per shard, pipelined per primary. Faults: SIGKILL of a primary under load in
`replicated` mode, and a shard's slot moved to another primary under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Collection, Iterator

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from smtpfleet.config import Durability, QueueConfig, RedisConfig
from smtpfleet.delivery.outcome import DONE
from smtpfleet.envelope import NewMessage, new_qid
from smtpfleet.errors import QueueUnavailable
from smtpfleet.inbound.limits import LocalClientCounter
from smtpfleet.metrics import Metrics
from smtpfleet.queue.client_limits import RedisClientCounter
from smtpfleet.queue.keys import GROUP
from smtpfleet.queue.redis_cluster import ClusterStore
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.queue.routes import is_redirect
from smtpfleet.testing import run_cli
from smtpfleet.testing.memory import Clock
from smtpfleet.testing.redis_cluster import RedisClusterServers, started_cluster
from smtpfleet.testing.redis_server import LOOPBACK

pytestmark = [pytest.mark.slow, pytest.mark.solo]

SHARDS = 16
CONSUMER = "node-a"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    servers = started_cluster(primaries=3, replicas=1)
    yield servers
    servers.close()


_prefixes = iter(range(1000))


@contextlib.asynccontextmanager
async def open_queue(
    cluster: RedisClusterServers, durability: Durability = Durability.SERVER
) -> AsyncIterator[RedisQueue]:
    config = RedisConfig(
        url=cluster.url,
        cluster=True,
        shards=SHARDS,
        prefix=f"t{next(_prefixes)}",
        socket_timeout_s=5,
    )
    queue = RedisQueue(config, QueueConfig(durability=durability, replicas=1))
    await queue.ensure_groups()
    try:
        yield queue
    finally:
        await queue.close()


def message(shard: int, n: int) -> NewMessage:
    return NewMessage(
        qid=new_qid(shard), sender="a@example.org", recipients=("b@example.net",), data=b"m%d" % n
    )


async def drain(
    queue: RedisQueue, expect: int | Collection[str], timeout_s: float = 20.0
) -> list[str]:
    """Read and finish entries until `expect` were seen (or the time is up); their queue ids.

    `expect`: a count, or the queue ids that must all turn up. Under a failover count alone
    stops too early: an accept answered 451 whose tombstone was lost with its primary is read
    too (the sender's retry makes it a duplicate, never a loss), and takes an acked one's place.
    """
    seen: list[str] = []
    count, missing = (expect, None) if isinstance(expect, int) else (0, set(expect))
    deadline = asyncio.get_running_loop().time() + timeout_s

    def done() -> bool:
        return len(seen) >= count if missing is None else not missing

    rescan = True  # like the worker: after an error, re-read our own pending entries first
    while not done() and asyncio.get_running_loop().time() < deadline:
        try:
            batch = await queue.read_own_pending(CONSUMER, 64) if rescan else []
            rescan = bool(batch)
            batch = batch or await queue.read(CONSUMER, 64, 200)
            for delivery in batch:
                assert delivery.message is not None
                body = await queue.load_body(delivery.shard, delivery.message.qid)
                await queue.finish(delivery, DONE)
                if body.data is not None:  # None: a tombstoned (451-answered) accept
                    seen.append(delivery.message.qid)
                    if missing is not None:
                        missing.discard(delivery.message.qid)
        except QueueUnavailable:
            rescan = True
            await asyncio.sleep(0.1)
    return seen


async def test_status_shows_every_primary_its_replica_and_the_shards_it_holds(
    cluster: RedisClusterServers,
) -> None:
    async with open_queue(cluster) as queue:  # its consumer groups, as a node makes them
        keys = queue.keys
    env = {
        "SMTPFLEET_REDIS__URL": cluster.url,
        "SMTPFLEET_REDIS__CLUSTER": "true",
        "SMTPFLEET_REDIS__SHARDS": str(SHARDS),
        "SMTPFLEET_REDIS__PREFIX": keys.prefix,
    }
    code, out, err = await run_cli("status", "--json", env=env)
    assert code == 0, err
    redis_view = json.loads(out)["redis"]
    assert redis_view["mode"] == "cluster"
    primaries = {p["address"]: p for p in redis_view["primaries"]}
    assert sorted(primaries) == sorted(f"{LOOPBACK}:{s.port}" for s in cluster.primaries())
    for primary in primaries.values():
        assert primary["role"] == "primary"
        assert [r["link"] for r in primary["replicas"]] == ["up"]
    # Every shard on exactly one primary: the one serving its slot (redis-py's own hashing).
    held = sorted(s for p in primaries.values() for s in p["shards"])
    assert held == list(range(SHARDS))
    assert redis_view["unassigned_shards"] == []
    for shard in range(SHARDS):
        owner = cluster.server_for_slot(key_slot(keys.stream(shard).encode()))
        assert shard in primaries[f"{LOOPBACK}:{owner.port}"]["shards"]
    code, table, err = await run_cli("status", env=env)
    assert code == 0, err
    assert table.count("  replica ") == 3, table
    assert table.count("shards on ") == 3, table


async def test_every_shard_enqueues_reads_and_finishes_on_its_primary(
    cluster: RedisClusterServers,
) -> None:
    async with open_queue(cluster, Durability.REPLICATED) as queue:
        assert (await queue.check_server()) != ""
        sent = [(await queue.enqueue(message(s, s))).qid for s in range(SHARDS) for _ in range(3)]
        seen = await drain(queue, len(sent))
        assert sorted(seen) == sorted(sent)
        assert await queue.depth() == {"stream": 0, "retry": 0, "dead": 0}
        # The shards spread over all three primaries, each shard's keys in one slot.
        routes = await queue._routes.by_route(queue.keys.all_shards())
        assert len(routes) == 3


async def test_reads_make_the_groups_again_on_every_primary_after_they_were_lost(
    cluster: RedisClusterServers,
) -> None:
    async with open_queue(cluster) as queue:
        sent = [(await queue.enqueue(message(s, s))).qid for s in range(SHARDS)]
        for _, _, stream in queue.keys.all_streams():  # what a primary that lost its data has
            assert await queue.client.xgroup_destroy(stream, GROUP) == 1
        assert sorted(await drain(queue, sent, timeout_s=10)) == sorted(sent)


async def test_a_primary_that_lost_its_groups_is_not_hidden_by_the_others_entries(
    cluster: RedisClusterServers,
) -> None:
    async with open_queue(cluster) as queue:
        for s in range(SHARDS):
            await queue.enqueue(message(s, s))
        (_, lost), *_ = await queue._routes.by_route(queue.keys.all_shards())
        lost_streams = [queue.keys.stream(s, lane) for s in lost for lane in queue.keys.lanes]
        for stream in lost_streams:
            await queue.client.xgroup_destroy(stream, GROUP)
        # The other primaries' entries come back from this read; the lost primary's groups
        # must be there again after it, not only after a read that finds nothing at all.
        got = await queue.read(CONSUMER, 64, 0)
        assert got
        assert {d.shard for d in got}.isdisjoint(lost)
        for stream in lost_streams:
            assert [g["name"] for g in await queue.client.xinfo_groups(stream)] == [GROUP.encode()]


async def test_closing_the_queue_disconnects_every_primarys_connections(
    cluster: RedisClusterServers,
) -> None:
    """Each primary's own client (the accept and delivery batchers') owns its pool: a client
    given a pool leaves it open on aclose(), and its sockets to the garbage collector."""
    async with open_queue(cluster, Durability.REPLICATED) as queue:
        for shard in range(SHARDS):
            await queue.enqueue(message(shard, shard))
        pools = [route.client.connection_pool for route in await queue._routes.primaries()]
        assert len(pools) == 3
        assert all(_connected(pool) for pool in pools)
    assert [_connected(pool) for pool in pools] == [0, 0, 0]


def _connected(pool: aioredis.ConnectionPool) -> int:
    idle, busy = pool._get_free_connections(), pool._get_in_use_connections()
    return sum(1 for c in [*idle, *busy] if c.is_connected)


async def test_a_cluster_out_of_reach_is_queue_unavailable_on_every_call() -> None:
    """After a connection error redis-py's cluster client reloads its slot table (CLUSTER
    SLOTS, then COMMAND on a default node that may be the dead primary) as the next pipeline
    opens, before any command: that too is "Redis away". It escaped as a raw ConnectionError
    and ended the nodes' membership and health loops in the redis-cluster-primary-kill drill,
    so live nodes stopped beating and were declared dead."""
    servers = started_cluster(primaries=3, replicas=0)
    try:
        async with open_queue(servers) as queue:
            store = ClusterStore(queue)
            await store.heartbeat(CONSUMER, 1, {}, 60_000)
            for server in servers.servers:
                server.kill()
            for _ in range(3):  # the first call fails in its command, the next ones on entry
                with pytest.raises(QueueUnavailable):
                    await store.heartbeat(CONSUMER, 2, {}, 60_000)
                with pytest.raises(QueueUnavailable):
                    await store.publish_view(CONSUMER, {"relay-1": True}, 60_000)
                with pytest.raises(QueueUnavailable):
                    await queue.depth()
    finally:
        servers.close()


async def test_a_command_sent_to_the_wrong_primary_is_seen_as_a_redirect(
    cluster: RedisClusterServers,
) -> None:
    """A pipelined command on a primary that does not hold its slot comes back MOVED: the
    queue must see a redirect (send it again where the slot is now), not an error (a 451, an
    interrupted delivery that is then delivered twice)."""
    slot = key_slot(b"{t:0}:stream")
    elsewhere = next(s for s in cluster.primaries() if s is not cluster.server_for_slot(slot))
    client = aioredis.Redis(host=LOOPBACK, port=elsewhere.port)
    async with client, client.pipeline(transaction=False) as pipe:
        pipe.xlen("{t:0}:stream")
        (reply,) = await pipe.execute(raise_on_error=False)
    assert is_redirect(reply), repr(reply)
    assert not is_redirect(QueueUnavailable("redis: ConnectionError"))


async def test_retries_come_back_from_every_primary(cluster: RedisClusterServers) -> None:
    async with open_queue(cluster) as queue:
        for s in range(SHARDS):
            await queue.enqueue(message(s, s))
        batch: list = []
        while len(batch) < SHARDS:
            batch += await queue.read(CONSUMER, 64, 200)
        from smtpfleet.delivery.outcome import park

        for delivery in batch:
            assert delivery.message is not None
            await queue.finish(delivery, park(delivery.message, now_ms=0))
        assert (await queue.depth())["retry"] == SHARDS
        assert await queue.move_due_retries(now=2**50) == SHARDS
        assert len(await drain(queue, SHARDS)) == SHARDS


async def test_traffic_classes_read_retry_and_count_per_class_on_every_primary(
    cluster: RedisClusterServers,
) -> None:
    """Each class's stream of a shard shares the shard's slot: one read per shard takes both,
    a class can be read alone, a retry comes back into its own class's stream."""
    config = RedisConfig(url=cluster.url, cluster=True, shards=SHARDS, prefix="classes")
    classes = QueueConfig.model_validate(
        {"classes": [{"name": "urgent"}, {"name": "bulk", "sender_domains": ["bulk.example"]}]}
    )
    queue = RedisQueue(config, classes)
    await queue.ensure_groups()
    try:
        for s in range(SHARDS):
            await queue.enqueue(message(s, s))
            bulk = NewMessage(new_qid(s), "n@bulk.example", ("b@example.net",), b"bulk")
            await queue.enqueue(bulk)
        by_class = await queue.class_stats(0)
        assert {n: c["ready"] for n, c in by_class.items()} == {"urgent": SHARDS, "bulk": SHARDS}
        urgent = await queue.read(CONSUMER, 64, 0, [""])
        assert {d.lane for d in urgent} == {""}
        assert len(urgent) == SHARDS
        bulk_read = await queue.read(CONSUMER, 64, 200)
        assert {(d.lane, d.message.traffic_class) for d in bulk_read if d.message} == {
            ("bulk", "bulk")
        }
        from smtpfleet.delivery.outcome import park

        for delivery in bulk_read:
            assert delivery.message is not None
            await queue.finish(delivery, park(delivery.message, now_ms=0))
        assert (await queue.class_stats(0))["bulk"]["retry"] == SHARDS
        assert await queue.move_due_retries(now=2**50) == SHARDS
        again = await queue.read(CONSUMER, 64, 0, ["bulk"])
        assert len(again) == SHARDS
        for delivery in [*urgent, *again]:
            await queue.finish(delivery, DONE)
        assert await queue.depth() == {"stream": 0, "retry": 0, "dead": 0}
    finally:
        await queue.close()


async def _load(queue: RedisQueue, acked: list[str], stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        try:
            result = await queue.enqueue(message(n % SHARDS, n))
        except QueueUnavailable:
            await asyncio.sleep(0.02)
            continue
        acked.append(result.qid)


async def test_killing_a_primary_under_load_loses_no_replicated_accept(
    cluster: RedisClusterServers,
) -> None:
    async with open_queue(cluster, Durability.REPLICATED) as queue:
        acked: list[str] = []
        stop = asyncio.Event()
        writers = [asyncio.create_task(_load(queue, acked, stop)) for _ in range(8)]
        await asyncio.sleep(0.5)
        victim = cluster.server_for_slot(queue._redis.keyslot(queue.keys.stream(0)))
        await asyncio.to_thread(cluster.kill, victim)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*writers)
        assert len(acked) > 100
        seen = await drain(queue, set(acked), timeout_s=30)
        assert set(acked) <= set(seen), f"lost {len(set(acked) - set(seen))} acknowledged"
        await asyncio.to_thread(cluster.start_node, victim)


async def test_moving_a_shards_slot_under_load_loses_nothing_and_delivers_once(
    cluster: RedisClusterServers,
) -> None:
    async with open_queue(cluster) as queue:
        acked: list[str] = []
        stop = asyncio.Event()
        writers = [asyncio.create_task(_load(queue, acked, stop)) for _ in range(8)]
        seen: list[str] = []
        reader = asyncio.create_task(_read_until(queue, seen, stop))
        await asyncio.sleep(0.5)
        slot = queue._redis.keyslot(queue.keys.stream(1))
        before = cluster.server_for_slot(slot)
        await asyncio.to_thread(cluster.move_slot, slot)
        assert cluster.server_for_slot(slot) is not before
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*writers)
        await reader
        seen += await drain(queue, len(acked) - len(seen), timeout_s=20)
        assert len(acked) > 100
        assert sorted(seen) == sorted(acked)  # everything, each once


async def _read_until(queue: RedisQueue, seen: list[str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        seen += await drain(queue, 1, timeout_s=0.2)


async def test_client_limits_count_across_nodes_on_a_cluster(cluster: RedisClusterServers) -> None:
    """Each check goes alone through the cluster client (a client's keys share one slot)."""
    metrics = Metrics()
    async with open_queue(cluster) as queue:
        one, two = (
            RedisClientCounter(
                queue.client,
                queue.keys,
                owner=owner,
                lease_s=60,
                fallback=LocalClientCounter(Clock()),
                metrics=metrics,
                timeout_s=2.0,
            )
            for owner in ("node-a", "node-b")
        )
        for client in [f"198.51.100.{n}" for n in range(8)]:  # spread over the primaries
            assert await one.open_session(client, "1") == 1
            assert await two.open_session(client, "1") == 2  # node-a's session counts here
            assert (await one.add_message(client, 0)).messages >= 1
            await two.close_session(client, "1", 3)  # its recipients, counted as it leaves
            later = await one.add_message(client, 0)
            assert later.messages > 1  # (a minute boundary between the two: 1.9...)
            assert later.recipients >= 3
            assert await two.open_session(client, "2") == 2  # node-a's, and this one
        await one.refresh()  # one pipeline over every primary holding a live lease
        await two.refresh()
        await one.close()
        await two.close()
    assert metrics.registry.get_sample_value("smtpfleet_client_limit_fallbacks_total") == 0


def test_a_node_whose_bus_port_was_taken_after_it_was_picked_starts_on_new_ports() -> None:
    """Ports are picked free when the cluster is made and bound when it starts; a client's
    ephemeral port landing on a bus port (port + 10000) in between failed CI once."""
    servers = RedisClusterServers(primaries=3, replicas=0)
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, servers.servers[1].port + 10000))
        squatter.listen()
        taken = servers.servers[1].port
        try:
            servers.start()
            assert servers.servers[1].port != taken
            assert servers.client(servers.servers[1]).ping()
        finally:
            servers.close()
