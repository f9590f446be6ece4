"""Invariant 1: 250 means durable; every failure of ours before that is a 4xx."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
import redis

from smtpfleet.delivery.outcome import Finish
from smtpfleet.envelope import NewMessage, choose_shard, dedupe_fingerprint, new_qid
from smtpfleet.errors import QueueUnavailable, RedisUnsuitable
from smtpfleet.node import Node
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.testing import eventually, make_message, node_config, running_node, send
from smtpfleet.testing.redis_server import RedisServer
from smtpfleet.testing.sink import Sink

pytestmark = pytest.mark.timeout(90)


async def test_fsync_durability_accepts_on_an_aof_redis(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    overrides = {"redis": {"prefix": prefix}, "queue": {"durability": "fsync"}}
    async with running_node(node_config(redis_url, [sink.address], overrides)) as node:
        assert (await send(node.inbound.addresses[0])).code == 250
        await eventually(lambda: sink.count == 1)


async def test_a_confirmed_accept_is_marked_so_workers_need_not_hold_it(
    redis_url: str, prefix: str
) -> None:
    """After WAITAOF/WAIT the accept marks its body confirmed: a worker holds an unmarked entry
    up to `durability_timeout_ms` + 1 s, so without the mark every message waits that long.
    The worker here is another process's (its own queue): this process's reader would take the
    body from memory and never look at the mark."""
    config = node_config(
        redis_url, [], {"redis": {"prefix": prefix}, "queue": {"durability": "fsync"}}
    )
    queue = RedisQueue(config.redis, config.queue)
    elsewhere = RedisQueue(config.redis, config.queue)
    message = NewMessage(
        qid=new_qid(0), sender="s@example.com", recipients=("r@example.net",), data=b"x\r\n"
    )
    try:
        await queue.enqueue(message)

        async def marked() -> bool:
            return (await elsewhere.load_body(0, message.qid)).confirmed

        await eventually(marked, timeout_s=1.0)
    finally:
        await queue.close()
        await elsewhere.close()


async def test_a_finish_sent_twice_records_its_outcome_once(redis_url: str, prefix: str) -> None:
    """A finish whose reply was lost may be sent again (the worker's retry, a set-aside after
    it): the second changes nothing, so a dead letter is not recorded twice."""
    config = node_config(redis_url, [], {"redis": {"prefix": prefix}})
    queue = RedisQueue(config.redis, config.queue)
    message = NewMessage(
        qid=new_qid(0), sender="s@example.com", recipients=("r@example.net",), data=b"x\r\n"
    )
    try:
        await queue.enqueue(message)
        (delivery,) = await queue.read("w", count=10, block_ms=0)
        assert delivery.message is not None
        dead = Finish(dead=delivery.message, dead_reason="550 5.1.1 no such user")
        await queue.finish(delivery, dead)
        await queue.finish(delivery, dead)
        assert await queue.depth() == {"stream": 0, "retry": 0, "dead": 1}
    finally:
        await queue.close()


def _script_exists_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))


async def test_enqueue_costs_no_script_lookups_and_survives_a_script_flush(
    redis_url: str, prefix: str, sink: Sink, redis_client: redis.Redis
) -> None:
    overrides = {"redis": {"prefix": prefix}, "queue": {"durability": "fsync"}}
    async with running_node(node_config(redis_url, [sink.address], overrides)) as node:
        address = node.inbound.addresses[0]
        before = _script_exists_calls(redis_client)
        codes = [(await send(address)).code for _ in range(20)]
        # One round trip per accept: no SCRIPT EXISTS in front of each enqueue.
        assert _script_exists_calls(redis_client) - before < 5
        redis_client.script_flush()  # as after a Redis restart without its script cache
        codes.append((await send(address)).code)
        assert codes == [250] * 21
        await eventually(lambda: sink.count == 21)


async def test_unconfirmed_replication_answers_451_and_never_delivers(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    # No replica exists, so WAIT can never confirm: RFC 5321 4.2.5 says the copy we wrote
    # must not be delivered once we answered 4xx.
    overrides = {
        "redis": {"prefix": prefix},
        "queue": {"durability": "replicated", "replicas": 1, "durability_timeout_ms": 200},
    }
    async with running_node(node_config(redis_url, [sink.address], overrides)) as node:
        reply = await send(node.inbound.addresses[0])
        assert reply.code == 451
        assert reply.text.startswith("4.3.0")
        client, keys = node.queue.client, node.queue.keys
        streams = [await client.xinfo_stream(keys.stream(s)) for s in keys.all_shards()]
        # Positive control: the copy really was written before the 451 ...
        assert sum(info["entries-added"] for info in streams) == 1

        async def worker_disposed_of_it() -> bool:
            return await node.queue.depth() == {"stream": 0, "retry": 0, "dead": 0}

        # ... and the worker has read it and let it go (its body was tombstoned) ...
        await eventually(worker_disposed_of_it)
        assert node.worker.in_flight == 0
        assert sink.count == 0  # ... without delivering it


async def test_queue_above_high_water_answers_452(redis_url: str, prefix: str) -> None:
    overrides = {"redis": {"prefix": prefix, "shards": 1}, "queue": {"high_water": 2}}
    # No relay at all: messages wait in the queue (and count against the high-water mark).
    async with running_node(node_config(redis_url, [], overrides)) as node:
        codes = [(await send(node.inbound.addresses[0])).code for _ in range(3)]
        assert codes == [250, 250, 452]


async def test_refuses_to_start_on_a_redis_that_may_evict(tmp_path: object) -> None:
    with RedisServer(extra_args=["--maxmemory-policy", "allkeys-lru"]) as evicting:
        node = Node(node_config(evicting.url, []))
        with pytest.raises(RedisUnsuitable, match="maxmemory-policy"):
            await node.start()
        await node.close()


async def test_redis_down_mid_load_gives_451_only_and_loses_nothing(sink: Sink) -> None:
    with RedisServer(appendfsync="always") as redis:
        overrides = {"inbound": {"accept_timeout_s": 3.0}, "redis": {"socket_timeout_s": 1.0}}
        async with running_node(node_config(redis.url, [sink.address], overrides)) as node:
            address = node.inbound.addresses[0]
            accepted: list[bytes] = []
            codes: list[int] = []

            async def sender(worker: int) -> None:
                for i in range(40):
                    tag = f"<w{worker}-m{i}@load.test>"
                    reply = await send(address, data=make_message(message_id=tag))
                    codes.append(reply.code)
                    if reply.code == 250:
                        accepted.append(tag.encode())
                    await asyncio.sleep(0.02)

            load = asyncio.gather(*(sender(w) for w in range(5)))
            await eventually(lambda: codes.count(250) >= 10)
            redis.kill()
            started = time.monotonic()
            await eventually(lambda: 451 in codes)  # senders see the outage
            redis.restart()
            await load
            assert time.monotonic() - started < 60
            assert 451 in codes, "the outage was not seen by any client"
            assert set(codes) <= {250, 451}, f"unexpected replies: {sorted(set(codes))}"

            def all_delivered() -> bool:
                seen = {m.data.split(b"Message-ID: ")[1].split(b"\r\n")[0] for m in sink.messages}
                return set(accepted) <= seen

            await eventually(all_delivered, timeout_s=30)


async def test_a_resend_adopts_an_unconfirmed_copy_and_its_late_tombstone_spares_it(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/drills.md, known issues 1 and 3: node A's accept was not confirmed (451), and its
    tombstone is lost with a demoted primary or still on its way. The sender's resend must
    answer for A's copy, so one copy is delivered, not two; and A's tombstone, should it land
    after that 250, must not delete the copy the 250 stands for."""

    config = node_config(
        redis_url, [], {"redis": {"prefix": prefix}, "queue": {"durability": "fsync"}}
    )
    queue = RedisQueue(config.redis, config.queue)
    fingerprint = dedupe_fingerprint(
        "<resent@test>", "s@example.com", ("r@example.net",), content=b"the same message"
    )
    shard = choose_shard(fingerprint, config.redis.shards)

    def message() -> NewMessage:
        return NewMessage(
            qid=new_qid(shard),
            sender="s@example.com",
            recipients=("r@example.net",),
            data=make_message(message_id="<resent@test>"),
            fingerprint=fingerprint,
        )

    def unconfirmed(*args: object) -> None:
        raise QueueUnavailable("WAITAOF: the AOF fsync was not confirmed in time")

    tombstones: list[NewMessage] = []

    async def later(shard_: int, message_: NewMessage) -> None:
        tombstones.append(message_)  # the tombstone is still on its way

    try:
        first = message()
        with monkeypatch.context() as patch:
            patch.setattr(queue, "_require_confirmation", unconfirmed)
            patch.setattr(queue, "_cancel_quietly", later)
            with pytest.raises(QueueUnavailable):
                await queue.enqueue(first)
        resent = await queue.enqueue(message())
        assert resent.duplicate, "the resend was queued as a second copy"
        assert resent.qid == first.qid
        await queue._cancel_quietly(shard, tombstones[0])  # A's tombstone lands now
        body = await queue.load_body(shard, first.qid)
        assert body.data is not None, "the acknowledged resend was deleted with the first copy"
        assert body.confirmed
        assert await queue.depth() == {"stream": 1, "retry": 0, "dead": 0}
        # A confirmed copy still answers for its resends (RFC 1047).
        again = await queue.enqueue(message())
        assert again.duplicate
        assert again.qid == first.qid
        # A resend's 250 waits for durability like any accept's.
        with monkeypatch.context() as patch:
            patch.setattr(queue, "_require_confirmation", unconfirmed)
            with pytest.raises(QueueUnavailable):
                await queue.enqueue(message())
        assert (await queue.load_body(shard, first.qid)).data is not None
    finally:
        await queue.close()


