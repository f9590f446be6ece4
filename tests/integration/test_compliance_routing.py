"""Compliance routing with real relays: a rule's mail never leaves through another relay."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from smtpfleet.testing import (
    domain_routed_first_to,
    eventually,
    node_config,
    ring_order,
    running_node,
    send,
)
from smtpfleet.testing.sink import Sink

pytestmark = pytest.mark.timeout(60)


def _relays(sink: Sink, sink_b: Sink) -> list[dict[str, Any]]:
    return [
        {"name": "relay-1", "host": sink.host, "port": sink.port, "tags": ["hipaa"]},
        {"name": "relay-2", "host": sink_b.host, "port": sink_b.port},
    ]


async def test_rule_bound_mail_waits_for_its_relay_and_never_leaks(
    redis_url: str, prefix: str, sink: Sink, sink_b: Sink
) -> None:
    overrides = {
        "redis": {"prefix": prefix},
        "relays": _relays(sink, sink_b),
        "routing": {
            "rules": [
                {"name": "hipaa", "sender_domains": ["clinic.example"], "relays": {"tags": "hipaa"}}
            ]
        },
    }
    config = node_config(redis_url, [], overrides)
    async with running_node(config) as node:
        await sink.stop()
        await eventually(lambda: "relay-1" not in node.health.healthy, timeout_s=10)
        reply = await send(node.inbound.addresses[0], sender="doc@clinic.example")
        assert reply.code == 250
        # Unrestricted mail still flows through relay-2 meanwhile.
        assert (await send(node.inbound.addresses[0])).code == 250
        await eventually(lambda: sink_b.count == 1, timeout_s=10)
        await asyncio.sleep(3)  # more than one park (2 s): it was tried and held back
        assert sink_b.count == 1
        assert [m.sender for m in sink_b.messages] == ["sender@example.com"]
        assert (await node.queue.depth())["retry"] == 1
        await sink.start()
        await eventually(lambda: sink.count == 1, timeout_s=15)
        assert sink.messages[0].sender == "doc@clinic.example"
        assert sink_b.count == 1


async def test_a_4xx_falls_over_to_another_providers_relay_first(
    redis_url: str, prefix: str, sink: Sink, sink_b: Sink
) -> None:
    async with Sink(name="sink-c") as sink_c:
        relays = [
            {"name": "relay-1", "host": sink.host, "port": sink.port, "provider": "a"},
            {"name": "relay-2", "host": sink_c.host, "port": sink_c.port, "provider": "a"},
            {"name": "relay-3", "host": sink_b.host, "port": sink_b.port, "provider": "b"},
        ]
        overrides = {
            "redis": {"prefix": prefix},
            "relays": relays,
            "retry": {"initial_s": 3600, "max_s": 3600},
        }
        config = node_config(redis_url, [], overrides)
        domain = domain_routed_first_to(config, "relay-1")
        assert ring_order(config, domain) == ["relay-1", "relay-3", "relay-2"]
        sink.faults.data_replies = ["451 4.3.0 Try again later"] * 10
        async with running_node(config) as node:
            reply = await send(node.inbound.addresses[0], recipients=[f"r@{domain}"])
            assert reply.code == 250
            await eventually(lambda: sink_b.count == 1, timeout_s=10)
            assert len(sink.rejected) == 1
            assert sink_c.count == 0
