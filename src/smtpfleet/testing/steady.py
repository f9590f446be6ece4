"""Steady load against a local cluster, and where each message went when one is missing."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from smtpfleet.config import QueueConfig, RedisConfig
from smtpfleet.queue.redis_admin import Admin, NotFound
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.testing.client import Reply, eventually, make_message, send
from smtpfleet.testing.localcluster import LocalCluster
from smtpfleet.testing.sink import Sink


@dataclass
class SteadyLoad:
    """Send continuously over fresh sessions, like an MTA that tries the next MX on failure."""

    targets: Sequence[tuple[str, int]]
    interval_s: float = 0.01
    accepted: list[str] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    qids: dict[str, str] = field(default_factory=dict)  # Message-ID -> qid of its 250
    failovers: int = 0  # a target refused or dropped us and the next one took the message
    _stop: bool = False

    async def run(self, senders: int = 4) -> None:
        await asyncio.gather(*(self._sender(i) for i in range(senders)))

    def stop(self) -> None:
        self._stop = True

    async def _sender(self, index: int) -> None:
        n = 0
        while not self._stop:
            tag = f"<s{index}-{n}-{uuid.uuid4().hex[:6]}@steady.test>"
            n += 1
            reply = await self._send_once(index + n, tag)
            self.codes.append(reply.code)
            if reply.code == 250:
                self.accepted.append(tag)
                self.qids[tag] = reply.text.rsplit(" ", 1)[-1]
            await asyncio.sleep(self.interval_s)

    async def _send_once(self, start: int, tag: str) -> Reply:
        reply = Reply(0, "no target")
        for attempt in range(len(self.targets)):
            target = self.targets[(start + attempt) % len(self.targets)]
            reply = await send(target, data=make_message(message_id=tag), timeout_s=10)
            if reply.code == 250 or 500 <= reply.code < 600:
                return reply
            self.failovers += 1
        return reply

    async def wait_delivered(self, cluster: LocalCluster, timeout_s: float) -> None:
        """Every accepted message at a sink within timeout_s; else say where each missing one is."""

        def missing() -> list[str]:
            return sorted(set(self.accepted) - set(message_ids(cluster.sink_servers)))

        try:
            await eventually(lambda: not missing(), timeout_s=timeout_s)
        except TimeoutError:
            lost = missing()
            report = await whereabouts(cluster, {tag: self.qids[tag] for tag in lost[:5]})
            raise AssertionError(
                f"{len(lost)} accepted messages not delivered in {timeout_s}s:\n{report}"
            ) from None


async def whereabouts(cluster: LocalCluster, qids: Mapping[str, str]) -> str:
    """Where the queue holds each message (tag -> qid), and what the nodes logged of it."""
    assert cluster.redis is not None
    redis_config = RedisConfig(**{**cluster.overrides.get("redis", {}), "url": cluster.redis.url})
    queue = RedisQueue(redis_config, QueueConfig())
    admin = Admin(queue)
    lines: list[str] = []
    try:
        for tag, qid in qids.items():
            lines.append(f"{tag} {qid}: {await _place(admin, qid)}")
            for node in cluster.node_processes:
                lines.extend(
                    f"  node-{node.index}: {line}"
                    for line in node.log_tail(100_000).splitlines()
                    if qid in line
                )
    finally:
        await queue.close()
    return "\n".join(lines)


async def queue_is_empty(cluster: LocalCluster) -> bool:
    """Nothing ready, in flight or waiting for a retry: every accepted message is finished,
    so no delivery is left that could still arrive (dead letters do not count)."""
    assert cluster.redis is not None
    redis_config = RedisConfig(**{**cluster.overrides.get("redis", {}), "url": cluster.redis.url})
    queue = RedisQueue(redis_config, QueueConfig())
    try:
        stats = await queue.stats(10**13)
    finally:
        await queue.close()
    return stats["ready"] + stats["in_flight"] + stats["retry"] == 0


async def _place(admin: Admin, qid: str) -> str:
    body = "body kept" if await admin.headers(qid) else "no body"
    try:
        entry, _ = await admin.find(qid)
    except NotFound:
        return f"in no stream, retry set or dead letters; {body}"
    return f"{entry.state} {entry.as_dict()}; {body}"


def message_ids(sinks: Sequence[Sink]) -> collections.Counter[str]:
    """How often each Message-ID arrived, across sinks."""
    seen: collections.Counter[str] = collections.Counter()
    for sink in sinks:
        for message in sink.messages:
            head = message.data.split(b"\r\n\r\n", 1)[0]
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"message-id:"):
                    seen[line.split(b":", 1)[1].strip().decode()] += 1
    return seen
