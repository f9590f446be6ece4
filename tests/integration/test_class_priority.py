"""Traffic classes with a real relay and Redis (issue #14): a bulk backlog built during a relay
outage does not hold back transactional mail sent after it, and `status` and the metrics show
each class's backlog."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from smtpfleet.queue.redis_admin import Admin
from smtpfleet.testing import eventually, node_config, running_node, send
from smtpfleet.testing.client import make_message
from smtpfleet.testing.sink import Sink

pytestmark = pytest.mark.timeout(60)

BULK_SENDER = "news@news.example"
BULK = 150
URGENT = 30
HEADER = "X-Smtpfleet-Class"


def _config(redis_url: str, prefix: str, sink: Sink) -> Any:
    return node_config(
        redis_url,
        [sink.address],
        {
            "redis": {"prefix": prefix},
            "delivery": {"concurrency": 4, "block_ms": 200},
            "queue": {
                "classes": [
                    {"name": "transactional"},
                    {"name": "bulk", "sender_domains": ["news.example"]},
                ],
                "class_header": HEADER,
            },
        },
    )


async def _send_all(address: tuple[str, int], count: int, sender: str) -> list[int]:
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> int:
        async with gate:
            reply = await send(address, sender=sender, recipients=[f"r{i}@mail.example"])
            return reply.code

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def test_transactional_mail_overtakes_a_bulk_backlog_after_an_outage(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    config = _config(redis_url, prefix, sink)
    async with running_node(config) as node:
        address = node.inbound.addresses[0]
        await sink.stop()
        await eventually(lambda: not node.health.healthy, timeout_s=10)
        assert set(await _send_all(address, BULK, BULK_SENDER)) == {250}
        # After the backlog: plain mail, and bulk-domain mail whose trusted header asks for
        # the transactional class.
        urgent = await _send_all(address, URGENT - 1, "reset@shop.example")
        data = f"{HEADER}: transactional\r\n".encode() + make_message(sender=BULK_SENDER)
        urgent.append((await send(address, sender=BULK_SENDER, data=data)).code)
        assert set(urgent) == {250}

        status = await Admin(node.queue).status(config.cluster.lease_s)
        classes = status["queue"]["classes"]
        assert list(classes) == ["transactional", "bulk"]
        waiting = {name: c["ready"] + c["retry"] + c["in_flight"] for name, c in classes.items()}
        assert waiting == {"transactional": URGENT, "bulk": BULK}

        await sink.start()
        await eventually(lambda: sink.count == BULK + URGENT, timeout_s=30)

    bulk = [m.sender == BULK_SENDER and m.recipients[0].startswith("r") for m in sink.messages]
    last_urgent = max(i for i, is_bulk in enumerate(bulk) if not is_bulk)
    # One FIFO queue would deliver them last (after all BULK); both classes read alike, about
    # one bulk per transactional one (last near 2 x URGENT). With priority only the bulk in
    # flight at the heal (4 slots) and bulk's floor (1 slot per shard read) come first.
    print(
        [
            (s.name, s.labels, s.value)
            for m in node.registry.collect()
            if m.name == "smtpfleet_deliveries"
            for s in m.samples
        ]
    )
    assert last_urgent < URGENT + 10, f"the last transactional one arrived {last_urgent + 1}th"
    delivered = node.registry.get_sample_value(
        "smtpfleet_class_delivery_latency_seconds_count", {"class": "transactional"}
    )
    assert delivered == URGENT
    bulk_delivered = node.registry.get_sample_value(
        "smtpfleet_class_delivery_latency_seconds_count", {"class": "bulk"}
    )
    assert bulk_delivered == BULK
