"""Relay limits shared by the whole cluster, and the rule for "no relay is healthy"."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from smtpfleet.loadgen import run_load
from smtpfleet.node import Node
from smtpfleet.relays.pool import LIMIT_POLL_S
from smtpfleet.testing import eventually, node_config, running_node, send
from smtpfleet.testing.sink import Sink

pytestmark = pytest.mark.timeout(60)

QUIET_HEALTH = {"interval_s": 30.0, "timeout_s": 1.0}  # probes would open sessions too


def limited(prefix: str, sink: Sink, **limits: Any) -> dict[str, Any]:
    host, port = sink.address.rsplit(":", 1)
    return {
        "redis": {"prefix": prefix},
        "health": QUIET_HEALTH,
        "relays": [{"name": "only", "host": host, "port": int(port), **limits}],
    }


@contextlib.asynccontextmanager
async def two_nodes_at_the_limit(
    redis_url: str, prefix: str, sink: Sink, messages: int
) -> AsyncIterator[tuple[Node, Node]]:
    """Two nodes sharing `max_connections: 2` to `sink`, once it has counted `messages` sent
    to both (every one answered 250); `sink.peak_sessions` counts from their start."""
    sink.faults.delay_s = 0.02  # sessions overlap unless something stops them
    overrides = limited(prefix, sink, max_connections=2)
    configs = [
        node_config(redis_url, [], overrides | {"node": {"id": name}}) for name in ("a", "b")
    ]
    async with running_node(configs[0]) as a, running_node(configs[1]) as b:
        sink.peak_sessions = sink.open_sessions
        addresses = [a.inbound.addresses[0], b.inbound.addresses[0]]
        replies = await asyncio.gather(*(send(addresses[i % 2]) for i in range(messages)))
        assert {r.code for r in replies} == {250}
        await eventually(lambda: sink.count == messages, timeout_s=30)
        yield a, b


async def test_connection_limit_holds_across_nodes(redis_url: str, prefix: str, sink: Sink) -> None:
    async with two_nodes_at_the_limit(redis_url, prefix, sink, 30):
        assert sink.peak_sessions <= 2, f"{sink.peak_sessions} sessions at once"


async def test_chained_sessions_keep_the_limit_and_starve_no_node(
    redis_url: str, prefix: str
) -> None:
    """Sessions that pass from message to message (chaining, on a relay that pipelines) never
    go idle: the cluster-wide limit still holds, and the node waiting for a lease is not left
    to park its mail ("limited") while the other node's sessions run back to back."""
    async with (
        Sink(name="chaining", pipelining=True) as sink,
        two_nodes_at_the_limit(redis_url, prefix, sink, 40) as nodes,
    ):
        assert sink.peak_sessions <= 2, f"{sink.peak_sessions} sessions at once"

        def total(metric: str, **labels: str) -> float:
            return sum(n.registry.get_sample_value(metric, labels) or 0 for n in nodes)

        # Counted once the relay's 250 is read, a moment after the relay counted the message.
        await eventually(
            lambda: total("smtpfleet_deliveries_total", relay="only", outcome="2xx") == 40
        )
        assert total("smtpfleet_deliveries_total", relay="only", outcome="limited") == 0
        assert total("smtpfleet_relay_chained_messages_total", relay="only") >= 1


@pytest.mark.solo
async def test_rate_limit_holds_across_nodes(redis_url: str, prefix: str, sink: Sink) -> None:
    overrides = limited(prefix, sink, max_messages_per_s=5)
    configs = [
        node_config(redis_url, [], overrides | {"node": {"id": name}}) for name in ("a", "b")
    ]
    async with running_node(configs[0]) as a, running_node(configs[1]) as b:
        addresses = [a.inbound.addresses[0], b.inbound.addresses[0]]
        replies = await asyncio.gather(*(send(addresses[i % 2]) for i in range(25)))
        assert {r.code for r in replies} == {250}
        await eventually(lambda: sink.count == 25, timeout_s=30)
        arrivals = sorted(m.at for m in sink.messages)
        # A per-second budget of 5: 25 messages need five one-second windows, so the sends
        # span at least three seconds (a fixed window allows a burst across each boundary).
        # A second of it is left to how long each delivery took: a first one that opened its
        # connection on a busy machine once ate most of the margin of a tighter bound.
        assert arrivals[-1] - arrivals[0] > 2.0


