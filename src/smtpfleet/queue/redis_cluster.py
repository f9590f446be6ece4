"""Cluster state in Redis: heartbeats, health views, takeover, shared relay limits.

It implements the Protocols of cluster/store.py. Like redis_queue, every failure surfaces as
QueueUnavailable (LimitsUnavailable for the relay limits): callers decide what "Redis is away"
means for them (fencing, keeping the last known view, failing open on a limit).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

from smtpfleet.errors import LimitsUnavailable, QueueUnavailable
from smtpfleet.queue.connection import RedisClient
from smtpfleet.queue.deliveries import Delivery
from smtpfleet.queue.keys import GROUP, WAITING_TTL_MS, Keys, lease_owner
from smtpfleet.queue.redis_queue import RedisQueue, guarded, pipeline, text

T = TypeVar("T")

# KEYS: leases   ARGV: now_ms, member, expiry_ms, limit.  1 if the lease is held now.
# A lease refused leaves its owner in the waiting set for WAITING_TTL_MS, so the owners that
# hold more than their share give leases back (relays/pool.py) instead of starving it.
ACQUIRE_LEASE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(ARGV[3]) - tonumber(ARGV[1])))
  return 1
end
redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + tonumber(ARGV[6]), ARGV[5])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[6]))
return 0
"""

