"""Self-fencing and lease refresh, with in-process nodes on a private Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from smtpfleet.testing import eventually, node_config, running_node, send
from smtpfleet.testing.redis_server import RedisServer
from smtpfleet.testing.sink import Sink
from smtpfleet.testing.wire import Wire

pytestmark = pytest.mark.timeout(60)


async def test_node_cut_off_from_redis_fences_itself_and_recovers(sink: Sink) -> None:
    with RedisServer(appendfsync="always") as redis:
        config = node_config(redis.url, [sink.address], {"redis": {"socket_timeout_s": 0.5}})
        async with running_node(config) as node:
            assert node.not_ready_reason() is None
            redis.kill()
            await eventually(lambda: node.membership.fenced, timeout_s=5)
            assert node.not_ready_reason() == "Redis unreachable"
            assert (await send(node.inbound.addresses[0])).code == 451
            # Said at MAIL, not after the whole message and the accept timeout: the sender
            # tries the next MX at once.
            wire = await Wire.open(node.inbound.addresses[0])
            try:
                assert (await wire.reply()).startswith("220")
                assert (await wire.cmd("EHLO client.test")).startswith("250")
                assert (await wire.cmd("MAIL FROM:<a@example.com>")).startswith("451 4.3.0")
            finally:
                await wire.close()
            redis.restart()
            await eventually(lambda: not node.membership.fenced, timeout_s=10)
            assert (await send(node.inbound.addresses[0])).code == 250
            await eventually(lambda: sink.count == 1, timeout_s=10)


async def test_in_flight_entries_keep_their_lease_fresh(redis_url: str, prefix: str) -> None:
    # A slow relay makes one delivery last seconds. Lease refresh must keep the entry's idle
    # time near zero all along, so neither takeover nor the idle-claim safety net of another
    # node can take work that is still on the wire.
    overrides: dict[str, Any] = {
        "redis": {"prefix": prefix, "shards": 1},
        "delivery": {"connect_timeout_s": 3.0, "command_timeout_s": 3.0},
        "cluster": {"lease_refresh_s": 0.3},
        "health": {"interval_s": 5.0, "timeout_s": 4.0},
    }
    async with Sink(name="slow") as slow:
        slow.faults.delay_s = 0.7  # every reply: ~3 s for one message
        config = node_config(redis_url, [slow.address], overrides)
        async with running_node(config) as node:
            assert (await send(node.inbound.addresses[0])).code == 250
            stream = node.queue.keys.stream(0)
            idle_ms: list[int] = []
            while slow.count == 0:
                rows = await node.queue.client.xpending_range(stream, "delivery", "-", "+", 10)
                idle_ms += [row["time_since_delivered"] for row in rows]
                await asyncio.sleep(0.1)
            assert len(idle_ms) > 20  # we watched a delivery of more than two seconds
            assert max(idle_ms) < 1200, f"lease not refreshed: idle up to {max(idle_ms)} ms"
