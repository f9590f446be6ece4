"""What a delivery worker needs from the queue: a Protocol and the plain types it speaks.

`RedisQueue` implements it on Redis streams; `smtpfleet.testing.memory.MemoryQueue` in memory,
for unit tests of the worker. Every method that can fail because the queue's store is away
raises `QueueUnavailable`; the entry then stays pending under this consumer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from smtpfleet.delivery.outcome import Finish
from smtpfleet.envelope import QueuedMessage
from smtpfleet.queue.spool import Spool


@dataclass(frozen=True)
class Delivery:
    """One queue entry handed to a worker.

    `message` is None when the entry was deleted while it was pending (an operator's
    `queue delete`, or a finish that landed after this read): there is nothing to deliver, and
    the worker only acknowledges it (`Finish()`), which deletes no body.
    """

    shard: int
    entry_id: str
    message: QueuedMessage | None
    lane: str = ""  # the traffic class's stream it was read from (queue/classes.py)

    @property
    def key(self) -> tuple[int, str, str]:
        """Entry ids are per stream: streams' entries often share one (the same millisecond)."""
        return (self.shard, self.lane, self.entry_id)

    @property
    def label(self) -> str:
        """How logs name it: the queue id, or the entry id of a deleted entry."""
        return self.message.qid if self.message is not None else f"deleted entry {self.entry_id}"


@dataclass(frozen=True)
class Body:
    """A message's stored body, as a worker reads it before sending."""

    data: bytes | None  # None: cancelled (tombstoned) or already finished
    confirmed: bool  # durability was confirmed before the client got 250


class LocalReader(Protocol):
    """The worker of the process that accepts: it may take an entry as it is written."""

    @property
    def consumer(self) -> str: ...

    def wants(self, lane: str) -> bool:
        """Whether it would read a new entry of this traffic class now (a free slot, a
        relay, not fenced)."""
        ...

    def take(self, delivery: Delivery) -> None:
        """Deliver this entry, read for this consumer as it was written."""
        ...


class DeliveryQueue(Spool, Protocol):
    """The delivery side of the queue (enqueue, from Spool, is how a DSN is queued)."""

    async def read(
        self,
        consumer: str,
        count: int,
        block_ms: int,
        lanes: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[Delivery]:
        """New entries for this consumer, up to `count` per stream, waiting up to `block_ms`
        for some (0: not at all), from the streams of these traffic classes (None: all);
        `limit`: about that many in all."""
        ...

    async def read_own_pending(self, consumer: str, count: int) -> list[Delivery]:
        """Entries this consumer read but never finished (e.g. the store went away)."""
        ...

    async def claim_idle(self, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        """The safety net: entries of any consumer idle longer than any attempt can take."""
        ...

    async def load_body(self, shard: int, qid: str) -> Body: ...

    async def finish(self, delivery: Delivery, outcome: Finish) -> None:
        """Acknowledge the entry and record `outcome`, atomically."""
        ...

    async def move_due_retries(self, now: int, limit: int = 500) -> int:
        """Move retries due by `now` back into the streams, each exactly once."""
        ...
