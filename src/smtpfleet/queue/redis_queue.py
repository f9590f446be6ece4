"""The Redis side of the queue: the only module that knows how mail is laid out in Redis.

Inbound sees it as a `Spool` (enqueue); delivery workers as a `DeliveryQueue` (read, finish,
retry, claim). Every call that can fail because Redis is away raises `QueueUnavailable`,
whatever the client library threw: during failovers redis-py raises more than `RedisError`
(DESIGN.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from smtpfleet.config import Durability, QueueConfig, RedisConfig
from smtpfleet.deadlines import TICK_S
from smtpfleet.delivery.outcome import Finish
from smtpfleet.envelope import (
    EnqueueResult,
    EntryState,
    Kind,
    NewMessage,
    QueuedMessage,
    now_ms,
    shard_of,
    split_qid,
)
from smtpfleet.errors import QueueFull, QueueUnavailable, RedisFull, RedisUnsuitable
from smtpfleet.queue import scripts
from smtpfleet.queue.batcher import BatchObserver, Command, Confirmation, Confirmed
from smtpfleet.queue.classes import TrafficClasses
from smtpfleet.queue.connection import RedisClient, RedisConnection, connect
from smtpfleet.queue.deliveries import Body, Delivery, LocalReader
from smtpfleet.queue.keys import ENTRY_FIELD, GROUP, Keys
from smtpfleet.queue.late_writes import SLACK_MS, RedisClock
from smtpfleet.queue.local_accepts import LocalAccepts
from smtpfleet.queue.replica_watch import ReplicaWatch
from smtpfleet.queue.routes import Observers, Route, SingleRoutes, is_redirect
from smtpfleet.queue.suitability import server_version, unsuitable_reason
from smtpfleet.tasks import reraise_lost_cancellation

log = logging.getLogger(__name__)
T = TypeVar("T")

NO_LIMIT = 2**53
REDIRECT_RETRY_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.2, 0.2, 0.5, 0.5)  # a slot moving: ~2 s
SWEEP_PASSES = 4
POLL_MAX_S = 0.1  # Redis Cluster: the longest pause between two empty read sweeps


def text(value: bytes | str) -> str:
    """A Redis reply as str, whether the client decodes replies or not."""
    return value.decode() if isinstance(value, bytes) else value


async def guarded(call: Callable[[], Awaitable[T]]) -> T:
    """The Redis boundary: anything the client raises means "away" (QueueUnavailable)."""
    try:
        result = await call()
    except (QueueFull, QueueUnavailable):
        raise
    except Exception as exc:  # during failovers redis-py raises more than RedisError
        reraise_lost_cancellation(exc)
        if isinstance(exc, OutOfMemoryError):
            raise RedisFull(f"redis is full (maxmemory): {exc}") from exc
        raise QueueUnavailable(f"redis: {exc.__class__.__name__}: {exc}") from exc
    reraise_lost_cancellation()
    return result


def _may_have_landed(exc: QueueUnavailable) -> bool:
    """The write went out and no answer came (a timeout), rather than never leaving."""
    return isinstance(exc.__cause__, TimeoutError | RedisTimeoutError)


def no_group(exc: BaseException) -> bool:
    """Redis answered that the stream or its consumer group does not exist (NOGROUP); `exc`
    is that answer, or the QueueUnavailable made of it."""
    cause = exc.__cause__ if isinstance(exc, QueueUnavailable) else exc
    # In a pipeline redis-py puts "Command # N (...) of pipeline caused error: " first.
    return isinstance(cause, ResponseError) and "NOGROUP" in str(cause)


@contextlib.asynccontextmanager
async def pipeline(client: RedisClient, *, transaction: bool) -> AsyncIterator[Any]:
    """`client.pipeline()`, opened inside the Redis boundary too: after a connection error a
    cluster client reloads its slot table as the next pipeline opens (CLUSTER SLOTS, then
    COMMAND on its default node, which may be the dead primary), before any command runs."""
    pipe = client.pipeline(transaction=transaction)
    await guarded(pipe.__aenter__)
    try:
        yield pipe
    finally:
        await pipe.__aexit__(None, None, None)


class RedisQueue:
    """The mail queue in Redis streams, sharded by hash tag."""

    def __init__(
        self,
        redis_config: RedisConfig,
        queue_config: QueueConfig,
        *,
        observe_batch: Callable[[str], BatchObserver] | None = None,
        accept_timeout_s: float | None = None,
    ) -> None:
        """`accept_timeout_s`: when the accept path answers 451 to a write not done by then
        (`inbound.accept_timeout_s`); a write that reaches Redis later is not applied."""
        self.classes = TrafficClasses.from_config(queue_config)
        self.keys = Keys(redis_config.prefix, redis_config.shards, self.classes.lanes)
        self._queue = queue_config
        self._server_wait_ms = redis_config.server_wait_ms
        self._connection = connect(redis_config)  # one URL, Sentinel's primary, or a cluster
        self._redis: RedisClient = self._connection.client
        self._enqueue = self._redis.register_script(scripts.ENQUEUE)
        self._cancel = self._redis.register_script(scripts.CANCEL)
        self._move_due = self._redis.register_script(scripts.MOVE_DUE)
        self._finish = self._redis.register_script(scripts.FINISH)
        # Each shard's commands go through the batchers of the server that holds it (one for
        # every shard, except on Redis Cluster: one per primary); observe_batch("accept" or
        # "delivery") gives the node's group-commit metrics for each kind of batcher.
        observers = Observers(
            *((observe_batch("accept"), observe_batch("delivery")) if observe_batch else ())
        )
        self._replica_watch = self._watch_replicas(redis_config, queue_config)
        self._routes = self._connection.routes(self.keys, self._confirmation_command(), observers)
        self._sharded = not isinstance(self._routes, SingleRoutes)
        self._rotation = itertools.count()
        self._per_shard_high_water = max(1, -(-queue_config.high_water // redis_config.shards))
        self._local = LocalAccepts()
        self._clock = RedisClock()
        # The accept path's own deadline fires up to a tick late (deadlines.py).
        self._accept_budget_ms = (
            None if accept_timeout_s is None else int((accept_timeout_s + TICK_S) * 1000)
        )
        self._reader: LocalReader | None = None

    def hand_over_to(self, reader: LocalReader) -> None:
        """Let this process's worker take its own accepts as they are written (ENQUEUE)."""
        self._reader = reader

    @property
    def client(self) -> RedisClient:
        return self._redis

    @property
    def connection(self) -> RedisConnection:
        """How this queue reaches Redis (the Sentinels too, with Sentinel): for `status`."""
        return self._connection

    async def close(self) -> None:
        if self._replica_watch is not None:
            await self._replica_watch.aclose()
        await self._routes.close()
        await self._connection.aclose()

    def _watch_replicas(
        self, redis_config: RedisConfig, queue_config: QueueConfig
    ) -> ReplicaWatch | None:
        # Under Sentinel in every mode: the watch also moves our connections to a new primary
        # at once (in `server`/`fsync` each write to the demoted one is a 250 that is lost).
        sentinel = self._connection.sentinel
        if sentinel is None:
            return None
        client = self._connection.client
        assert isinstance(client, aioredis.Redis), "Sentinel gives one server's client"
        pool = client.connection_pool

        async def reconnect() -> None:
            await pool.disconnect(inuse_connections=True)

        return ReplicaWatch(
            sentinel.sentinels,
            redis_config.master_name,
            queue_config.replicas,
            on_switch=reconnect,
        )

    def _confirmation_command(self) -> Confirmation | None:
        timeout_ms = self._server_wait_ms(self._queue.durability_timeout_ms)
        if self._queue.durability is Durability.FSYNC:
            return lambda: ("WAITAOF", 1, 0, timeout_ms)
        if self._queue.durability is Durability.REPLICATED:
            return lambda: ("WAIT", self._replicas_needed(), timeout_ms)
        return None

    def _replicas_needed(self) -> int:
        """`queue.replicas`, or under Sentinel every replica a failover could promote."""
        if self._replica_watch is None or self._queue.durability is not Durability.REPLICATED:
            return self._queue.replicas
        return self._replica_watch.needed()

    async def _script(
        self,
        shard: int,
        script: Any,
        keys: Sequence[Any],
        args: Sequence[Any],
        *,
        accept: bool = False,
        confirm: bool = False,
    ) -> list[Any]:
        """EVALSHA through the shard's batcher: no SCRIPT EXISTS round trip in front of every call.

        NOSCRIPT (a restarted or new server) means the script did not run, so loading it and
        sending the call again cannot apply it twice. Error replies are raised.
        """
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        replies = await self._call(shard, command, accept=accept, confirm=confirm, script=script)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _call(
        self,
        shard: int,
        command: Command,
        *,
        accept: bool = False,
        confirm: bool = False,
        script: Any = None,
    ) -> list[Any]:
        """One command through the shard's accept or delivery batcher.

        On Redis Cluster a MOVED/ASK/TRYAGAIN reply means the command did not run (its slot
        moved, or is moving, to another primary): reload the slot table and send it again to
        the primary holding the slot now, for about two seconds at most.
        """
        for pause in (*REDIRECT_RETRY_S, None):
            route = await self._routes.for_shard(shard)
            batcher = route.accepts if accept else route.deliveries
            try:
                replies = await batcher.call(command, confirm=confirm)
            except Exception:
                await self._refresh_routes()  # that primary may have been replaced
                raise
            if script is not None and isinstance(replies[0], NoScriptError):
                await route.client.script_load(script.script)
                replies = await batcher.call(command, confirm=confirm)
            if not is_redirect(replies[0]) or pause is None:
                return replies
            await asyncio.sleep(pause)
            await self._routes.refresh()
        raise AssertionError("unreachable")

    # -- start-up -------------------------------------------------------------------------

    async def check_server(self) -> str:
        """Refuse a Redis that cannot hold mail safely; return its version for the log."""
        mode = self._queue.durability
        version = ""
        for route in await guarded(self._routes.primaries):  # every primary of a cluster
            client = route.client
            server = await guarded(lambda client=client: client.info("server"))  # type: ignore[misc]
            memory = await guarded(lambda client=client: client.info("memory"))  # type: ignore[misc]
            persistence = None
            if mode is Durability.FSYNC:
                persistence = await guarded(
                    lambda client=client: client.info("persistence")  # type: ignore[misc]
                )
            reason = unsuitable_reason(server, memory, persistence, mode)
            if reason is not None:
                raise RedisUnsuitable(f"{route.address}: {reason}" if self._sharded else reason)
            version = server_version(server)
        if self._replica_watch is not None:
            await self._replica_watch.refresh()  # the first accepts wait for the right count
            self._replica_watch.start()
        return version

    async def ensure_groups(self) -> None:
        """Create every stream (each shard's, of each traffic class) and its consumer group
        (id 0: include entries already there)."""
        for _, _, stream in self.keys.all_streams():
            try:
                await self._redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise QueueUnavailable(f"redis: {exc}") from exc
            except Exception as exc:  # a timeout too: "cannot start", not a traceback
                reraise_lost_cancellation(exc)
                raise QueueUnavailable(f"redis: {exc.__class__.__name__}: {exc}") from exc

    async def _regrouped(self, call: Callable[[], Awaitable[T]]) -> T:
        """`guarded(call)`, again once the consumer groups are made if Redis had none (NOGROUP).

        A Redis that lost its data (restarted without persistence, flushed, promoted from an
        empty replica) has no group, and `XREADGROUP` fails on every read: without this every
        reader would wait for a node restart while the accepts kept coming. The group is made
        at id 0, so what is in the stream now is delivered: the accepts since the loss, and
        entries left from before it (finished ones are deleted, never left behind).
        """
        try:
            return await guarded(call)
        except QueueUnavailable as exc:
            if not no_group(exc):
                raise
            answer = exc.__cause__
        await guarded(lambda: self._make_groups_again(answer))
        return await guarded(call)

    async def _make_groups_again(self, answer: BaseException | None) -> None:
        log.warning("redis: %s; making the consumer groups again", answer)
        await self.ensure_groups()

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
            tenant=message.tenant,
            traffic_class=self.classes.choose(
                message.sender, message.tenant, message.traffic_class
            ),
        )
        held = self._local.begin(message.qid, message.data)
        confirmed = False
        deadline = self._deadline(entry.accepted_ms)
        try:
            result = await self._enqueue_durably(shard, message, entry, deadline)
            confirmed = not result.duplicate  # a duplicate wrote no entry of this qid
            return result
        except QueueUnavailable as exc:
            if not await self._cancel_quietly(shard, message) and _may_have_landed(exc):
                await self._cancel_until(shard, message, entry.accepted_ms, deadline)
            raise
        except asyncio.CancelledError:
            # The accept deadline passed mid-write: the write may have landed (RFC 5321 4.2.5).
            await asyncio.shield(self._cancel_quietly(shard, message))
            raise
        finally:
            if held:
                self._local.settle(message.qid, confirmed)

    def _deadline(self, began_ms: int) -> int | None:
        """Past this (Redis's clock) the accept begun at `began_ms` was answered 451."""
        if self._accept_budget_ms is None:
            return None
        return self._clock.deadline(began_ms + self._accept_budget_ms)

    async def _cancel_until(
        self, shard: int, message: NewMessage, began_ms: int, deadline: int | None
    ) -> None:
        """A write that may still be in a stalled Redis's socket, and no tombstone behind it:
        the 451 waits until the write, should it run, refuses itself, and tries the tombstone
        meanwhile in case Redis resumes first. The accept path's own deadline usually ends
        this wait, at about the same moment."""
        if deadline is None or self._accept_budget_ms is None:
            return  # no deadline known yet: the tombstone was the only guard
        while (left_ms := began_ms + self._accept_budget_ms + SLACK_MS - now_ms()) > 0:
            timeout_s = min(left_ms / 1000, 0.5)
            if await self._cancel_quietly(shard, message, timeout_s=timeout_s, warn=False):
                return
            await asyncio.sleep(0.1)  # a refused connection fails at once

    async def _enqueue_durably(
        self, shard: int, message: NewMessage, entry: QueuedMessage, deadline: int | None
    ) -> EnqueueResult:
        """The script and, batched with other accepts, one WAIT/WAITAOF: one round trip."""
        mode = self._queue.durability
        keys = self._enqueue_keys(shard, message, entry.traffic_class)
        args = self._enqueue_args(message, entry, confirmed=mode is Durability.SERVER)
        args.append("" if deadline is None else deadline)
        confirm = mode is not Durability.SERVER
        results = await guarded(
            lambda: self._script(shard, self._enqueue, keys, args, accept=True, confirm=confirm)
        )
        reply = results[0]
        outcome = [text(part) for part in reply[:3]]
        if outcome[0] == "late":
            self._clock.restart(entry.accepted_ms, int(outcome[1]))
            raise QueueUnavailable("the write reached Redis after its accept's deadline")
        if outcome[0] == "ok":
            self._clock.observe(entry.accepted_ms, int(outcome[1].partition("-")[0]))
        if len(outcome) == 3:  # the accept read an entry for our worker
            read = entry if len(reply) == 3 else QueuedMessage.decode(reply[3])
            self._hand_over(Delivery(shard, outcome[2], read, entry.traffic_class))
        if outcome[0] == "full":
            raise QueueFull("queue above its high-water mark")
        if confirm:
            # A resend's 250 too: the copy it answers with, or its adoption, must be durable.
            self._require_confirmation(mode, results[1])
        if outcome[0] == "dup":
            return EnqueueResult(qid=outcome[1], duplicate=True)
        if confirm:
            # Not awaited: the 250 depends on the WAITAOF/WAIT only. A worker holds the entry
            # until this mark lands (or its window ends, should we die first).
            body_key = self.keys.body(shard, message.qid)
            route = await self._routes.for_shard(shard)
            route.accepts.send(("EVAL", scripts.CONFIRM, 1, body_key))
        return EnqueueResult(qid=message.qid)

    def _reader_for(self, lane: str) -> str:
        """The consumer an accept reads its entry for: ours when our worker wants it now."""
        reader = self._reader
        return reader.consumer if reader is not None and reader.wants(lane) else ""

    def _hand_over(self, delivery: Delivery) -> None:
        """The entry the accept read for this process (pending under its consumer now): to
        its worker, before the confirmation is checked, so that a failed one is finished as
        cancelled rather than left pending."""
        assert self._reader is not None
        self._reader.take(delivery)

    def _require_confirmation(self, mode: Durability, confirmed: Confirmed) -> None:
        reply = confirmed.reply
        if isinstance(reply, Exception):
            raise QueueUnavailable(f"{confirmed.command[0]}: {reply}")
        if mode is Durability.FSYNC:
            if int(reply[0]) < 1:
                raise QueueUnavailable("WAITAOF: the AOF fsync was not confirmed in time")
        elif int(reply) < (asked := int(confirmed.command[1])):
            raise QueueUnavailable(f"WAIT: {int(reply)} of {asked} replicas confirmed in time")

    def _enqueue_keys(self, shard: int, message: NewMessage, lane: str) -> list[str]:
        dedupe = self.keys.dedupe(shard, message.fingerprint or "-")
        others = [
            key
            for other in self.keys.lanes
            if other != lane
            for key in (self.keys.stream(shard, other), self.keys.retry(shard, other))
        ]
        return [
            self.keys.stream(shard, lane),
            self.keys.body(shard, message.qid),
            self.keys.retry(shard, lane),
            dedupe,
            *others,
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
            GROUP,
            self._reader_for(entry.traffic_class),
        ]

    async def _cancel_quietly(
        self, shard: int, message: NewMessage, timeout_s: float = 2.0, *, warn: bool = True
    ) -> bool:
        keys = [
            self.keys.body(shard, message.qid),
            self.keys.dedupe(shard, message.fingerprint or "-"),
        ]
        try:
            # Through the accept batcher: it sends batches in order, so the tombstone cannot
            # overtake an enqueue still in flight.
            call = self._script(shard, self._cancel, keys, [message.qid], accept=True)
            await asyncio.wait_for(call, timeout=timeout_s)
        except Exception:  # Redis is away: the write's own deadline covers this case
            if warn:
                log.warning("could not tombstone %s after a failed accept", message.qid)
            return False
        return True

    # -- delivery side ----------------------------------------------------------------------

    async def read(
        self,
        consumer: str,
        count: int,
        block_ms: int,
        lanes: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[Delivery]:
        """New entries from every shard for this consumer (XREADGROUP ... >), from the
        streams of these traffic classes (None: all); block_ms 0: do not wait. `limit`: about
        that many in all (`count` is per stream), from a rotating subset of the shards."""
        chosen = tuple(self.keys.lanes if lanes is None else lanes)
        if self._sharded:
            total = count if limit is None else min(count, limit)
            return await self._regrouped(
                lambda: self._read_sharded(consumer, total, block_ms, ">", chosen)
            )
        shards = self._some_shards(count, limit)
        streams: dict[Any, Any] = {
            self.keys.stream(s, lane): ">" for s in shards for lane in chosen
        }
        block = self._server_wait_ms(block_ms) if block_ms else None  # BLOCK 0: for ever
        reply = await self._regrouped(
            lambda: self._redis.xreadgroup(GROUP, consumer, streams, count=count, block=block)
        )
        return self._parse_read(reply)

    def _some_shards(self, count: int, limit: int | None) -> list[int]:
        """Enough shards for `limit` entries at `count` each, starting at a rotating shard so
        that over successive reads every shard is asked."""
        shards = list(self.keys.all_shards())
        if limit is None or limit >= count * len(shards):
            return shards
        first = next(self._rotation) % len(shards)
        return (shards[first:] + shards[:first])[: max(1, -(-limit // count))]

    async def read_own_pending(self, consumer: str, count: int) -> list[Delivery]:
        """Entries this consumer read but never finished (e.g. Redis went away mid-delivery)."""
        if self._sharded:
            return await self._regrouped(
                lambda: self._read_sharded(consumer, count, 0, "0", self.keys.lanes)
            )
        streams: dict[Any, Any] = {key: "0" for _, _, key in self.keys.all_streams()}
        reply = await self._regrouped(
            lambda: self._redis.xreadgroup(GROUP, consumer, streams, count=count)
        )
        return self._parse_read(reply)

    async def _read_sharded(
        self, consumer: str, count: int, block_ms: int, start: str, lanes: tuple[str, ...]
    ) -> list[Delivery]:
        """Redis Cluster: one XREADGROUP per shard (a multi-stream read would be CROSSSLOT),
        pipelined per primary, the primaries in parallel. An empty sweep is repeated after a
        pause growing to `POLL_MAX_S` until `block_ms` has passed: a blocking read would hold
        a connection per shard."""
        deadline = time.monotonic() + block_ms / 1000
        pause = 0.005
        while True:
            got = await self._sweep(consumer, count, start, lanes)
            left = deadline - time.monotonic()
            if got or left <= 0:
                return got
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, POLL_MAX_S)

    async def _sweep(
        self, consumer: str, count: int, start: str, lanes: tuple[str, ...]
    ) -> list[Delivery]:
        """Up to `count` entries: an equal share from each shard (starting at a rotating shard
        so none is always last), then what is left from the shards that had more."""
        shards = list(self.keys.all_shards())
        first = next(self._rotation) % len(shards)
        candidates = shards[first:] + shards[:first]
        got: list[Delivery] = []
        for _ in range(SWEEP_PASSES):
            wanted = count - len(got)
            if wanted <= 0 or not candidates:
                break
            share = max(1, wanted // len(candidates))
            asked = candidates[: max(1, wanted // share)]
            found = await self._read_shards(consumer, asked, share, start, lanes)
            got.extend(found)
            per_shard = {s: sum(d.shard == s for d in found) for s in asked}
            candidates = [s for s in asked if per_shard[s] >= share]
        return got

    async def _read_shards(
        self, consumer: str, shards: list[int], share: int, start: str, lanes: tuple[str, ...]
    ) -> list[Delivery]:
        wanted = set(shards)
        groups = [
            (route, [s for s in group if s in wanted])
            for route, group in await self._routes.by_route(self.keys.all_shards())
        ]
        replies = await asyncio.gather(
            *(
                self._read_on(route, group, consumer, share, start, lanes)
                for route, group in groups
                if group
            ),
            return_exceptions=True,
        )
        found = [d for reply in replies if not isinstance(reply, BaseException) for d in reply]
        failed = [reply for reply in replies if isinstance(reply, BaseException)]
        lost = next((reply for reply in failed if no_group(reply)), None)
        if lost is not None:
            # One primary lost its data: make its groups now, or the other primaries' entries
            # (returned below) would hide its shards from every read while traffic flows.
            await self._make_groups_again(lost)
        elif failed:
            await self._refresh_routes()  # a primary away: maybe replaced by its replica
        if failed and not found:  # what the other primaries gave is pending here: return it
            raise failed[0]
        return found

    async def _refresh_routes(self) -> None:
        try:
            await self._routes.refresh()
        except Exception as exc:  # the next call tries again
            log.debug("redis cluster: slot table not refreshed: %s", exc)

    async def _read_on(
        self,
        route: Route,
        shards: list[int],
        consumer: str,
        share: int,
        start: str,
        lanes: tuple[str, ...],
    ) -> list[Delivery]:
        async with route.client.pipeline(transaction=False) as pipe:
            for shard in shards:
                # One shard's classes share its hash tag: one read, no CROSSSLOT.
                streams: dict[Any, Any] = {self.keys.stream(shard, lane): start for lane in lanes}
                pipe.xreadgroup(GROUP, consumer, streams, count=share)
            replies = await pipe.execute(raise_on_error=False)
        found: list[Delivery] = []
        moved = False
        for reply in replies:
            if is_redirect(reply):
                moved = True
            elif isinstance(reply, Exception):
                raise reply
            else:
                found.extend(self._parse_read(reply))
        if moved:  # read those shards from their new primary next time
            await self._routes.refresh()
        return found

    async def claim_idle(self, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        """The safety net: take over entries idle longer than any delivery attempt can take."""
        claimed: list[Delivery] = []
        for shard, lane, stream in self.keys.all_streams():
            reply = await self._regrouped(
                lambda stream=stream: self._redis.xautoclaim(  # type: ignore[misc]
                    stream, GROUP, consumer, min_idle_ms, "0-0", count=count
                )
            )
            claimed.extend(self.deliveries(shard, reply[1], lane))
        return claimed

    def _parse_read(self, reply: Any) -> list[Delivery]:
        if not reply:
            return []
        pairs = reply.items() if isinstance(reply, dict) else reply
        deliveries: list[Delivery] = []
        for stream, entries in pairs:
            shard, lane = self.keys.parse_stream(text(stream))
            deliveries.extend(self.deliveries(shard, entries, lane))
        return deliveries

    def deliveries(self, shard: int, entries: Sequence[Any], lane: str = "") -> list[Delivery]:
        out = []
        for entry_id, fields in entries:
            if not fields:  # XDEL'd while pending: a Delivery without a message
                out.append(Delivery(shard, text(entry_id), None, lane))
                continue
            raw = fields.get(ENTRY_FIELD.encode()) or fields.get(ENTRY_FIELD)
            out.append(Delivery(shard, text(entry_id), QueuedMessage.decode(raw), lane))
        return out

    async def load_body(self, shard: int, qid: str) -> Body:
        data = await self._local.take(qid)  # accepted by this process: no round trip, no poll
        if data is not None:
            return Body(data=data, confirmed=True)
        key = self.keys.body(shard, qid)
        replies = await guarded(lambda: self._call(shard, ("HMGET", key, "d", "ok")))
        if isinstance(replies[0], Exception):
            raise QueueUnavailable(f"redis: {replies[0]}")
        data, ok = replies[0]
        return Body(data=data if isinstance(data, bytes) else None, confirmed=ok is not None)

    async def finish(self, delivery: Delivery, outcome: Finish) -> None:
        """Acknowledge the entry and record what is left of it, atomically (one script)."""
        shard, message = delivery.shard, delivery.message
        # Every key in the shard's slot (Redis Cluster), even a deleted entry's unused body key.
        body = self.keys.body(shard, message.qid if message is not None else "")
        lane = delivery.lane
        dead = outcome.dead
        split = dead is not None and outcome.retry is not None and message is not None
        if dead is not None and split:  # the dead letter gets a body of its own (scripts.py)
            dead = replace(dead, qid=split_qid(dead.qid, dead.attempts))
        keys = [
            self.keys.stream(shard, lane),
            self.keys.retry(shard, lane),
            self.keys.dead(shard),
            body,
            self.keys.body(shard, dead.qid) if dead is not None and split else body,
        ]
        # A deleted entry's body is not ours to delete: nothing says which it was.
        done = outcome.done and message is not None
        args = [
            GROUP,
            delivery.entry_id,
            outcome.retry.encode() if outcome.retry is not None else "",
            outcome.retry_due_ms,
            dead.encode() if dead is not None else "",
            outcome.dead_reason,
            "1" if done else "0",
            "1" if split else "0",
        ]
        await guarded(lambda: self._script(shard, self._finish, keys, args))

    async def move_due_retries(self, now: int, limit: int = 500) -> int:
        """Each class's due retries back into its own stream: every shard's script at once,
        through the batchers (one pipeline per server, EVALSHA without a SCRIPT EXISTS in
        front of each run, which a pipeline of Script calls would send every interval)."""
        per_shard = await guarded(lambda: self._move_due_per_shard(now, limit))
        return sum(int(replies[0]) for replies in per_shard)

    async def _move_due_per_shard(self, now: int, limit: int) -> list[list[Any]]:
        """Every shard's script (one per traffic class) at once; all of them awaited even when
        one fails (a primary away), so no failure is left unretrieved in a task nobody awaits."""
        keys = self.keys
        replies = await asyncio.gather(
            *(
                self._script(s, self._move_due, [stream, keys.retry(s, lane)], [now, limit])
                for s, lane, stream in keys.all_streams()
            ),
            return_exceptions=True,
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return [reply for reply in replies if not isinstance(reply, BaseException)]

    # -- views for tools and tests ------------------------------------------------------------

    async def stats(self, now: int, *, repair: bool = True) -> dict[str, float]:
        """Cluster-wide queue figures: ready, in flight, retrying, dead, oldest entry age.

        `repair=False` (the operator's tools): a Redis without our consumer groups raises
        (`no_group`) instead of getting them, since it may be the wrong Redis or prefix.
        """
        by_class, dead = await self._collect(now, repair)
        totals = {str(state): 0.0 for state in EntryState}
        for figures in by_class.values():
            for state in (EntryState.READY, EntryState.IN_FLIGHT, EntryState.RETRY):
                totals[state] += figures[state]
        totals[EntryState.DEAD] = float(dead)
        ages = [figures["oldest_age_s"] for figures in by_class.values()]
        totals["oldest_age_s"] = max(ages, default=0.0)
        return totals

    async def class_stats(self, now: int, *, repair: bool = True) -> dict[str, dict[str, float]]:
        """The same figures per traffic class (by name, highest priority first); dead letters
        are one stream per shard for every class, so they are counted only in `stats`."""
        return (await self._collect(now, repair))[0]

    async def _collect(self, now: int, repair: bool) -> tuple[dict[str, dict[str, float]], int]:
        if not repair:
            return await guarded(lambda: self._collect_once(now))
        return await self._regrouped(lambda: self._collect_once(now))

    async def _collect_once(self, now: int) -> tuple[dict[str, dict[str, float]], int]:
        streams = self.keys.all_streams()
        async with pipeline(self._redis, transaction=False) as pipe:
            for shard, lane, stream in streams:
                pipe.xlen(stream)
                pipe.xpending(stream, GROUP)
                pipe.zcard(self.keys.retry(shard, lane))
                pipe.xrange(stream, count=1)
            for shard in self.keys.all_shards():
                pipe.xlen(self.keys.dead(shard))
            rows = await guarded(pipe.execute)
        by_class = {self.classes.name_of(lane): _empty_figures() for lane in self.keys.lanes}
        for i, (_, lane, _) in enumerate(streams):
            length, pending, retry, first = rows[4 * i : 4 * i + 4]
            _add_figures(by_class[self.classes.name_of(lane)], now, length, pending, retry, first)
        return by_class, sum(int(n) for n in rows[4 * len(streams) :])

    async def depth(self) -> dict[str, int]:
        """Counts across shards and classes: entries in streams, waiting retries, dead letters."""
        async with pipeline(self._redis, transaction=False) as pipe:
            for shard, lane, stream in self.keys.all_streams():
                pipe.xlen(stream)
                pipe.zcard(self.keys.retry(shard, lane))
            for shard in self.keys.all_shards():
                pipe.xlen(self.keys.dead(shard))
            counts = await guarded(pipe.execute)
        pairs = 2 * len(self.keys.all_streams())
        return {
            "stream": sum(counts[0:pairs:2]),
            "retry": sum(counts[1:pairs:2]),
            "dead": sum(counts[pairs:]),
        }


def _empty_figures() -> dict[str, float]:
    return {
        EntryState.READY: 0.0,
        EntryState.IN_FLIGHT: 0.0,
        EntryState.RETRY: 0.0,
        "oldest_age_s": 0.0,
    }


def _add_figures(
    figures: dict[str, float], now: int, length: Any, pending: Any, retry: Any, first: Any
) -> None:
    """One stream's XLEN, XPENDING summary, retry ZCARD and first entry, added up."""
    in_flight = int(pending["pending"]) if isinstance(pending, dict) else int(pending[0])
    figures[EntryState.IN_FLIGHT] += in_flight
    figures[EntryState.READY] += max(0, int(length) - in_flight)
    figures[EntryState.RETRY] += int(retry)
    if first:
        oldest_ms = int(text(first[0][0]).split("-")[0])
        figures["oldest_age_s"] = max(figures["oldest_age_s"], max(0.0, (now - oldest_ms) / 1000))
