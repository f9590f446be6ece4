"""The operator's changes to dead letters and its listings, raced and checked in a real Redis:
two operators at once, a requeue against a purge, letters dying during a purge, retry sets
read oldest first, and a cluster with more shards than the CLI was told."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from smtpfleet.config import Config, build_config
from smtpfleet.envelope import NewMessage, QueuedMessage, new_qid, now_ms
from smtpfleet.queue.keys import ENTRY_FIELD
from smtpfleet.queue.redis_admin import NO_LONGER_DEAD, Admin
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.testing import eventually, node_config, run_cli, running_node, send
from smtpfleet.testing.sink import Sink

pytestmark = pytest.mark.timeout(90)

SHARDS = 4
UNKNOWN = "550 5.1.1 User unknown"


def config_of(redis_url: str, prefix: str, shards: int = SHARDS) -> Config:
    return build_config({"redis": {"url": redis_url, "prefix": prefix, "shards": shards}}, {})


@pytest.fixture
async def queue(redis_url: str, prefix: str) -> AsyncIterator[RedisQueue]:
    """The queue's streams and groups, made as a node makes them at start."""
    config = config_of(redis_url, prefix)
    made = RedisQueue(config.redis, config.queue)
    await made.ensure_groups()
    yield made
    await made.close()


def add_dead(client: redis.Redis, queue: RedisQueue, recipient: str, shard: int) -> str:
    """A dead letter as a worker's finish writes one: the entry and its body."""
    qid = new_qid(shard)
    entry = QueuedMessage(qid=qid, sender="", recipients=(recipient,), accepted_ms=now_ms())
    client.hset(queue.keys.body(shard, qid), "d", f"To: {recipient}\r\n\r\nhi\r\n")
    client.xadd(queue.keys.dead(shard), {ENTRY_FIELD: entry.encode(), "reason": UNKNOWN})
    return qid


def dead_qids(client: redis.Redis, queue: RedisQueue) -> set[str]:
    return {
        qid for shard in queue.keys.all_shards() for qid in qids_in(client, queue.keys.dead(shard))
    }


def ready_qids(client: redis.Redis, queue: RedisQueue) -> list[str]:
    return [
        qid
        for shard in queue.keys.all_shards()
        for qid in qids_in(client, queue.keys.stream(shard))
    ]


def qids_in(client: redis.Redis, stream: str) -> list[str]:
    rows: Any = client.xrange(stream)  # bytes-mode RESP2: [(id, {field: value})]
    return [QueuedMessage.decode(fields[ENTRY_FIELD.encode()]).qid for _, fields in rows]


def bodies(client: redis.Redis, prefix: str) -> set[str]:
    return {k.decode().split(":body:")[1] for k in client.scan_iter(f"{{{prefix}:*}}:body:*")}


async def admins(config: Config, count: int) -> list[Admin]:
    """Operators of their own, each on its own connections (as two CLI runs are)."""
    return [Admin(RedisQueue(config.redis, config.queue)) for _ in range(count)]


async def close(operators: list[Admin]) -> None:
    for admin in operators:
        await admin.queue.close()


async def test_two_operators_requeueing_all_deliver_each_dead_letter_once(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    gone = [f"gone{n}@example.net" for n in range(40)]
    sink.faults.rcpt_replies = dict.fromkeys(gone, UNKNOWN)
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}})
    async with running_node(config) as node:
        for recipient in gone:  # null sender: a dead letter, no DSN
            reply = await _send(node.inbound.addresses[0], recipient)
            assert reply == 250
        await eventually(lambda: _dead_count(node.queue, 40), timeout_s=20)
        sink.faults.rcpt_replies = {}
        first, second = await admins(config, 2)
        try:
            counts = await asyncio.gather(first.requeue_all_dead(), second.requeue_all_dead())
        finally:
            await close([first, second])
        assert sum(counts) == 40  # each run counts what it moved, not what it listed
        await eventually(lambda: sink.count >= 40, timeout_s=20)
        await asyncio.sleep(1.0)  # a second copy, if any, would come now
        delivered = sorted(r for m in sink.messages for r in m.recipients)
        assert delivered == sorted(gone)
        assert await _dead_count(node.queue, 0)


async def test_a_requeue_racing_a_purge_leaves_no_entry_without_its_body(
    redis_url: str, prefix: str, redis_client: redis.Redis, queue: RedisQueue
) -> None:
    letters = {add_dead(redis_client, queue, f"r{n}@example.net", n % SHARDS) for n in range(400)}
    requeuer, purger = await admins(config_of(redis_url, prefix), 2)
    try:
        requeued, purged = await asyncio.gather(requeuer.requeue_all_dead(), purger.purge_dead())
    finally:
        await close([requeuer, purger])
    ready = ready_qids(redis_client, queue)
    assert requeued + purged == 400
    assert len(ready) == requeued
    assert set(ready) <= letters
    assert dead_qids(redis_client, queue) == set()
    assert bodies(redis_client, prefix) == set(ready)  # each requeued entry has its body


