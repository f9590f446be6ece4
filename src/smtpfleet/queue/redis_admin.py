"""What the operator CLI reads and changes in Redis: the cluster's one view of itself."""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from smtpfleet.cluster.drift import DriftReport, Fingerprint, drift_report
from smtpfleet.cluster.liveness import live_nodes
from smtpfleet.envelope import EntryState, QueuedMessage, now_ms, shard_of
from smtpfleet.errors import QueueUnavailable
from smtpfleet.health.state import cluster_verdict
from smtpfleet.queue.keys import ENTRY_FIELD, GROUP
from smtpfleet.queue.redis_cluster import ClusterStore
from smtpfleet.queue.redis_queue import RedisQueue, no_group, text
from smtpfleet.queue.redis_topology import topology
from smtpfleet.queue.topology import Topology
from smtpfleet.relays.rules import WAITING_OUTCOME, WAITING_PREFIX

RECENT_MINUTES = 5
SCAN_LIMIT = 100_000
PAGE = 500  # entries per XRANGE/ZRANGE, and dead letters per script call: no long command
MAX_SHARDS = 4096  # redis.shards' upper bound (config.py)

# A dead letter goes back into its stream only if this call removed it from the dead
# letters: of two operators (or a requeue and a purge) racing, exactly one acts on it.
# KEYS[1] the shard's dead stream, KEYS[2..] its streams (one per lane, one hash tag);
# ARGV: dead entry id, index in KEYS of its stream, the entry; repeated.
REQUEUE_DEAD = f"""
local moved = 0
for i = 1, #ARGV, 3 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[tonumber(ARGV[i + 1])], '*', '{ENTRY_FIELD}', ARGV[i + 2])
    moved = moved + 1
  end
end
return moved
"""

# A body goes only with a dead letter this call removed: one requeued meanwhile keeps it.
# KEYS[1] the shard's dead stream, KEYS[i + 1] the body of the letter whose id is ARGV[i].
PURGE_DEAD = """
local purged = 0
for i = 1, #ARGV do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('DEL', KEYS[i + 1])
    purged = purged + 1
  end
end
return purged
"""


NO_LONGER_DEAD = "nothing to do: it is no longer a dead letter (requeued or purged meanwhile)"


class NotFound(LookupError):
    """No such queue id, relay or node."""


