"""Passive checks end to end: real delivery failures, through the worker, eject a relay.

The unit tests cover `PassiveEjector`'s counting; this drives 421s from a real relay through a
running node and watches the node's healthy set, its published view and its metrics change,
so removing the worker's wiring to the health monitor fails here.
"""

from __future__ import annotations

import pytest
import redis

from smtpfleet.queue.keys import Keys
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

FAILURES = 3  # health.passive_failures
CLOSING = "421 4.3.2 Service shutting down"


async def test_real_421s_eject_the_relay_and_mail_goes_to_the_other(
    redis_url: str, prefix: str, redis_client: redis.Redis, sink: Sink, sink_b: Sink
) -> None:
    overrides = {
        "node": {"id": "ejector"},
        "redis": {"prefix": prefix},
        # Active checks keep passing (the relay greets and answers NOOP): only real deliveries
        # can take it out. A long ejection so it cannot end while the test looks.
        "health": {"passive_failures": FAILURES, "ejection_s": 60, "max_ejection_s": 60},
    }
    config = node_config(redis_url, [sink.address, sink_b.address], overrides)
    domain = domain_routed_first_to(config, "relay-1")
    assert ring_order(config, domain) == ["relay-1", "relay-2"]
    # Exactly FAILURES bad answers: were relay-1 tried once more, it would accept the message.
    sink.faults.data_replies = [CLOSING] * FAILURES
    view = Keys(prefix, config.redis.shards).view("ejector")
    async with running_node(config) as node:

        def relay_up(relay: str, scope: str) -> float | None:
            labels = {"relay": relay, "view": scope}
            return node.registry.get_sample_value("smtpfleet_relay_up", labels)

        # Positive control: both relays start healthy in every place we look below.
        await eventually(lambda: redis_client.hget(view, "relay-1") == b"1")
        assert node.health.healthy == {"relay-1", "relay-2"}
        assert relay_up("relay-1", "node") == relay_up("relay-1", "cluster") == 1
        for n in range(1, FAILURES + 1):
            # One at a time: nothing in flight, so each is offered to relay-1 first.
            reply = await send(node.inbound.addresses[0], recipients=[f"r{n}@{domain}"])
            assert reply.code == 250
            await eventually(lambda n=n: sink_b.count == n)
        assert len(sink.rejected) == FAILURES  # each was 421'd by relay-1, then went on
        await eventually(lambda: "relay-1" not in node.health.healthy)
        assert node.health.healthy == {"relay-2"}
        assert relay_up("relay-1", "node") == 0
        await eventually(lambda: (redis_client.hget(view, "relay-1") or b"")[:1] == b"0")
        await eventually(lambda: relay_up("relay-1", "cluster") == 0)  # a majority of one
        # Ejected: new mail for relay-1's key goes straight to relay-2, relay-1 is not asked.
        assert (await send(node.inbound.addresses[0], recipients=[f"later@{domain}"])).code == 250
        await eventually(lambda: sink_b.count == FAILURES + 1)
        assert sink.count == 0
        assert len(sink.rejected) == FAILURES