async def test_one_dead_letter_requeued_and_purged_at_once_is_done_by_one_of_them(
    redis_url: str, prefix: str, redis_client: redis.Redis, queue: RedisQueue
) -> None:
    letters = [add_dead(redis_client, queue, f"o{n}@example.net", n % SHARDS) for n in range(8)]
    requeuer, purger = await admins(config_of(redis_url, prefix), 2)
    try:
        for qid in letters:
            requeued, purged = await asyncio.gather(requeuer.retry_now(qid), purger.delete(qid))
            done = {requeued, purged} - {NO_LONGER_DEAD}
            assert done in ({"requeued from the dead letters"}, {"deleted (dead)"}), done
    finally:
        await close([requeuer, purger])
    ready = ready_qids(redis_client, queue)
    assert dead_qids(redis_client, queue) == set()
    assert bodies(redis_client, prefix) == set(ready)  # each requeued entry has its body


async def test_purge_all_leaves_letters_that_die_meanwhile_with_their_bodies(
    redis_url: str, prefix: str, redis_client: redis.Redis, queue: RedisQueue
) -> None:
    before = {add_dead(redis_client, queue, f"b{n}@example.net", n % SHARDS) for n in range(400)}
    late: set[str] = set()
    (purger,) = await admins(config_of(redis_url, prefix), 1)
    purge = asyncio.create_task(purger.purge_dead())
    try:
        while not purge.done():  # letters keep dying while it runs, on every shard
            late.add(add_dead(redis_client, queue, f"l{len(late)}@example.net", len(late) % 4))
            await asyncio.sleep(0)
        purged = await purge
    finally:
        await close([purger])
    remaining = dead_qids(redis_client, queue)
    assert remaining  # positive control: some died after it had looked
    assert remaining <= late  # all there before it started are gone
    assert purged + len(remaining) == len(before | late)  # none vanished uncounted
    assert bodies(redis_client, prefix) == remaining  # and no body outlived its letter


async def test_queue_list_retry_limit_shows_the_oldest_not_the_soonest_due(
    redis_url: str, prefix: str, redis_client: redis.Redis, queue: RedisQueue
) -> None:
    """A retry set is ordered by due time: an old message that failed often waits longest."""
    now = now_ms()
    ages_s = [600, 500, 400, 30, 20, 10]  # the oldest are due last (longer backoffs)
    qids = []
    for n, age_s in enumerate(ages_s):
        qid = new_qid(0)
        entry = QueuedMessage(
            qid=qid,
            sender="s@example.com",
            recipients=(f"o{n}@example.net",),
            accepted_ms=now - age_s * 1000,
            attempts=5 if age_s > 100 else 1,
        )
        due = now + (3_600_000 if age_s > 100 else 60_000) + n
        redis_client.zadd(queue.keys.retry(0), {entry.encode(): due})
        qids.append(qid)
    env = {"SMTPFLEET_REDIS__PREFIX": prefix, "SMTPFLEET_REDIS__SHARDS": str(SHARDS)}
    args = ["queue", "list", "--state", "retry", "--redis", redis_url, "--json"]
    code, out, err = await run_cli(*args, "--limit", "3", env=env)
    assert code == 0, err
    assert [e["qid"] for e in json.loads(out)] == qids[:3]
    code, out, err = await run_cli(*args, "--limit", "100", env=env)
    assert [e["qid"] for e in json.loads(out)] == qids  # all of them, oldest first


async def test_a_cluster_with_more_shards_than_the_default_is_read_whole(
    redis_url: str, prefix: str
) -> None:
    config = config_of(redis_url, prefix, shards=64)
    queue = RedisQueue(config.redis, config.queue)
    try:
        await queue.ensure_groups()
        qids = [await _enqueue(queue, shard) for shard in (0, 15, 16, 40, 63)]
    finally:
        await queue.close()
    env = {"SMTPFLEET_REDIS__PREFIX": prefix}  # --redis alone: no shard count given
    target = ["--redis", redis_url, "--json"]

    code, out, err = await run_cli("status", *target, env=env)
    assert code == 0, err
    assert json.loads(out)["queue"]["ready"] == 5
    code, out, err = await run_cli("queue", "list", *target, env=env)
    assert sorted(e["qid"] for e in json.loads(out)) == sorted(qids)
    code, out, err = await run_cli("queue", "show", qids[3], *target, env=env)
    assert (code, json.loads(out)["qid"]) == (0, qids[3]), err

    # A count given (a config file, the variable) that the cluster contradicts: refused.
    code, out, err = await run_cli("status", *target, env={**env, "SMTPFLEET_REDIS__SHARDS": "16"})
    assert (code, out) == (1, "")
    assert err == (
        f"smtpfleet: the cluster under prefix '{prefix}' has 64 shards, not redis.shards=16:"
        " pass the cluster's config (--config) or set SMTPFLEET_REDIS__SHARDS=64\n"
    )
    code, out, err = await run_cli("status", *target, env={**env, "SMTPFLEET_REDIS__SHARDS": "64"})
    assert (code, json.loads(out)["queue"]["ready"]) == (0, 5), err


async def _enqueue(queue: RedisQueue, shard: int) -> str:
    qid = new_qid(shard)
    data = b"Subject: x\r\n\r\nhi\r\n"
    await queue.enqueue(NewMessage(qid, "s@example.com", ("a@example.net",), data))
    return qid


async def _send(address: tuple[str, int], recipient: str) -> int:
    return (await send(address, sender="", recipients=[recipient])).code


async def _dead_count(queue: RedisQueue, dead: int) -> bool:
    stats = await queue.stats(10**13)
    return (stats["ready"], stats["in_flight"], stats["dead"]) == (0, 0, dead)