@pytest.mark.solo  # bounds how long the 451 took
async def test_an_accept_answered_451_while_redis_stalled_is_not_applied_when_it_resumes(
    sink: Sink,
) -> None:
    """RFC 5321 §4.2.5 when Redis stalls rather than goes away (a stopped process, a frozen VM):
    the accept's script waits in its socket, the node answers 451, and no tombstone can land.
    When Redis resumes the script runs, after the 451: without its own deadline the copy was
    delivered, and a second one once the sender retried."""
    async with _delivering_one(sink, accept_timeout_s=1.0) as (server, node):
        address = node.inbound.addresses[0]
        os.kill(server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            reply = await send(address, data=b"Subject: stalled\r\n\r\nlate\r\n")
            answered_s = time.monotonic() - started
            await asyncio.sleep(0.5)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert reply.code == 451
        assert answered_s < 4.0
        await eventually(lambda: node.not_ready_reason() is None, timeout_s=15)
        await asyncio.sleep(1.0)  # time for a late write to be delivered
        assert await _entries_added(node) == 1
        assert sink.count == 1


@pytest.mark.solo  # times a Redis stall against the accept's budget
async def test_a_write_that_lands_after_its_451_but_in_time_is_tombstoned(sink: Sink) -> None:
    """A socket timeout shorter than the accept's budget: the node gives up on a stalled
    write and its first tombstone fails too, while Redis is still stopped. Redis resumes
    inside the budget, so the write runs and is in time by its own deadline: only the
    tombstones the node keeps sending until the deadline passes (`_cancel_until`) stop that
    copy, which the sender, told 451, sends again."""
    async with _delivering_one(sink, accept_timeout_s=6.0) as (server, node):
        os.kill(server.pid, signal.SIGSTOP)
        try:
            data = b"Subject: stalled, then in time\r\n\r\nlate\r\n"
            reply_task = asyncio.create_task(send(node.inbound.addresses[0], data=data))
            await asyncio.sleep(3.0)  # past the first tombstone's 2 s, inside the budget
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert (await reply_task).code == 451
        await eventually(lambda: node.not_ready_reason() is None, timeout_s=15)
        assert await _entries_added(node) == 2  # the write ran: it was in time
        await asyncio.sleep(1.5)  # time for the copy to be delivered, were it not tombstoned
        assert sink.count == 1


@contextlib.asynccontextmanager
async def _delivering_one(
    sink: Sink, *, accept_timeout_s: float
) -> AsyncIterator[tuple[RedisServer, Node]]:
    """A node on a Redis of its own (the tests stop it), with a 0.5 s socket timeout, after
    one message delivered: Redis's clock is learnt from accepts."""
    with RedisServer() as server:
        overrides = {
            "inbound": {"accept_timeout_s": accept_timeout_s},
            "redis": {"socket_timeout_s": 0.5},
        }
        async with running_node(node_config(server.url, [sink.address], overrides)) as node:
            assert (await send(node.inbound.addresses[0])).code == 250
            await eventually(lambda: sink.count == 1)
            assert server.pid is not None
            yield server, node


async def _entries_added(node: Node) -> int:
    """Entries ever written to the node's streams: a late write counts, even delivered."""
    client, keys = node.queue.client, node.queue.keys
    streams = [await client.xinfo_stream(keys.stream(s)) for s in keys.all_shards()]
    return sum(info["entries-added"] for info in streams)


async def test_a_reused_message_id_is_a_new_message_and_only_a_resend_is_a_duplicate(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    """Applications reuse a Message-ID (an alert's fixed id; RFC 5322 says not to): each such
    message is delivered. Only the same message again (a resend after a lost reply) is one."""
    overrides = {"redis": {"prefix": prefix}}
    async with running_node(node_config(redis_url, [sink.address], overrides)) as node:
        address = node.inbound.addresses[0]

        async def alert(data: bytes, recipient: str = "oncall@example.net") -> str:
            reply = await send(address, recipients=[recipient], data=data)
            assert reply.code == 250, reply
            return reply.text.rsplit(" ", 1)[-1]

        full = make_message(subject="disk full", message_id="<fixed@alerts>")
        fine = make_message(subject="disk fine", message_id="<fixed@alerts>")
        first = await alert(full)
        assert await alert(full) == first  # a resend (the same bytes): the first copy answers
        assert await alert(fine) != first
        assert await alert(full, "ONCALL@example.net") != first  # another mailbox
        await eventually(lambda: sink.count == 3)
        await asyncio.sleep(0.3)
        assert sink.count == 3


async def test_a_full_redis_is_named_as_such_not_as_unreachable(
    sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """At its maxmemory Redis answers, and refuses writes: the heartbeat's among them, so the
    node fences. It said "Redis unreachable" (readyz) and "no Redis" (log), which sends an
    operator to the network; waiting does not help, freeing memory does."""
    with RedisServer(extra_args=["--maxmemory", "3mb"]) as server:
        overrides = {
            "cluster": {"heartbeat_interval_s": 0.2, "lease_s": 1.5, "lease_refresh_s": 0.3},
        }
        async with running_node(node_config(server.url, [sink.address], overrides)) as node:
            address = node.inbound.addresses[0]
            assert (await send(address)).code == 250
            await eventually(lambda: sink.count == 1)
            filler = redis.Redis.from_url(server.url)
            try:
                filled = itertools.count()

                def full() -> bool:
                    # Kept full: what is freed (a client's buffers) would let a beat through.
                    with contextlib.suppress(redis.exceptions.OutOfMemoryError):
                        while True:
                            filler.set(f"filler:{next(filled)}", b"x" * 65536)
                    return node.not_ready_reason() is not None

                def fence_logged() -> list[str]:
                    said = [r.getMessage() for r in caplog.records]
                    return [line for line in said if "refuses writes" in line]

                with caplog.at_level(logging.ERROR, logger="smtpfleet.cluster.membership"):
                    await eventually(full, timeout_s=10, interval_s=0.1)
                    assert node.not_ready_reason() == "Redis full (maxmemory): it refuses writes"
                    assert (await send(address)).code == 451  # never 5xx for our trouble
                    await eventually(lambda: full() and fence_logged(), timeout_s=5)
                assert "full at its maxmemory" in fence_logged()[0]
                assert not [r for r in caplog.records if "no Redis" in r.getMessage()]
                for key in filler.scan_iter("filler:*"):
                    filler.delete(key)
            finally:
                filler.close()
            await eventually(lambda: node.not_ready_reason() is None, timeout_s=10)
            assert (await send(address)).code == 250
            await eventually(lambda: sink.count == 2)
