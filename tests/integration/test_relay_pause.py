"""`smtpfleet relay pause`: the relay gets nothing new once the nodes see the pause, including
what already waited inside a node for its turn there (its per-second budget, a connection
slot). A probe's backlog for a relay limited to 2 messages a second went on arriving there
for 20 s after every node had seen the pause (40-46 messages): the route was chosen before
the wait, and nothing looked at the pause again."""

from __future__ import annotations

import asyncio
import collections

import pytest

from smtpfleet.testing import eventually, node_config, run_cli, running_node, send
from smtpfleet.testing.sink import Sink

pytestmark = pytest.mark.timeout(90)

MESSAGES = 16


async def test_a_paused_relay_gets_nothing_that_waited_for_its_budget(
    redis_url: str, prefix: str
) -> None:
    async with Sink(name="relay-1") as other, Sink(name="relay-2") as limited:
        relays = [
            {"name": "relay-1", "host": other.host, "port": other.port},
            {"name": "relay-2", "host": limited.host, "port": limited.port},
        ]
        relays[1]["max_messages_per_s"] = 2
        # Only relay-2 may carry this mail: paused, it waits (it must not go to relay-1).
        only_2 = {"names": ["relay-2"]}
        rule = {"name": "only-2", "recipient_domains": ["*.example"], "relays": only_2}
        overrides = {"redis": {"prefix": prefix}, "relays": relays, "routing": {"rules": [rule]}}
        config = node_config(redis_url, [], overrides)
        env = {"SMTPFLEET_REDIS__PREFIX": prefix}
        target = ("--redis", redis_url)
        async with running_node(config) as node:
            recipients = [f"user{i}@d{i}.example" for i in range(MESSAGES)]
            for recipient in recipients:
                reply = await send(node.inbound.addresses[0], recipients=[recipient])
                assert reply.code == 250
            await eventually(lambda: limited.count >= 2, timeout_s=10)

            code, _, err = await run_cli("relay", "pause", "relay-2", *target, env=env)
            assert code == 0, err
            await eventually(lambda: "relay-2" not in node.health.healthy, timeout_s=5)
            seen_paused = limited.count
            await asyncio.sleep(3.0)  # 6 more at 2 a second, were the waiting ones sent
            assert limited.count <= seen_paused + 1  # one already under way, at most
            assert other.count == 0

            code, _, err = await run_cli("relay", "resume", "relay-2", *target, env=env)
            assert code == 0, err
            await eventually(lambda: limited.count >= MESSAGES, timeout_s=30)
            await asyncio.sleep(0.5)  # time for a second copy, should one be sent
    delivered = collections.Counter(r for m in limited.messages for r in m.recipients)
    assert delivered == collections.Counter(recipients)
