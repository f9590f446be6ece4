"""Several node processes on one Redis: all accept, all deliver, each message once."""

from __future__ import annotations

import asyncio
import collections
import itertools
import signal

import pytest

from smtpfleet.testing import (
    FAST_RETRY,
    LocalCluster,
    SteadyLoad,
    eventually,
    make_message,
    queue_is_empty,
    send,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def _message_id(data: bytes) -> bytes:
    return data.split(b"Message-ID: ")[1].split(b"\r\n")[0]


async def test_thousand_messages_through_three_nodes_are_each_delivered_once() -> None:
    overrides = {"retry": FAST_RETRY}
    async with LocalCluster(nodes=3, sinks=2, overrides=overrides) as cluster:
        nodes = itertools.cycle([n.smtp for n in cluster.node_processes])
        total = 1000
        sent: list[bytes] = []
        codes: collections.Counter[int] = collections.Counter()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)

        async def client() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                tag = f"<m{i}@cluster.test>"
                reply = await send(next(nodes), data=make_message(message_id=tag))
                codes[reply.code] += 1
                if reply.code == 250:
                    sent.append(tag.encode())

        await asyncio.gather(*(client() for _ in range(50)))
        assert codes == {250: total}

        def delivered() -> int:
            return sum(s.count for s in cluster.sink_servers)

        await eventually(lambda: delivered() >= total, timeout_s=60)
        # Every entry finished (acked and deleted, nothing waiting): no delivery is left
        # that could still bring a duplicate.
        await eventually(lambda: queue_is_empty(cluster), timeout_s=15)
        seen = collections.Counter(
            _message_id(m.data) for s in cluster.sink_servers for m in s.messages
        )
        assert set(seen) == set(sent)
        assert max(seen.values()) == 1, "some message was delivered twice"
        assert all(s.count > 0 for s in cluster.sink_servers), "a relay got no traffic"


async def test_sigterm_drains_a_node_and_it_exits_zero() -> None:
    async with LocalCluster(nodes=2, sinks=1) as cluster:
        node = cluster.node_processes[0]
        assert (await send(node.smtp)).code == 250
        node.signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, node.wait, 15.0) == 0
        survivor = cluster.node_processes[1]
        assert (await send(survivor.smtp)).code == 250
        await eventually(lambda: cluster.sink_servers[0].count == 2, timeout_s=15)


async def test_an_undelivered_message_is_reported_with_its_place_in_the_queue() -> None:
    overrides = {"retry": {**FAST_RETRY, "initial_s": 60.0, "max_s": 60.0}}
    async with LocalCluster(nodes=1, sinks=1, overrides=overrides) as cluster:
        cluster.sink_servers[0].faults.data_replies = ["451 4.3.0 try later"] * 100
        load = SteadyLoad([cluster.node_processes[0].smtp])
        running = asyncio.create_task(load.run(senders=1))
        await eventually(lambda: len(load.accepted) >= 1, timeout_s=10)
        load.stop()
        await running
        with pytest.raises(AssertionError) as failure:
            await load.wait_delivered(cluster, timeout_s=2.0)
        report = str(failure.value)
        first = load.accepted[0]
        assert f"{first} {load.qids[first]}: retry " in report
        assert "body kept" in report
        assert "node-1:" in report  # the node's own log lines about it
