"""In-memory doubles of what the node shares through Redis, and of the relays, for unit tests.

- `MemoryQueue` is a `DeliveryQueue`: shards of entries, a pending list per consumer, a retry
  set, dead letters and bodies, with the same contract as `RedisQueue` (an entry leaves only
  through `finish`; a deleted entry stays pending without a message, as XDEL leaves it).
- `MemoryClusterStore` implements the cluster Protocols (`cluster/store.py`) on top of it.
- `ScriptedRelays` is a `RelayClients` whose relays answer what a test tells them to.

Set `unavailable = True` on the queue or the store to make every call raise as Redis does when
it is away. Time is the wall clock unless a test passes a `Clock` it moves. These doubles are
for the rules around the queue; anything that claims Redis behaviour is tested on a real Redis.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from smtpfleet.config import RelayConfig
from smtpfleet.delivery.classify import Verdict, classify_reply
from smtpfleet.delivery.outcome import Finish
from smtpfleet.envelope import EnqueueResult, NewMessage, QueuedMessage, now_ms
from smtpfleet.errors import LimitsUnavailable, QueueUnavailable
from smtpfleet.queue.deliveries import Body, Delivery
from smtpfleet.queue.keys import WAITING_TTL_MS, lease_owner

DELIVERED = classify_reply(250, "2.0.0 Ok")


@dataclass
class Clock:
    """Milliseconds that move only when a test says so."""

    ms: int = 1_700_000_000_000

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)


@dataclass
class _Pending:
    consumer: str
    delivered_ms: int


@dataclass
class MemoryQueue:
    """A `DeliveryQueue` in memory. `finished` records every Finish, in order."""

    shards: int = 4
    clock: Callable[[], int] = now_ms
    unavailable: bool = False
    streams: dict[int, dict[str, QueuedMessage | None]] = field(default_factory=dict)
    pending: dict[tuple[int, str, str], _Pending] = field(default_factory=dict)  # Delivery.key
    bodies: dict[str, Body] = field(default_factory=dict)
    retries: list[tuple[int, QueuedMessage]] = field(default_factory=list)
    dead: list[tuple[QueuedMessage, str]] = field(default_factory=list)
    finished: list[tuple[Delivery, Finish]] = field(default_factory=list)
    enqueued: list[NewMessage] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _delivered: set[tuple[int, str]] = field(default_factory=set)
    # The order `read(lanes=...)` was asked for, for tests of the workers' class priority.
    reads: list[tuple[str, ...] | None] = field(default_factory=list)

    def _check(self) -> None:
        if self.unavailable:
            raise QueueUnavailable("redis: ConnectionError: (memory queue set unavailable)")

    # -- filling it --------------------------------------------------------------------------

    def add(
        self, message: QueuedMessage, data: bytes | None = b"x", *, confirmed: bool = True
    ) -> str:
        """Put an entry (and its body, unless `data` is None) in its shard; its entry id."""
        entry_id = f"{next(self._ids)}-0"
        self.streams.setdefault(message.shard, {})[entry_id] = message
        if data is not None:
            self.bodies[message.qid] = Body(data, confirmed)
        return entry_id

    def hand_out(self, message: QueuedMessage, consumer: str) -> Delivery:
        """Add an entry as already read by `consumer` (pending there), as a worker gets it."""
        entry_id = self.add(message)
        self._delivered.add((message.shard, entry_id))
        delivery = Delivery(message.shard, entry_id, message, message.traffic_class)
        self.pending[delivery.key] = _Pending(consumer, self.clock())
        return delivery

    def delete(self, qid: str) -> None:
        """What an operator's `queue delete` does: the entry goes, pending or not."""
        for stream in self.streams.values():
            for entry_id, message in stream.items():
                if message is not None and message.qid == qid:
                    stream[entry_id] = None
        self.bodies.pop(qid, None)

    def pending_of(self, consumer: str) -> list[tuple[int, str, str]]:
        return [key for key, p in self.pending.items() if p.consumer == consumer]

    # -- DeliveryQueue -----------------------------------------------------------------------

    async def enqueue(self, message: NewMessage) -> EnqueueResult:
        self._check()
        self.enqueued.append(message)
        entry = QueuedMessage(
            message.qid,
            message.sender,
            message.recipients,
            self.clock(),
            kind=message.kind,
            tenant=message.tenant,
            traffic_class=message.traffic_class or "",
        )
        self.add(entry, message.data)
        return EnqueueResult(message.qid)

    async def read(
        self,
        consumer: str,
        count: int,
        block_ms: int,
        lanes: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[Delivery]:
        """`count` per shard and class, as XREADGROUP gives per stream; `limit` in all."""
        self._check()
        self.reads.append(None if lanes is None else tuple(lanes))
        out: list[Delivery] = []
        for shard in range(self.shards):
            if limit is not None:
                count = min(count, limit - len(out))
            fresh = [
                (i, m)
                for i, m in self.streams.get(shard, {}).items()
                if (shard, i) not in self._delivered and (lanes is None or _lane(m) in lanes)
            ]
            for lane in sorted({_lane(m) for _, m in fresh}):
                for entry_id, message in [(i, m) for i, m in fresh if _lane(m) == lane][:count]:
                    self._delivered.add((shard, entry_id))
                    delivery = Delivery(shard, entry_id, message, lane)
                    self.pending[delivery.key] = _Pending(consumer, self.clock())
                    out.append(delivery)
        if not out and block_ms:
            await asyncio.sleep(min(block_ms, 10) / 1000)
        return out

    async def read_own_pending(self, consumer: str, count: int) -> list[Delivery]:
        self._check()
        return [self._delivery(key) for key in self.pending_of(consumer)][:count]

    async def claim_idle(self, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        self._check()
        return self.claim(lambda p: self.clock() - p.delivered_ms >= min_idle_ms, consumer, count)

    def claim(self, which: Callable[[_Pending], bool], consumer: str, count: int) -> list[Delivery]:
        """Move matching pending entries to `consumer`, resetting their idle time."""
        keys = [key for key, p in self.pending.items() if which(p)][:count]
        for key in keys:
            self.pending[key] = _Pending(consumer, self.clock())
        return [self._delivery(key) for key in keys]

    def _delivery(self, key: tuple[int, str, str]) -> Delivery:
        shard, lane, entry_id = key
        return Delivery(shard, entry_id, self.streams.get(shard, {}).get(entry_id), lane)

    async def load_body(self, shard: int, qid: str) -> Body:
        self._check()
        return self.bodies.get(qid, Body(None, confirmed=False))

    async def finish(self, delivery: Delivery, outcome: Finish) -> None:
        self._check()
        self.pending.pop(delivery.key, None)
        self.streams.get(delivery.shard, {}).pop(delivery.entry_id, None)
        if outcome.retry is not None:
            self.retries.append((outcome.retry_due_ms, outcome.retry))
        if outcome.dead is not None:
            self.dead.append((outcome.dead, outcome.dead_reason))
        if outcome.done and delivery.message is not None:
            self.bodies.pop(delivery.message.qid, None)
        self.finished.append((delivery, outcome))

    async def move_due_retries(self, now: int, limit: int = 500) -> int:
        self._check()
        due = [r for r in self.retries if r[0] <= now][:limit]
        for item in due:
            self.retries.remove(item)
            self.add(item[1], data=None)
        return len(due)


def _lane(message: QueuedMessage | None) -> str:
    return message.traffic_class if message is not None else ""


@dataclass
class MemoryClusterStore:
    """The cluster Protocols (membership, health views, bookkeeping, relay limits) in memory."""

    queue: MemoryQueue
    unavailable: bool = False
    heartbeats: dict[str, int] = field(default_factory=dict)
    info: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    view_of: dict[str, dict[str, bool]] = field(default_factory=dict)
    reasons_of: dict[str, dict[str, str]] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)
    drain_requests: set[str] = field(default_factory=set)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    lease_refreshes: list[dict[tuple[int, str], list[str]]] = field(default_factory=list)
    connections: dict[str, dict[str, int]] = field(default_factory=dict)  # relay -> member -> exp
    waiting: dict[str, dict[str, int]] = field(default_factory=dict)  # relay -> owner -> until
    rate: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    limits_unavailable: bool = False

    def _check(self) -> None:
        if self.unavailable:
            raise QueueUnavailable("redis: ConnectionError: (memory store set unavailable)")

    # membership
    async def heartbeat(
        self, node_id: str, now_ms: int, info: Mapping[str, Any], ttl_ms: int
    ) -> int | None:
        self._check()
        previous = self.heartbeats.get(node_id)
        self.heartbeats[node_id] = now_ms
        self.info[node_id] = dict(info)
        return previous

    async def members(self) -> dict[str, int]:
        self._check()
        return dict(self.heartbeats)

    async def node_info(self, node_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        self._check()
        return {n: dict(self.info[n]) for n in node_ids if n in self.info}

    async def claim_from(self, dead: str, me: str, min_idle_ms: int, count: int) -> list[Delivery]:
        self._check()
        now = self.queue.clock()
        return self.queue.claim(
            lambda p: p.consumer == dead and now - p.delivered_ms >= min_idle_ms, me, count
        )

    async def pending_count(self, consumer: str) -> int:
        self._check()
        return len(self.queue.pending_of(consumer))

    async def forget_node(self, node_id: str, last_beat_ms: int | None = None) -> bool:
        self._check()
        beat = self.heartbeats.get(node_id)
        if beat is not None and last_beat_ms is not None and beat > last_beat_ms:
            return False  # it beat again since it was judged dead
        self.heartbeats.pop(node_id, None)
        self.view_of.pop(node_id, None)
        return True

    async def take_drain_request(self, node_id: str) -> bool:
        self._check()
        if node_id not in self.drain_requests:
            return False
        self.drain_requests.discard(node_id)
        return True

    # health views
    async def publish_view(
        self,
        node_id: str,
        view: Mapping[str, bool],
        ttl_ms: int,
        reasons: Mapping[str, str] | None = None,
    ) -> None:
        self._check()
        self.view_of[node_id] = dict(view)
        self.reasons_of[node_id] = dict(reasons or {})

    async def views(self, node_ids: Iterable[str]) -> dict[str, dict[str, bool]]:
        self._check()
        return {n: dict(self.view_of[n]) for n in node_ids if n in self.view_of}

    async def paused_relays(self) -> set[str]:
        self._check()
        return set(self.paused)

    # delivery bookkeeping
    async def refresh_leases(self, me: str, entries: Mapping[tuple[int, str], list[str]]) -> None:
        self._check()
        self.lease_refreshes.append({s: list(ids) for s, ids in entries.items()})
        for (shard, lane), ids in entries.items():
            for entry_id in ids:
                if (shard, lane, entry_id) in self.queue.pending:
                    self.queue.pending[(shard, lane, entry_id)] = _Pending(me, self.queue.clock())

    async def add_outcomes(self, minute: int, counts: Mapping[str, int]) -> None:
        self._check()
        self.outcomes.update(counts)

    # shared relay limits
    def _check_limits(self) -> None:
        if self.limits_unavailable:
            raise LimitsUnavailable("relay limits: (memory store set unavailable)")

    async def acquire_connection(
        self, relay: str, member: str, now_ms: int, ttl_ms: int, limit: int
    ) -> bool:
        self._check_limits()
        held = {m: e for m, e in self.connections.get(relay, {}).items() if e > now_ms}
        self.connections[relay] = held
        if member in held or len(held) < limit:
            held[member] = now_ms + ttl_ms
            return True
        self.waiting.setdefault(relay, {})[lease_owner(member)] = now_ms + WAITING_TTL_MS
        return False

    async def waiting_owners(self, relay: str, now_ms: int) -> set[str]:
        self._check_limits()
        return {o for o, until in self.waiting.get(relay, {}).items() if until >= now_ms}

    async def release_connection(self, relay: str, member: str) -> None:
        self._check_limits()
        self.connections.get(relay, {}).pop(member, None)

    async def take_rate_slot(self, relay: str, second: int, limit: int) -> bool:
        self._check_limits()
        self.rate[(relay, second)] += 1
        return self.rate[(relay, second)] <= limit


Script = Callable[[str], Verdict]


@dataclass
class ScriptedRelay:
    """One relay's client: each recipient gets `script(recipient)` (delivered by default)."""

    name: str
    script: Script = lambda _recipient: DELIVERED
    log: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    before_send: Callable[[], Awaitable[None] | None] | None = None

    async def send(
        self, sender: str, recipients: Sequence[str], data: bytes, priority: int = 0
    ) -> dict[str, Verdict]:
        self.log.append((self.name, tuple(recipients)))
        if self.before_send is not None:
            waited = self.before_send()
            if waited is not None:
                await waited
        return {r: self.script(r) for r in recipients}


@dataclass
class ScriptedRelays:
    """A `RelayClients` of scripted relays, made on first use; `sent` lists every call as
    (relay, recipients), in order."""

    relays: dict[str, ScriptedRelay] = field(default_factory=dict)
    sent: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def client(self, relay: RelayConfig) -> ScriptedRelay:
        return self.relay(relay.name)

    def relay(self, name: str) -> ScriptedRelay:
        return self.relays.setdefault(name, ScriptedRelay(name, log=self.sent))

    def script(self, name: str, script: Script) -> ScriptedRelay:
        client = self.relay(name)
        client.script = script
        return client