# A dead node's removal, judged from a heartbeat read moments before: a node started again
# under the same id since then (a pod restarted in place) beats again, and is left alone.
# KEYS: nodes, node info, view   ARGV: node id, the beat it was judged by (ms; "": any)
# 1: removed; 0: not a member (removed already); -1: it beat again since, left as it is.
FORGET_MEMBER = """
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not beat then return 0 end
if ARGV[2] ~= '' and tonumber(beat) > tonumber(ARGV[2]) then return -1 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""

# A consumer is deleted only with nothing pending, in the same step: DELCONSUMER drops its
# pending entries, and one read meanwhile by the node started again under that id could then
# never be finished (its FINISH acknowledges nothing, so its retry was lost).
# KEYS: stream   ARGV: group, consumer.   The pending entries it dropped, or -1: kept.
FORGET_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

OUTCOME_TTL_S = 3600


async def _limit(call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await guarded(call)
    except QueueUnavailable as exc:
        raise LimitsUnavailable(str(exc)) from exc


class ClusterStore:
    """Heartbeats, health views, takeover claims, bookkeeping and relay limits, in Redis."""

    def __init__(self, queue: RedisQueue) -> None:
        self._queue = queue
        self._redis: RedisClient = queue.client
        self.keys: Keys = queue.keys
        self._acquire = self._redis.register_script(ACQUIRE_LEASE)
        self._forget_member = self._redis.register_script(FORGET_MEMBER)
        self._forget_consumer = self._redis.register_script(FORGET_CONSUMER)

    # -- membership --------------------------------------------------------------------------

    async def heartbeat(
        self, node_id: str, now_ms: int, info: Mapping[str, Any], ttl_ms: int
    ) -> int | None:
        async with pipeline(self._redis, transaction=False) as pipe:
            pipe.zscore(self.keys.nodes(), node_id)
            pipe.zadd(self.keys.nodes(), {node_id: now_ms})
            pipe.set(self.keys.node(node_id), json.dumps(info), px=ttl_ms)
            previous, _, _ = await guarded(pipe.execute)
        return None if previous is None else int(previous)

    async def members(self) -> dict[str, int]:
        """Every node that ever registered and was not removed: id -> last heartbeat (ms)."""
        rows: list[Any] = await guarded(
            lambda: self._redis.zrange(self.keys.nodes(), 0, -1, withscores=True)
        )
        return {text(node): int(score) for node, score in rows}

    async def node_info(self, node_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        ids = list(node_ids)
        if not ids:
            return {}
        raw = await guarded(lambda: self._redis.mget([self.keys.node(n) for n in ids]))
        return {n: json.loads(v) for n, v in zip(ids, raw, strict=True) if v}

    async def forget_node(self, node_id: str, last_beat_ms: int | None = None) -> bool:
        keys = [self.keys.nodes(), self.keys.node(node_id), self.keys.view(node_id)]
        args = [node_id, "" if last_beat_ms is None else last_beat_ms]
        if await guarded(lambda: self._forget_member(keys=keys, args=args)) == -1:
            return False
        for _, _, stream in self.keys.all_streams():
            await guarded(
                lambda stream=stream: self._forget_consumer(  # type: ignore[misc]
                    keys=[stream], args=[GROUP, node_id]
                )
            )
        return True

    # -- health views ------------------------------------------------------------------------

    async def publish_view(
        self,
        node_id: str,
        view: Mapping[str, bool],
        ttl_ms: int,
        reasons: Mapping[str, str] | None = None,
    ) -> None:
        key = self.keys.view(node_id)
        mapping: dict[Any, Any] = {
            relay: _view_value(up, (reasons or {}).get(relay, "")) for relay, up in view.items()
        }
        if not mapping:
            return
        async with pipeline(self._redis, transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, ttl_ms)
            await guarded(pipe.execute)

    async def views(self, node_ids: Iterable[str]) -> dict[str, dict[str, bool]]:
        return {
            node: {relay: value == "1" for relay, value in view.items()}
            for node, view in (await self._raw_views(node_ids)).items()
        }

    async def view_reasons(self, node_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        """node -> relay -> why that node sees the relay down (relays it sees up are left out)."""
        return {
            node: {relay: value[2:] for relay, value in view.items() if value.startswith("0 ")}
            for node, view in (await self._raw_views(node_ids)).items()
        }

    async def _raw_views(self, node_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        ids = list(node_ids)
        async with pipeline(self._redis, transaction=False) as pipe:
            for node in ids:
                pipe.hgetall(self.keys.view(node))
            raw = await guarded(pipe.execute)
        return {
            node: {text(relay): text(value) for relay, value in view.items()}
            for node, view in zip(ids, raw, strict=True)
            if view
        }

    # -- takeover ----------------------------------------------------------------------------

    async def claim_from(self, dead: str, me: str, min_idle_ms: int, count: int) -> list[Delivery]:
        """Move a dead consumer's pending entries to `me`.

        XCLAIM with a min-idle guard: a claim resets the entry's idle time, so when several
        survivors race for the same entry exactly one of them gets it.
        """
        claimed: list[Delivery] = []
        for shard, lane, stream in self.keys.all_streams():
            pending = await guarded(
                lambda stream=stream: self._redis.xpending_range(  # type: ignore[misc]
                    stream,
                    GROUP,
                    min="-",
                    max="+",
                    count=count,
                    consumername=dead,
                    idle=min_idle_ms,
                )
            )
            ids = [row["message_id"] for row in pending]
            if not ids:
                continue
            entries = await guarded(
                lambda stream=stream, ids=ids: self._redis.xclaim(  # type: ignore[misc]
                    stream, GROUP, me, min_idle_ms, ids
                )
            )
            claimed.extend(self._queue.deliveries(shard, entries, lane))
        return claimed

    async def pending_count(self, consumer: str) -> int:
        total = 0
        for _, _, stream in self.keys.all_streams():
            rows = await guarded(
                lambda stream=stream: self._redis.xpending_range(  # type: ignore[misc]
                    stream, GROUP, min="-", max="+", count=1, consumername=consumer
                )
            )
            total += len(rows)
        return total

    async def refresh_leases(self, me: str, entries: Mapping[tuple[int, str], list[str]]) -> None:
        """Reset the idle time of entries still in flight here, so no claim takes live work."""
        async with pipeline(self._redis, transaction=False) as pipe:
            for (shard, lane), ids in entries.items():
                if ids:
                    stream = self.keys.stream(shard, lane)
                    pipe.xclaim(stream, GROUP, me, 0, list[Any](ids), justid=True)
            await guarded(pipe.execute)

    # -- operator controls and recent outcomes ------------------------------------------------

    async def paused_relays(self) -> set[str]:
        members = await guarded(lambda: self._redis.smembers(self.keys.paused_relays()))
        return {text(m) for m in members}

    async def take_drain_request(self, node_id: str) -> bool:
        # GETDEL (Redis 6.2): EXISTS left the request for the hour it lives, and the node,
        # started again with the same id, drained at once each time (a crash loop in a pod).
        key = self.keys.drain_request(node_id)
        return await guarded(lambda: self._redis.getdel(key)) is not None

    async def add_outcomes(self, minute: int, counts: Mapping[str, int]) -> None:
        key = self.keys.outcomes(minute)
        async with pipeline(self._redis, transaction=False) as pipe:
            for field, count in counts.items():
                pipe.hincrby(key, field, count)
            pipe.expire(key, OUTCOME_TTL_S)
            await guarded(pipe.execute)

    # -- shared relay limits -----------------------------------------------------------------

    async def acquire_connection(
        self, relay: str, member: str, now_ms: int, ttl_ms: int, limit: int
    ) -> bool:
        keys = [self.keys.relay_connections(relay), self.keys.relay_waiting(relay)]
        owner = lease_owner(member)
        args: list[str | int] = [now_ms, member, now_ms + ttl_ms, limit, owner, WAITING_TTL_MS]
        return bool(await _limit(lambda: self._acquire(keys=keys, args=args)))

    async def waiting_owners(self, relay: str, now_ms: int) -> set[str]:
        key = self.keys.relay_waiting(relay)
        owners = await _limit(lambda: self._redis.zrangebyscore(key, now_ms, "+inf"))
        return {text(cast(bytes, owner)) for owner in owners}

    async def release_connection(self, relay: str, member: str) -> None:
        await _limit(lambda: self._redis.zrem(self.keys.relay_connections(relay), member))

    async def take_rate_slot(self, relay: str, second: int, limit: int) -> bool:
        """One message in this second's budget for the relay, cluster-wide."""
        key = self.keys.relay_rate(relay, second)
        async with pipeline(self._redis, transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, 2)
            count, _ = await _limit(pipe.execute)
        return int(count) <= limit


def _view_value(up: bool, reason: str) -> str:
    # "1" up, "0" down, or "0 <reason>": readers that only test == "1" still read it right.
    if up:
        return "1"
    reason = " ".join(reason.split())
    return f"0 {reason}" if reason else "0"
