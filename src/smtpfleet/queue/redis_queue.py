"""The Redis side of the queue: the only module that knows how mail is laid out in Redis.

Inbound sees it as a `Spool` (enqueue); delivery workers as a `DeliveryQueue` (read, finish,
retry, claim). Every call that can fail because Redis is away raises `QueueUnavailable`,
whatever the client library threw: during failovers redis-py raises more than `RedisError`
(DESIGN.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from smtpfleet.config import Durability, QueueConfig, RedisConfig
from smtpfleet.delivery.outcome import Finish
from smtpfleet.envelope import (
    EnqueueResult,
    EntryState,
    Kind,
    NewMessage,
    QueuedMessage,
    now_ms,
    shard_of,
)
from smtpfleet.errors import QueueFull, QueueUnavailable, RedisUnsuitable
from smtpfleet.queue import scripts
from smtpfleet.queue.batcher import Batcher, BatchObserver, Command
from smtpfleet.queue.connection import connect
from smtpfleet.queue.deliveries import Body, Delivery
from smtpfleet.queue.keys import ENTRY_FIELD, GROUP, Keys
from smtpfleet.queue.suitability import server_version, unsuitable_reason

log = logging.getLogger(__name__)
T = TypeVar("T")

NO_LIMIT = 2**53


def text(value: bytes | str) -> str:
    """A Redis reply as str, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else value


async def guarded(call: Callable[[], Awaitable[T]]) -> T:
    """The Redis boundary: anything the client raises means "away" (QueueUnavailable)."""
    try:
        return await call()
    except (QueueFull, QueueUnavailable):
        raise
    except Exception as exc:  # during failovers redis-py raises more than RedisError
        raise QueueUnavailable(f"redis: {exc.__class__.__name__}: {exc}") from exc


