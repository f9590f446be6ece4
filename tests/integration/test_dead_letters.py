"""Dead letters own their bodies. A message from the null sender (no bounce possible) whose
first attempt got a 550 for one recipient and a 451 for another is split: a dead letter for
the first, a retry for the second. Both named one body, and whichever part ended first took
it along: the retry delivered left the dead letter without a body (requeued, it was dropped
as cancelled), and the letter purged or requeued and delivered dropped the retry (a probe's
`dead purge --all`: the 451 recipient never got the message)."""

from __future__ import annotations

import pytest

from smtpfleet.envelope import QueuedMessage, shard_of
from smtpfleet.queue.keys import ENTRY_FIELD
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.testing import eventually, make_message, node_config, running_node, send
from smtpfleet.testing.sink import Sink

pytestmark = pytest.mark.timeout(60)


async def test_a_dead_letter_split_off_a_retry_keeps_its_body(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    sink.faults.rcpt_replies["gone@example.net"] = "550 5.1.1 User unknown"
    sink.faults.rcpt_replies["busy@example.net"] = "451 4.2.1 Mailbox busy, try again"
    config = node_config(redis_url, [sink.address], {"redis": {"prefix": prefix}})
    recipients = ["gone@example.net", "busy@example.net"]
    data = make_message(sender="", recipients=recipients, subject="split")
    async with running_node(config) as node:
        queue = node.queue
        reply = await send(node.inbound.addresses[0], sender="", recipients=recipients, data=data)
        assert reply.code == 250
        qid = reply.text.rsplit(" ", 1)[-1]

        async def dead_letters() -> list[tuple[int, QueuedMessage]]:
            found = []
            for shard in queue.keys.all_shards():
                for _, fields in await queue.client.xrange(queue.keys.dead(shard)):
                    found.append((shard, QueuedMessage.decode(fields[ENTRY_FIELD.encode()])))
            return found

        await eventually(dead_letters, timeout_s=10)
        del sink.faults.rcpt_replies["busy@example.net"]  # the retry gets through now
        await eventually(lambda: sink.count == 1, timeout_s=15)
        assert sink.messages[0].recipients == ("busy@example.net",)
        await eventually(lambda: _no_body(queue, qid), timeout_s=5)  # the retry's is gone

        ((shard, letter),) = await dead_letters()
        assert letter.recipients == ("gone@example.net",)
        body = await queue.load_body(shard, letter.qid)
        assert body.data is not None
        assert b"Subject: split" in body.data
        assert letter.qid != qid  # an id of its own: `dead purge QID` names the letter only


async def _no_body(queue: RedisQueue, qid: str) -> bool:
    return (await queue.load_body(shard_of(qid), qid)).data is None