async def test_when_no_relay_is_healthy_mail_waits_and_nothing_bounces(
    redis_url: str, prefix: str
) -> None:
    async with Sink(name="down") as sink:
        port = sink.port
    # The only relay is gone: mail is still accepted, queued, never bounced.
    overrides = {
        "redis": {"prefix": prefix},
        "health": {"interval_s": 0.2, "timeout_s": 0.5, "fall": 1, "rise": 1},
    }
    async with running_node(node_config(redis_url, [f"127.0.0.1:{port}"], overrides)) as node:
        await eventually(lambda: not node.health.healthy, timeout_s=5)
        for _ in range(5):
            assert (await send(node.inbound.addresses[0])).code == 250

        def failed_checks() -> float:
            labels = {"relay": "relay-1", "result": "fail"}
            return node.registry.get_sample_value("smtpfleet_health_checks_total", labels) or 0

        # The node keeps running with the relay down for several health intervals (each a
        # chance to bounce or drop the mail) before we look at where the mail is.
        after_sending = failed_checks()
        await eventually(lambda: failed_checks() >= after_sending + 5, timeout_s=10)
        depth = await node.queue.depth()
        assert depth["stream"] + depth["retry"] == 5
        assert depth["dead"] == 0
        assert node.not_ready_reason() is None  # still takes mail
        async with Sink(port=port, name="back") as back:
            await eventually(lambda: back.count == 5, timeout_s=10)
            assert all(m.sender == "sender@example.com" for m in back.messages)  # no DSN


async def test_mail_held_back_by_our_own_limit_is_not_sent_to_the_backoff(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    """FINDINGS.md: with the relay's one connection busy on the other node, a delivery that
    found no lease was retried like a relay's 4xx, minutes later. Now it is parked for
    seconds and counted as no attempt, so everything arrives although the retry is an hour."""
    sink.faults.delay_s = 0.2  # the node holding the one lease keeps it past the lease wait
    overrides = limited(prefix, sink, max_connections=1) | {
        "retry": {"initial_s": 3600, "max_s": 3600, "jitter": 0, "scheduler_interval_s": 0.1}
    }
    configs = [
        node_config(redis_url, [], overrides | {"node": {"id": name}}) for name in ("a", "b")
    ]
    async with running_node(configs[0]) as a, running_node(configs[1]) as b:
        addresses = [a.inbound.addresses[0], b.inbound.addresses[0]]
        replies = await asyncio.gather(*(send(addresses[i % 2]) for i in range(10)))
        assert {r.code for r in replies} == {250}
        await eventually(lambda: sink.count == 10, timeout_s=45)
        limited_attempts = sum(
            node.registry.get_sample_value(
                "smtpfleet_deliveries_total", {"relay": "only", "outcome": "limited"}
            )
            or 0
            for node in (a, b)
        )
        assert limited_attempts > 0, "the limit was never reached: the test proves nothing"


async def test_nodes_at_the_relays_limit_share_its_connections_and_park_nothing(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    """More mail than the relay's cluster-wide connections carry, on two nodes. A node whose
    sessions are all busy waits for one of them (not for a lease until it parks the mail), and
    a node that holds none gets one because the other gives back what is above its share. Before,
    each node's extra deliveries waited 1 s for a lease and were parked ("limited") for a retry
    with a healthy relay: the seconds-long tail of `bench.py` with two workers."""
    sink.faults.delay_s = 0.01  # 4 replies per message: about 25 messages/s per connection
    overrides = limited(prefix, sink, max_connections=4)
    configs = [
        node_config(redis_url, [], overrides | {"node": {"id": name}}) for name in ("a", "b")
    ]
    async with running_node(configs[0]) as a, running_node(configs[1]) as b:
        sink.peak_sessions = sink.open_sessions
        targets = [a.inbound.addresses[0], b.inbound.addresses[0]]
        async with aioredis.Redis.from_url(redis_url) as redis:
            await redis.config_resetstat()
            started = time.monotonic()
            result = await run_load(targets, total=400, concurrency=40, per_session=1000)
            assert result.accepted == 400
            await eventually(lambda: sink.count == 400, timeout_s=40)
            asked = await lease_requests(redis)
            polls = 2 * (time.monotonic() - started) / LIMIT_POLL_S  # one ask a poll a node
        delivered = [deliveries(node, "2xx") for node in (a, b)]
        assert [deliveries(node, "limited") for node in (a, b)] == [0, 0], delivered
        assert min(delivered) >= 40, f"one node starved: {delivered}"
        assert sink.peak_sessions <= 4, f"{sink.peak_sessions} sessions at once"
        # Each node settles at its share instead of taking every lease the other gives back
        # and returning it after one message (a new relay connection every two messages).
        assert sink.connections <= 40, f"{sink.connections} relay connections for 400 messages"
        # A session given back wakes every waiting delivery; only one can have it, and the
        # others must not each ask Redis for a lease the full relay will refuse.
        assert asked <= 1.5 * polls + 50, f"{asked} lease requests, {polls:.0f} poll intervals"


async def lease_requests(redis: aioredis.Redis) -> int:
    """ACQUIRE_LEASE runs since the stats were reset: the only script that calls ZSCORE."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_zscore", {}).get("calls", 0))


def deliveries(node: Any, outcome: str) -> float:
    labels = {"relay": "only", "outcome": outcome}
    return node.registry.get_sample_value("smtpfleet_deliveries_total", labels) or 0