class RedisQueue:
    """The mail queue in Redis streams, sharded by hash tag."""

    def __init__(
        self,
        redis_config: RedisConfig,
        queue_config: QueueConfig,
        *,
        observe_batch: Callable[[str], BatchObserver] | None = None,
    ) -> None:
        self.keys = Keys(redis_config.prefix, redis_config.shards)
        self._queue = queue_config
        self._connection = connect(redis_config)  # one URL, or Sentinel's primary
        self._redis: aioredis.Redis = self._connection.client
        self._enqueue = self._redis.register_script(scripts.ENQUEUE)
        self._cancel = self._redis.register_script(scripts.CANCEL)
        self._move_due = self._redis.register_script(scripts.MOVE_DUE)
        self._finish = self._redis.register_script(scripts.FINISH)
        # Accepts share pipelines and one confirmation per batch; deliveries share others,
        # never waiting behind an fsync.
        # observe_batch("accept"/"delivery"): the node's metrics for each batcher's batches.
        accepts, deliveries = (
            (observe_batch("accept"), observe_batch("delivery")) if observe_batch else (None, None)
        )
        self._accepts = Batcher(self._redis, self._confirmation_command(), observe=accepts)
        self._deliveries = Batcher(self._redis, observe=deliveries)
        self._per_shard_high_water = max(1, -(-queue_config.high_water // redis_config.shards))

    @property
    def client(self) -> aioredis.Redis:
        return self._redis

    async def close(self) -> None:
        await self._accepts.close()
        await self._deliveries.close()
        await self._connection.aclose()

    def _confirmation_command(self) -> Command | None:
        timeout_ms = self._queue.durability_timeout_ms
        if self._queue.durability is Durability.FSYNC:
            return ("WAITAOF", 1, 0, timeout_ms)
        if self._queue.durability is Durability.REPLICATED:
            return ("WAIT", self._queue.replicas, timeout_ms)
        return None

    async def _script(
        self,
        batcher: Batcher,
        script: Any,
        keys: Sequence[Any],
        args: Sequence[Any],
        *,
        confirm: bool = False,
    ) -> list[Any]:
        """EVALSHA through a batcher: no SCRIPT EXISTS round trip in front of every call.

        NOSCRIPT (a restarted or new server) means the script did not run, so loading it and
        sending the call again cannot apply it twice. Error replies are raised.
        """
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        replies = await batcher.call(command, confirm=confirm)
        if isinstance(replies[0], NoScriptError):
            await self._redis.script_load(script.script)
            replies = await batcher.call(command, confirm=confirm)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    # -- start-up -------------------------------------------------------------------------

    async def check_server(self) -> str:
        """Refuse a Redis that cannot hold mail safely; return its version for the log."""
        mode = self._queue.durability
        server = await guarded(lambda: self._redis.info("server"))
        memory = await guarded(lambda: self._redis.info("memory"))
        persistence = None
        if mode is Durability.FSYNC:
            persistence = await guarded(lambda: self._redis.info("persistence"))
        reason = unsuitable_reason(server, memory, persistence, mode)
        if reason is not None:
            raise RedisUnsuitable(reason)
        return server_version(server)

    async def ensure_groups(self) -> None:
        """Create every shard's stream and consumer group (id 0: include entries already there)."""
        for shard in self.keys.all_shards():
            try:
                await self._redis.xgroup_create(
                    self.keys.stream(shard), GROUP, id="0", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # -- Spool: the accept path -------------------------------------------------------------

    async def enqueue(self, message: NewMessage) -> EnqueueResult:
        """One round trip: the script (body + entry + dedupe key), then WAIT/WAITAOF if asked."""
        shard = shard_of(message.qid)
        entry = QueuedMessage(
            qid=message.qid,
            sender=message.sender,
            recipients=message.recipients,
            accepted_ms=now_ms(),
            kind=message.kind,
        )
        try:
            return await self._enqueue_durably(shard, message, entry)
        except QueueUnavailable:
            await self._cancel_quietly(shard, message)
            raise
        except asyncio.CancelledError:
            # The accept deadline passed mid-write: the write may have landed (RFC 5321 4.2.5).
            await asyncio.shield(self._cancel_quietly(shard, message))
            raise

    async def _enqueue_durably(
        self, shard: int, message: NewMessage, entry: QueuedMessage
    ) -> EnqueueResult:
        """The script and, batched with other accepts, one WAIT/WAITAOF: one round trip."""
        mode = self._queue.durability
        keys = self._enqueue_keys(shard, message)
        args = self._enqueue_args(message, entry, confirmed=mode is Durability.SERVER)
        confirm = mode is not Durability.SERVER
        results = await guarded(
            lambda: self._script(self._accepts, self._enqueue, keys, args, confirm=confirm)
        )
        outcome = [text(part) for part in results[0]]
        if outcome[0] == "dup":
            return EnqueueResult(qid=outcome[1], duplicate=True)
        if outcome[0] == "full":
            raise QueueFull("queue above its high-water mark")
        if confirm:
            self._require_confirmation(mode, results[1])
            # Not awaited: the 250 depends on the WAITAOF/WAIT only. A worker holds the entry
            # until this mark lands (or its window ends, should we die first).
            body_key = self.keys.body(shard, message.qid)
            self._accepts.send(("EVAL", scripts.CONFIRM, 1, body_key))
        return EnqueueResult(qid=message.qid)

    def _require_confirmation(self, mode: Durability, reply: Any) -> None:
        if mode is Durability.FSYNC:
            if int(reply[0]) < 1:
                raise QueueUnavailable("WAITAOF: the AOF fsync was not confirmed in time")
        elif int(reply) < self._queue.replicas:
            raise QueueUnavailable(
                f"WAIT: {int(reply)} of {self._queue.replicas} replicas confirmed in time"
            )

    def _enqueue_keys(self, shard: int, message: NewMessage) -> list[str]:
        dedupe = self.keys.dedupe(shard, message.fingerprint or "-")
        return [
            self.keys.stream(shard),
            self.keys.body(shard, message.qid),
            self.keys.retry(shard),
            dedupe,
        ]

    def _enqueue_args(
        self, message: NewMessage, entry: QueuedMessage, *, confirmed: bool
    ) -> list[str | bytes | int]:
        ttl_ms = int(self._queue.dedupe_window_s * 1000) if message.fingerprint else 0
        # Our own bounces skip the high-water mark: refusing them would stall the delivery
        # that produced them, and the client that could back off is long gone.
        high_water = NO_LIMIT if message.kind is Kind.DSN else self._per_shard_high_water
        return [
            message.qid,
            entry.encode(),
            message.data,
            ttl_ms,
            high_water,
            "1" if confirmed else "0",
        ]

    async def _cancel_quietly(self, shard: int, message: NewMessage) -> None:
        keys = [
            self.keys.body(shard, message.qid),
            self.keys.dedupe(shard, message.fingerprint or "-"),
        ]
        try:
            # Through the accept batcher: it sends batches in order, so the tombstone cannot
            # overtake an enqueue still in flight.
            call = self._script(self._accepts, self._cancel, keys, [message.qid])
            await asyncio.wait_for(call, timeout=2.0)
        except Exception:  # Redis is away: the worker's durability gate covers this case
            log.warning("could not tombstone %s after a failed accept", message.qid)

    # -- delivery side ----------------------------------------------------------------------

    async def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """New entries from every shard for this consumer (XREADGROUP ... >)."""
        streams: dict[Any, Any] = {self.keys.stream(s): ">" for s in self.keys.all_shards()}
        reply = await guarded(
            lambda: self._redis.xreadgroup(GROUP, consumer, streams, count=count, block=block_ms)
        )
        return self._parse_read(reply)

    async def read_own_pending(self, consumer: str, count: int) -> list[Delivery]:
        """Entries this consumer read but never finished (e.g. Redis went away mid-delivery)."""
        streams: dict[Any, Any] = {self.keys.stream(s): "0" for s in self.keys.all_shards()}
        reply = await guarded(lambda: self._redis.xreadgroup(GROUP, consumer, streams, count=count))
        return self._parse_read(reply)

    async def claim_idle(self, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        """The safety net: take over entries idle longer than any delivery attempt can take."""
        claimed: list[Delivery] = []
        for shard in self.keys.all_shards():
            reply = await guarded(
                lambda shard=shard: self._redis.xautoclaim(  # type: ignore[misc]
                    self.keys.stream(shard), GROUP, consumer, min_idle_ms, "0-0", count=count
                )
            )
            claimed.extend(self.deliveries(shard, reply[1]))
        return claimed

    def _parse_read(self, reply: Any) -> list[Delivery]:
        if not reply:
            return []
        pairs = reply.items() if isinstance(reply, dict) else reply
        deliveries: list[Delivery] = []
        for stream, entries in pairs:
            shard = self.keys.shard_of_stream(text(stream))
            deliveries.extend(self.deliveries(shard, entries))
        return deliveries

    def deliveries(self, shard: int, entries: Sequence[Any]) -> list[Delivery]:
        out = []
        for entry_id, fields in entries:
            if not fields:  # XDEL'd while pending: a Delivery without a message
                out.append(Delivery(shard, text(entry_id), None))
                continue
            raw = fields.get(ENTRY_FIELD.encode()) or fields.get(ENTRY_FIELD)
            out.append(Delivery(shard, text(entry_id), QueuedMessage.decode(raw)))
        return out

    async def load_body(self, shard: int, qid: str) -> Body:
        key = self.keys.body(shard, qid)
        replies = await guarded(lambda: self._deliveries.call(("HMGET", key, "d", "ok")))
        if isinstance(replies[0], Exception):
            raise QueueUnavailable(f"redis: {replies[0]}")
        data, ok = replies[0]
        return Body(data=data if isinstance(data, bytes) else None, confirmed=ok is not None)

    async def finish(self, delivery: Delivery, outcome: Finish) -> None:
        """Acknowledge the entry and record what is left of it, atomically (one script)."""
        shard, message = delivery.shard, delivery.message
        # Every key in the shard's slot (Redis Cluster), even a deleted entry's unused body key.
        body = self.keys.body(shard, message.qid if message is not None else "")
        keys = [self.keys.stream(shard), self.keys.retry(shard), self.keys.dead(shard), body]
        # A deleted entry's body is not ours to delete: nothing says which it was.
        done = outcome.done and message is not None
        args = [
            GROUP,
            delivery.entry_id,
            outcome.retry.encode() if outcome.retry is not None else "",
            outcome.retry_due_ms,
            outcome.dead.encode() if outcome.dead is not None else "",
            outcome.dead_reason,
            "1" if done else "0",
        ]
        await guarded(lambda: self._script(self._deliveries, self._finish, keys, args))

    async def move_due_retries(self, now: int, limit: int = 500) -> int:
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in self.keys.all_shards():
                await self._move_due(
                    keys=[self.keys.stream(shard), self.keys.retry(shard)],
                    args=[now, limit],
                    client=pipe,
                )
            moved = await guarded(pipe.execute)
        return sum(int(n) for n in moved)

    # -- views for tools and tests ------------------------------------------------------------

    async def stats(self, now: int) -> dict[str, float]:
        """Cluster-wide queue figures: ready, in flight, retrying, dead, oldest entry age."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in self.keys.all_shards():
                stream = self.keys.stream(shard)
                pipe.xlen(stream)
                pipe.xpending(stream, GROUP)
                pipe.zcard(self.keys.retry(shard))
                pipe.xlen(self.keys.dead(shard))
                pipe.xrange(stream, count=1)
            rows = await guarded(pipe.execute)
        totals = {str(state): 0.0 for state in EntryState}
        oldest_ms = now
        for i in range(0, len(rows), 5):
            length, pending, retry, dead, first = rows[i : i + 5]
            in_flight = int(pending["pending"]) if isinstance(pending, dict) else int(pending[0])
            totals[EntryState.IN_FLIGHT] += in_flight
            totals[EntryState.READY] += max(0, int(length) - in_flight)
            totals[EntryState.RETRY] += int(retry)
            totals[EntryState.DEAD] += int(dead)
            if first:
                oldest_ms = min(oldest_ms, int(text(first[0][0]).split("-")[0]))
        totals["oldest_age_s"] = max(0.0, (now - oldest_ms) / 1000)
        return totals

    async def depth(self) -> dict[str, int]:
        """Counts across shards: entries in streams, waiting retries, dead letters."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in self.keys.all_shards():
                pipe.xlen(self.keys.stream(shard))
                pipe.zcard(self.keys.retry(shard))
                pipe.xlen(self.keys.dead(shard))
            counts = await guarded(pipe.execute)
        return {
            "stream": sum(counts[0::3]),
            "retry": sum(counts[1::3]),
            "dead": sum(counts[2::3]),
        }