@dataclass
class Entry:
    """One queued message as the operator sees it, wherever it is."""

    qid: str
    state: EntryState
    sender: str
    recipients: list[str]
    attempts: int
    age_s: float
    owner: str | None = None  # in_flight: the node delivering it
    lease_age_s: float | None = None  # in_flight: time since its lease was refreshed
    due_in_s: float | None = None  # retry
    reason: str | None = None  # dead
    last_errors: dict[str, str] = field(default_factory=dict)
    traffic_class: str | None = None  # its class's name, when classes are configured

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Admin:
    """The operator's reads and changes: status, listing and finding entries, retry, delete,
    dead letters, pausing relays, drain requests."""

    def __init__(self, queue: RedisQueue) -> None:
        self.queue = queue
        self.store = ClusterStore(queue)
        self.keys = queue.keys
        # Any: redis-py's return types are unions over every decode mode and RESP version;
        # this client is bytes-mode RESP2, and the parsing below is written for exactly that.
        self._redis: Any = queue.client
        self._requeue_script = self._redis.register_script(REQUEUE_DEAD)
        self._purge_script = self._redis.register_script(PURGE_DEAD)

    async def shards_in_redis(self) -> int:
        """How many shards the cluster's nodes made, when more than `keys.shards`.

        Every node makes each shard's stream at start (RedisQueue.ensure_groups), and a stream
        with a consumer group stays when emptied: shards 0..n-1 have one, shard n none. A
        probe of one key per step, doubling then halving: at most ~2 x log2(MAX_SHARDS).
        """
        known = self.keys.shards
        if known >= MAX_SHARDS or not await self._has_shard(known):
            return known
        low, high = known + 1, min(2 * (known + 1), MAX_SHARDS)  # shard low-1 exists
        while high < MAX_SHARDS and await self._has_shard(high - 1):
            low, high = high, min(2 * high, MAX_SHARDS)
        while low < high:  # shard low-1 exists; shard high-1 does not, or high is the cap
            middle = (low + high + 1) // 2
            if await self._has_shard(middle - 1):
                low = middle
            else:
                high = middle - 1
        return low

    async def _has_shard(self, shard: int) -> bool:
        return bool(await self._redis.exists(self.keys.stream(shard)))

    # -- status ------------------------------------------------------------------------------

    async def status(self, lease_s: float, known_relays: Iterable[str] = ()) -> dict[str, Any]:
        now = now_ms()
        members = await self.store.members()
        info = await self.store.node_info(members)
        live = live_nodes(members, now_ms=now, lease_s=lease_s)
        views = await self.store.views(members)
        reasons = await self.store.view_reasons(members)
        relays = sorted(set(known_relays) | {r for v in views.values() for r in v})
        verdict = cluster_verdict(relays, views, live)
        paused = await self.store.paused_relays()
        recent = await self._recent_outcomes(now)
        stats, by_class = await self._queue_figures(now)
        return {
            "nodes": [
                self._node_row(n, members[n], info.get(n, {}), n in live, now) for n in members
            ],
            "relays": [
                {
                    "name": relay,
                    "verdict": "paused"
                    if relay in paused
                    else ("up" if verdict[relay] else "down"),
                    "views": {
                        n: ("up" if v[relay] else "down") for n, v in views.items() if relay in v
                    },
                    "recent": recent.get(relay, {}),
                    "reasons": {n: r[relay] for n, r in reasons.items() if relay in r},
                }
                for relay in relays
            ],
            "queue": {
                **_counts(stats),
                "in_flight_by_node": await self._in_flight_by_node(),
                **({"classes": {k: _counts(v) for k, v in by_class.items()}} if by_class else {}),
            },
            "config": self._config_drift(info, live).as_dict(),
            "waiting_for_route": {
                name.removeprefix(WAITING_PREFIX): counts.get(WAITING_OUTCOME, 0)
                for name, counts in sorted(recent.items())
                if name.startswith(WAITING_PREFIX)
            },
        }

    async def topology(self, master_name: str) -> Topology:
        """The Redis servers as they answer now: primaries, replicas and lag, Sentinels, and
        which shards each primary holds."""
        return await topology(self.queue.connection, self.keys, master_name)

    @staticmethod
    def _config_drift(info: dict[str, dict[str, Any]], live: Iterable[str]) -> DriftReport:
        """The live nodes' routing configuration fingerprints compared (see cluster/drift.py)."""
        published = {n: Fingerprint.from_dict(info.get(n, {}).get("config") or {}) for n in live}
        return drift_report({n: fp for n, fp in published.items() if fp is not None})

    @staticmethod
    def _node_row(
        node: str, beat: int, info: dict[str, Any], alive: bool, now: int
    ) -> dict[str, Any]:
        started = info.get("started_ms")
        return {
            "id": node,
            "alive": alive,
            "role": info.get("role", "unknown") if alive else "dead",
            "heartbeat_age_s": round((now - beat) / 1000, 1),
            "uptime_s": round((now - started) / 1000) if started else None,
            "host": info.get("host"),
            "pid": info.get("pid"),
            "config": (info.get("config") or {}).get("digest"),
        }

    async def _recent_outcomes(self, now: int) -> dict[str, dict[str, int]]:
        minute = now // 60_000
        out: dict[str, dict[str, int]] = {}
        for m in range(minute - RECENT_MINUTES + 1, minute + 1):
            for key, count in (await self._redis.hgetall(self.keys.outcomes(m))).items():
                relay, _, outcome = text(key).partition("|")
                bucket = out.setdefault(relay, {})
                bucket[outcome] = bucket.get(outcome, 0) + int(count)
        return out

    async def _queue_figures(
        self, now: int
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        try:
            stats = await self.queue.stats(now, repair=False)
            if not self.queue.classes.classes:
                return stats, {}
            return stats, await self.queue.class_stats(now, repair=False)
        except QueueUnavailable as exc:
            if not no_group(exc):
                raise
        # Not made here: a status must not write, and this may be the wrong Redis or prefix.
        raise self._no_queue_here()

    def refusal(self, exc: BaseException) -> NotFound | None:
        """What an error answer of Redis means to an operator; None if `exc` is not one."""
        if no_group(exc):
            return self._no_queue_here()
        if isinstance(exc, ResponseError):
            return NotFound(f"Redis refused: {exc}")
        return None

    def _no_queue_here(self) -> NotFound:
        return NotFound(
            f"no smtpfleet queue under prefix {self.keys.prefix!r} here (no consumer groups):"
            " no node has started against this Redis, or the prefix or database is not the"
            " cluster's"
        )

    async def _in_flight_by_node(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, _, stream in self.keys.all_streams():
            summary = await self._redis.xpending(stream, GROUP)
            for row in summary.get("consumers") or []:
                name = text(row["name"])
                counts[name] = counts.get(name, 0) + int(row["pending"])
        return counts

    # -- listing and finding entries ---------------------------------------------------------

    async def entries(self, states: Iterable[str], limit: int) -> list[Entry]:
        wanted = {EntryState(s) for s in states}
        found: list[Entry] = []
        for shard in self.keys.all_shards():
            for lane in self.keys.lanes:
                found += await self._lane_entries(shard, lane, wanted, limit)
            if EntryState.DEAD in wanted:
                found += await self._dead_entries(shard, limit)
        found.sort(key=lambda e: -e.age_s)
        return found[:limit]

    async def _lane_entries(
        self, shard: int, lane: str, wanted: set[EntryState], limit: int
    ) -> list[Entry]:
        """One traffic class's entries of one shard: in its stream and its retry set."""
        found: list[Entry] = []
        if wanted & {EntryState.READY, EntryState.IN_FLIGHT}:
            rows = await self._stream_entries(shard, limit, lane)
            found += [e for e in rows if e.state in wanted]
        if EntryState.RETRY in wanted:
            found += await self._retry_entries(shard, limit, lane)
        return found

    async def _stream_entries(self, shard: int, limit: int, lane: str = "") -> list[Entry]:
        stream = self.keys.stream(shard, lane)
        now = now_ms()
        pending = {
            text(row["message_id"]): row
            for row in await self._redis.xpending_range(stream, GROUP, "-", "+", SCAN_LIMIT)
        }
        rows = []
        for entry_id, fields in await self._redis.xrange(stream, count=limit):
            message = QueuedMessage.decode(fields[ENTRY_FIELD.encode()])
            owner = pending.get(text(entry_id))
            state = EntryState.IN_FLIGHT if owner else EntryState.READY
            entry = self._entry(message, state, now)
            if owner:
                entry.owner = text(owner["consumer"])
                entry.lease_age_s = round(int(owner["time_since_delivered"]) / 1000, 1)
            rows.append(entry)
        return rows

    async def _retry_entries(self, shard: int, limit: int, lane: str = "") -> list[Entry]:
        """The `limit` oldest (by accept time) of a retry set; the set is ordered by due time,
        so its first members are not the oldest: read it all, a page at a time."""
        now = now_ms()
        oldest: dict[bytes, tuple[QueuedMessage, float]] = {}
        async for page in self._retry_pages(self.keys.retry(shard, lane)):
            # A member seen twice (the set changed between pages) is one entry: keyed by it.
            oldest |= {member: (QueuedMessage.decode(member), score) for member, score in page}
            kept = heapq.nsmallest(limit, oldest.items(), key=lambda kv: kv[1][0].accepted_ms)
            oldest = dict(kept)
        rows = []
        for message, score in oldest.values():
            entry = self._entry(message, EntryState.RETRY, now)
            entry.due_in_s = round(max(0.0, (score - now) / 1000), 1)
            rows.append(entry)
        return rows

    async def _retry_pages(self, key: str) -> AsyncIterator[list[tuple[bytes, float]]]:
        """A retry set's members with their scores, PAGE at a time, at most SCAN_LIMIT."""
        for start in range(0, SCAN_LIMIT, PAGE):
            page = await self._redis.zrange(key, start, start + PAGE - 1, withscores=True)
            if page:
                yield page
            if len(page) < PAGE:
                return

    async def _dead_entries(self, shard: int, limit: int) -> list[Entry]:
        now = now_ms()
        rows = []
        for _, fields in await self._redis.xrange(self.keys.dead(shard), count=limit):
            message = QueuedMessage.decode(fields[ENTRY_FIELD.encode()])
            entry = self._entry(message, EntryState.DEAD, now)
            entry.reason = text(fields.get(b"reason", b""))
            rows.append(entry)
        return rows

    async def find(self, qid: str) -> tuple[Entry, str]:
        """The entry and where it is: a stream id, a retry member, or a dead-letter id."""
        shard = self._shard(qid)
        for lane in self.keys.lanes:
            found = await self._find_in_lane(shard, lane, qid)
            if found is not None:
                return found
        for entry_id, fields in await self._redis.xrange(self.keys.dead(shard), count=SCAN_LIMIT):
            message = QueuedMessage.decode(fields[ENTRY_FIELD.encode()])
            if message.qid == qid:
                entry = self._entry(message, EntryState.DEAD, now_ms())
                entry.reason = text(fields.get(b"reason", b""))
                return entry, text(entry_id)
        raise NotFound(f"no queued message {qid}")

    async def _find_in_lane(self, shard: int, lane: str, qid: str) -> tuple[Entry, str] | None:
        stream = self.keys.stream(shard, lane)
        for entry_id, fields in await self._redis.xrange(stream, count=SCAN_LIMIT):
            if QueuedMessage.decode(fields[ENTRY_FIELD.encode()]).qid == qid:
                rows = await self._stream_entries(shard, SCAN_LIMIT, lane)
                return next(e for e in rows if e.qid == qid), text(entry_id)
        for member in await self._redis.zrange(self.keys.retry(shard, lane), 0, -1):
            message = QueuedMessage.decode(member)
            if message.qid == qid:
                return self._entry(message, EntryState.RETRY, now_ms()), text(member)
        return None

    def _shard(self, qid: str) -> int:
        try:
            shard = shard_of(qid)
        except ValueError:
            raise NotFound(f"not a queue id: {qid!r}") from None
        if shard >= self.keys.shards:
            raise NotFound(f"no queued message {qid} (shard {shard} does not exist)")
        return shard

    async def headers(self, qid: str) -> str:
        data: bytes | None = await self._redis.hget(self.keys.body(self._shard(qid), qid), "d")
        if data is None:
            return ""
        return data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")

    # -- changing entries --------------------------------------------------------------------

    async def retry_now(self, qid: str) -> str:
        entry, where = await self.find(qid)
        shard = self._shard(qid)
        if entry.state is EntryState.RETRY:
            await self._redis.zadd(self.keys.retry(shard, self._lane(entry)), {where: now_ms()})
            return "moved to the front of the retry schedule"
        if entry.state is EntryState.DEAD:
            if not await self._requeue_dead(shard, where):
                return NO_LONGER_DEAD
            return "requeued from the dead letters"
        return f"nothing to do: it is {entry.state.replace('_', ' ')}"

    async def _requeue_dead(self, shard: int, entry_id: str) -> bool:
        rows = await self._redis.xrange(self.keys.dead(shard), entry_id, entry_id)
        return bool(rows) and await self._requeue_rows(shard, rows) == 1

    async def _requeue_rows(self, shard: int, rows: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        """Move these dead letters back into their streams; how many were still there."""
        streams = self.keys.streams(shard)
        args: list[bytes | str | int] = []
        for entry_id, fields in rows:
            member = fields[ENTRY_FIELD.encode()]
            lane = QueuedMessage.decode(member).traffic_class
            if lane not in self.keys.lanes:  # a class no longer configured: the default's
                lane = ""
            args += [entry_id, self.keys.lanes.index(lane) + 2, member]
        keys = [self.keys.dead(shard), *streams]
        return int(await self._requeue_script(keys=keys, args=args))

    async def _purge_rows(self, shard: int, rows: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        """Delete these dead letters and their bodies; how many were still there."""
        bodies = [
            self.keys.body(shard, QueuedMessage.decode(fields[ENTRY_FIELD.encode()]).qid)
            for _, fields in rows
        ]
        ids = [entry_id for entry_id, _ in rows]
        return int(await self._purge_script(keys=[self.keys.dead(shard), *bodies], args=ids))

    async def _newest_dead(self) -> dict[int, str]:
        """Each shard's newest dead letter id now: what `--all` acts on ends there. A letter
        that dies later is not among them, nor is one requeued that dies again (or one run
        could requeue it forever)."""
        newest = {}
        for shard in self.keys.all_shards():
            rows = await self._redis.xrevrange(self.keys.dead(shard), count=1)
            if rows:
                newest[shard] = text(rows[0][0])
        return newest

    async def _dead_pages(self, shard: int, end: str) -> AsyncIterator[list[tuple[bytes, Any]]]:
        """The shard's dead letters up to id `end`, PAGE at a time."""
        start = "-"
        while page := await self._redis.xrange(self.keys.dead(shard), start, end, count=PAGE):
            yield page
            start = f"({text(page[-1][0])}"

    async def delete(self, qid: str) -> str:
        entry, where = await self.find(qid)
        shard = self._shard(qid)
        if entry.state is EntryState.DEAD:
            rows = await self._redis.xrange(self.keys.dead(shard), where, where)
            if not rows or not await self._purge_rows(shard, rows):
                return NO_LONGER_DEAD
            return "deleted (dead)"
        lane = self._lane(entry)
        async with self._redis.pipeline(transaction=True) as pipe:
            if entry.state in (EntryState.READY, EntryState.IN_FLIGHT):
                pipe.xack(self.keys.stream(shard, lane), GROUP, where)
                pipe.xdel(self.keys.stream(shard, lane), where)
            else:
                pipe.zrem(self.keys.retry(shard, lane), where)
            pipe.delete(self.keys.body(shard, qid))
            await pipe.execute()
        return f"deleted ({entry.state.replace('_', ' ')})"

    async def requeue_all_dead(self) -> int:
        """Requeue the dead letters there when it starts; the count is of those this call
        moved (another operator's concurrent run, or a purge, may take some first)."""
        moved = 0
        for shard, end in (await self._newest_dead()).items():
            async for page in self._dead_pages(shard, end):
                moved += await self._requeue_rows(shard, page)
        return moved

    async def purge_dead(self) -> int:
        """Delete the dead letters there when it starts, with their bodies, by id: letters
        that die while it runs stay. The count is of those this call deleted."""
        purged = 0
        for shard, end in (await self._newest_dead()).items():
            async for page in self._dead_pages(shard, end):
                purged += await self._purge_rows(shard, page)
        return purged

    def _entry(self, message: QueuedMessage, state: EntryState, now: int) -> Entry:
        entry = _entry(message, state, now)
        if self.queue.classes.classes:
            entry.traffic_class = self.queue.classes.name_of(message.traffic_class)
        return entry

    def _lane(self, entry: Entry) -> str:
        """The lane of an entry found in a stream or a retry set."""
        return self.queue.classes.lane_of(entry.traffic_class or self.queue.classes.default)

    # -- relays and nodes --------------------------------------------------------------------

    async def set_paused(self, relay: str, paused: bool, known: Iterable[str]) -> None:
        if relay not in set(known) | await self._relays_in_views():
            raise NotFound(f"unknown relay {relay!r}")
        if paused:
            await self._redis.sadd(self.keys.paused_relays(), relay)
        else:
            await self._redis.srem(self.keys.paused_relays(), relay)

    async def _relays_in_views(self) -> set[str]:
        views = await self.store.views(await self.store.members())
        return {relay for view in views.values() for relay in view}

    async def request_drain(self, node_id: str) -> list[str]:
        """Ask a node to drain; a pod's id under `serve --workers` drains all its workers."""
        members = await self.store.members()
        targets = (
            [node_id]
            if node_id in members
            else sorted(m for m in members if m.startswith(f"{node_id}/"))
        )
        if not targets:
            raise NotFound(f"unknown node {node_id!r}")
        for target in targets:
            await self._redis.set(self.keys.drain_request(target), "1", ex=3600)
        return targets


def _entry(message: QueuedMessage, state: EntryState, now: int) -> Entry:
    return Entry(
        qid=message.qid,
        state=state,
        sender=message.sender,
        recipients=list(message.recipients),
        attempts=message.attempts,
        age_s=round((now - message.accepted_ms) / 1000, 1),
        last_errors=dict(message.last_errors),
    )


def _counts(figures: dict[str, float]) -> dict[str, Any]:
    """Entries are counted in whole numbers (the queue keeps gauges' floats); ages stay floats."""
    return {k: v if k.endswith("_s") else int(v) for k, v in figures.items()}
