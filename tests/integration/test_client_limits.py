"""Per-client limits that hold across the cluster (issue #12), on real nodes and a real Redis.

A client that spreads its sessions or its mail over two nodes meets one count; with Redis
gone each node still counts on its own; a dead node's sessions stop counting once their
leases expire; a client trickling DATA is cut while a normal one in parallel is not.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis

from smtpfleet import replies
from smtpfleet.config import Config
from smtpfleet.inbound.limits import LocalClientCounter
from smtpfleet.metrics import Metrics
from smtpfleet.node import Node
from smtpfleet.queue.client_limits import RedisClientCounter
from smtpfleet.queue.keys import Keys
from smtpfleet.testing import RedisServer, Sink, eventually, node_config, running_node, send
from smtpfleet.testing.inbound import inbound_front
from smtpfleet.testing.memory import Clock
from smtpfleet.testing.wire import Wire

pytestmark = pytest.mark.timeout(60)

WAIT_S = 10.0
CLIENT = "127.0.0.1"
REFUSALS = "smtpfleet_client_limit_refusals_total"
QUEUED = "smtpfleet_smtp_messages_total"


def limited(redis_url: str, sink: Sink, prefix: str, **inbound: Any) -> Config:
    """A node on which loopback is an ordinary client: no relay_networks, so it is limited."""
    overrides = {
        "redis": {"prefix": prefix},
        "inbound": {"relay_networks": [], "accepted_domains": ["example.net"], **inbound},
    }
    return node_config(redis_url, [sink.address], overrides)


def address(node: Node) -> tuple[str, int]:
    return node.inbound.addresses[0]


def sample(node: Node, name: str, labels: Mapping[str, str] | None = None) -> float:
    return node.metrics.registry.get_sample_value(name, dict(labels or {})) or 0.0


async def greeted(node: Node) -> Wire:
    wire = await Wire.open(address(node))
    assert (await wire.reply()).startswith("220 ")
    return wire


async def first_reply(node: Node) -> str:
    """The first thing a new session hears, and the session closed again."""
    wire = await Wire.open(address(node))
    try:
        return await wire.reply()
    finally:
        await wire.close()


async def transaction(wire: Wire, *recipients: str) -> list[str]:
    """MAIL and each RCPT: their replies."""
    said = [await wire.cmd("MAIL FROM:<s@example.com>")]
    for recipient in recipients:
        said.append(await wire.cmd(f"RCPT TO:<{recipient}>"))
    return said


# -- sessions ---------------------------------------------------------------------------------


async def test_sessions_spread_over_two_nodes_meet_one_cap(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    config = limited(redis_url, sink, prefix, limits={"sessions": 3})
    async with running_node(config) as one, running_node(config) as two:
        first, second = await greeted(one), await greeted(one)
        third = await greeted(two)
        # Each node alone holds fewer than three: only the cluster's count refuses this one.
        refused = await Wire.open(address(two))
        assert await refused.reply() == replies.CLIENT_TOO_MANY_SESSIONS + "\r\n"
        assert await refused.closed()
        await refused.close()
        assert sample(two, REFUSALS, {"limit": "sessions"}) == 1
        assert await first_reply(one) == replies.CLIENT_TOO_MANY_SESSIONS + "\r\n"
        # A session that ends gives its place back, on every node.
        assert await first.cmd("QUIT") == replies.BYE + "\r\n"
        await first.close()

        async def admitted() -> bool:
            return (await first_reply(two)).startswith("220 ")

        await eventually(admitted, timeout_s=WAIT_S)
        for wire in (second, third):
            await wire.close()


async def test_clients_gone_before_the_banner_give_their_places_back(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    """A load balancer's TCP health check, or a scanner: connect, close, never read. Its
    end-of-file cancelled the session while its place was being counted in Redis, before the
    banner, where nothing closed the connection (aiosmtpd keeps it half open): each check kept
    a file descriptor, a node session and a place in the client's cluster-wide count for
    good, until the client, and then everyone, was refused."""
    config = limited(redis_url, sink, prefix, limits={"sessions": 3})
    async with running_node(config) as node:
        for _ in range(10):
            _reader, writer = await asyncio.open_connection(*address(node))
            writer.close()
            await writer.wait_closed()
        await eventually(lambda: node.inbound.active_sessions == 0, timeout_s=WAIT_S)
        wire = await greeted(node)  # the client's places came back too
        assert await wire.cmd("QUIT") == replies.BYE + "\r\n"
        await wire.close()
        assert sample(node, REFUSALS, {"limit": "sessions"}) == 0


async def test_a_dead_nodes_sessions_stop_counting_when_their_leases_expire(
    redis_url: str, prefix: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    keys = Keys(prefix, 4)

    def counter(owner: str) -> RedisClientCounter:
        return RedisClientCounter(
            client,
            keys,
            owner=owner,
            lease_s=1.0,
            fallback=LocalClientCounter(Clock()),
            metrics=Metrics(),
            timeout_s=1.0,
        )

    dead, alive = counter("dead"), counter("alive")
    refresher = asyncio.create_task(alive.run(interval_s=0.2))
    try:
        assert await dead.open_session(CLIENT, "1") == 1
        assert await dead.open_session(CLIENT, "2") == 2
        assert await alive.open_session(CLIENT, "1") == 3
        # `dead` never renews or closes (its node died); `alive` keeps its leases fresh.

        async def dead_ones_gone() -> bool:
            return await alive.open_session(CLIENT, "2") == 2

        await eventually(dead_ones_gone, timeout_s=WAIT_S)
        await alive.close_session(CLIENT, "2", 0)
        assert await client.zcard(keys.client_sessions(CLIENT)) == 1  # alive's first
        assert 0 < await client.pttl(keys.client_sessions(CLIENT)) <= 1000
    finally:
        refresher.cancel()
        await asyncio.gather(refresher, return_exceptions=True)
        await client.aclose()


def proxy_v1(source: str) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 40000 25\r\n".encode()


async def test_behind_a_proxy_each_proxied_client_is_counted_as_itself() -> None:
    settings = {
        "listen": [],
        "listeners": [{"address": "127.0.0.1:0", "proxy_protocol": True}],
        "trusted_proxies": ["127.0.0.1/32"],
        "accepted_domains": ["example.net"],
        # The balancer's own address may relay; the clients it brings are limited all the same.
        "relay_networks": ["127.0.0.0/8"],
        "limits": {"sessions": 1},
    }
    async with inbound_front(settings) as front:
        wires = []
        for client in ("198.51.100.1", "198.51.100.2", "198.51.100.1"):
            wire = await Wire.open(front.address())
            wire.send(proxy_v1(client))
            wires.append((wire, await wire.reply()))
        said = [reply for _, reply in wires]
        assert said[0].startswith("220 ")
        assert said[1].startswith("220 ")  # another client behind the same balancer
        assert said[2] == replies.CLIENT_TOO_MANY_SESSIONS + "\r\n"
        for wire, _ in wires:
            await wire.close()


# -- messages and recipients ------------------------------------------------------------------


async def test_messages_spread_over_two_nodes_meet_one_limit(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    config = limited(redis_url, sink, prefix, limits={"messages_per_minute": 3})
    async with running_node(config) as one, running_node(config) as two:
        nodes = [one, two, one]
        for node in nodes:  # three messages, no node has seen more than two
            assert (await send(address(node), recipients=["r@example.net"])).code == 250
        refused = await send(address(two), recipients=["r@example.net"])
        assert (refused.code, refused.text) == (451, replies.CLIENT_TOO_MANY_MESSAGES[4:])
        assert (await send(address(one), recipients=["r@example.net"])).code == 451
        assert sample(two, REFUSALS, {"limit": "messages"}) == 1
        assert sample(one, QUEUED, {"result": "queued"}) == 2


async def test_recipients_spread_over_two_nodes_meet_one_limit(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    config = limited(redis_url, sink, prefix, limits={"recipients_per_minute": 4})
    async with running_node(config) as one, running_node(config) as two:
        wire = await greeted(one)
        await wire.cmd("EHLO client.test")
        said = await transaction(wire, "a@example.net", "b@example.net", "c@example.net")
        assert all(reply.startswith("250 ") for reply in said)
        await wire.cmd("RSET")
        # The next MAIL counts the three: the cluster has them now.
        assert (await wire.cmd("MAIL FROM:<s@example.com>")).startswith("250 ")
        other = await greeted(two)
        await other.cmd("EHLO client.test")
        said = await transaction(other, "d@example.net", "e@example.net")
        assert said[:2] == [replies.SENDER_OK + "\r\n", replies.RCPT_OK + "\r\n"]
        assert said[2] == replies.CLIENT_TOO_MANY_RECIPIENTS + "\r\n"
        # And every MAIL of this minute now, on either node.
        await other.cmd("RSET")
        assert await other.cmd("MAIL FROM:<s@example.com>") == (
            replies.CLIENT_TOO_MANY_RECIPIENTS + "\r\n"
        )
        for each in (wire, other):
            await each.close()
        assert sample(two, REFUSALS, {"limit": "recipients"}) == 2


async def test_a_repeated_recipient_is_neither_limited_nor_counted(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    """A RCPT the transaction holds already is taken once: a 451 for it at the limit would
    have the client send it again later, a second delivery to that mailbox."""
    config = limited(redis_url, sink, prefix, limits={"recipients_per_minute": 3})
    async with running_node(config) as node:
        wire = await greeted(node)
        await wire.cmd("EHLO client.test")
        said = await transaction(wire, "a@example.net", "a@example.net", "b@example.net")
        ok, repeat = replies.RCPT_OK + "\r\n", replies.RCPT_DUPLICATE + "\r\n"
        assert said[1:] == [ok, repeat, ok], said
        # The repeat did not count: a third mailbox still fits the minute's three ...
        assert await wire.cmd("RCPT TO:<c@example.net>") == ok
        # ... and at the limit a repeat is still taken once, a new one is not.
        assert await wire.cmd("RCPT TO:<b@example.net>") == repeat
        assert await wire.cmd("RCPT TO:<Postmaster>") == (
            replies.CLIENT_TOO_MANY_RECIPIENTS + "\r\n"
        )
        assert (await wire.cmd("DATA")).startswith("354")
        assert (await wire.cmd("Subject: once\r\n\r\nbody\r\n.")).startswith("250 ")
        await wire.close()
        await eventually(lambda: sink.count == 1)
        assert sink.messages[0].recipients == ("a@example.net", "b@example.net", "c@example.net")
        assert sample(node, REFUSALS, {"limit": "recipients"}) == 1


# -- Redis away -------------------------------------------------------------------------------


@asynccontextmanager
async def node_on_own_redis(sink: Sink, prefix: str, **limits: Any) -> AsyncIterator[Node]:
    with RedisServer() as redis:
        config = limited(redis.url, sink, prefix, limits=limits)
        async with running_node(config) as node:
            await asyncio.to_thread(redis.stop)
            yield node


async def test_without_redis_each_node_still_limits_sessions_and_messages(
    prefix: str, sink: Sink
) -> None:
    async with node_on_own_redis(sink, prefix, sessions=2, messages_per_minute=2) as node:
        first = await greeted(node)
        await first.cmd("EHLO client.test")
        for _ in range(2):
            assert (await first.cmd("MAIL FROM:<s@example.com>")).startswith("250 ")
            await first.cmd("RSET")
        assert await first.cmd("MAIL FROM:<s@example.com>") == (
            replies.CLIENT_TOO_MANY_MESSAGES + "\r\n"
        )
        second = await greeted(node)
        assert await first_reply(node) == replies.CLIENT_TOO_MANY_SESSIONS + "\r\n"
        assert sample(node, "smtpfleet_client_limits_shared") == 0
        assert sample(node, "smtpfleet_client_limit_fallbacks_total") >= 4
        for wire in (first, second):
            await wire.close()


async def test_a_frozen_redis_is_not_waited_for_beyond_its_timeout(prefix: str, sink: Sink) -> None:
    # SIGSTOP: connections hang instead of failing. A session's limit check gives up after
    # limits.redis_timeout_s (a deadline, deadlines.py) and this node's own count decides.
    with RedisServer() as redis:
        config = limited(redis.url, sink, prefix, limits={"sessions": 1, "redis_timeout_s": 0.3})
        async with running_node(config) as node:
            assert redis.pid is not None
            os.kill(redis.pid, signal.SIGSTOP)
            try:
                loop = asyncio.get_running_loop()
                started = loop.time()
                first = await greeted(node)
                waited = loop.time() - started
                assert 0.3 <= waited < 2.0, waited
                assert await first_reply(node) == replies.CLIENT_TOO_MANY_SESSIONS + "\r\n"
                assert sample(node, "smtpfleet_client_limit_fallbacks_total") >= 1
                await first.close()
            finally:
                os.kill(redis.pid, signal.SIGCONT)


# -- slow DATA --------------------------------------------------------------------------------


async def test_a_client_trickling_data_is_cut_while_a_normal_one_is_fine(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    config = limited(redis_url, sink, prefix, min_data_rate_bps=200, data_rate_window_s=1)
    async with running_node(config) as node:
        slow = await greeted(node)
        await slow.cmd("EHLO client.test")
        await transaction(slow, "slow@example.net")
        assert (await slow.cmd("DATA")).startswith("354 ")

        async def trickle() -> str:
            while True:  # 10 bytes every 0.2 s: 50 bytes a second
                slow.send(b"X-Slow: 1\r\n")
                try:
                    return await asyncio.wait_for(slow.reader.readline(), 0.2)
                except TimeoutError:
                    continue

        async def normal() -> int:
            await asyncio.sleep(0.5)  # while the slow one is in DATA
            return (await send(address(node), recipients=["fast@example.net"])).code

        cut, code = await asyncio.gather(asyncio.wait_for(trickle(), WAIT_S), normal())
        assert cut.decode() == replies.DATA_TOO_SLOW + "\r\n"
        assert code == 250
        # What the slow client still sends (its final dot) queues nothing after the 421.
        slow.send(b".\r\n")
        await eventually(lambda: node.inbound.active_sessions == 0, timeout_s=WAIT_S)
        await slow.close()
        assert sample(node, QUEUED, {"result": "queued"}) == 1
        assert sample(node, REFUSALS, {"limit": "data_rate"}) == 1
