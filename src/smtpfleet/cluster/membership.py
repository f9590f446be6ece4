"""Heartbeats, the live-node set, takeover of dead nodes' deliveries, and self-fencing.

Every node writes its heartbeat into Redis each `heartbeat_interval_s`. A node whose last
heartbeat is older than `lease_s` is dead: survivors claim its pending entries (XCLAIM with a
min-idle guard, so exactly one survivor gets each) and deliver them, then remove the dead
consumer. A node whose last acknowledged heartbeat is nearly a lease old stops starting
deliveries (fenced) before anyone can claim its work, so duplicates stay confined to
deliveries that were already on the wire.

Beating and watching the others run in loops of their own. They once shared one loop, and
after a Redis Cluster primary died the watch (member reads, then a takeover's XPENDING and
XCLAIM over every stream) took 2-9 s: the node's next beat waited behind it, so a node in
contact with Redis, never fenced, looked a lease old to its peers, which took over its
deliveries while it was delivering them, and the taker's own claims then stalled its beats
in turn (docs/drills.md, redis-cluster-primary-kill).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

from smtpfleet.cluster.drift import Fingerprint, distinct_fingerprints
from smtpfleet.cluster.liveness import (
    live_nodes,
    may_judge_peers,
    must_fence,
    next_beat_delay_s,
    takeover_guard_ms,
    view_shows_own_beat,
)
from smtpfleet.cluster.store import MembershipStore
from smtpfleet.config import ClusterConfig
from smtpfleet.envelope import now_ms
from smtpfleet.errors import QueueUnavailable, RedisFull
from smtpfleet.metrics import Metrics
from smtpfleet.queue.deliveries import Delivery

log = logging.getLogger(__name__)

CLAIM_BATCH = 200


class Membership:
    """This node's place in the cluster: its heartbeat, the live set, takeover of dead nodes'
    pending entries (handed to `adopt`), self-fencing (`fenced`), and operator drain requests.

    `clock` (monotonic seconds) and `wall_ms` are injectable so tests can move time.
    """

    def __init__(
        self,
        *,
        store: MembershipStore,
        config: ClusterConfig,
        node_id: str,
        adopt: Callable[[list[Delivery]], None],
        metrics: Metrics,
        on_drain_request: Callable[[], None] | None = None,
        fingerprint: Fingerprint | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = now_ms,
    ) -> None:
        self._on_drain_request = on_drain_request
        self._fingerprint = fingerprint
        self.peer_fingerprints: dict[str, str] = {}  # live peer -> its routing config digest
        self._metrics = metrics
        self._clock = clock
        self._wall_ms = wall_ms
        self._store = store
        self._config = config
        self.node_id = node_id
        self._adopt = adopt
        self.live: set[str] = {node_id}
        self.role = "active"
        self.takeovers = 0
        self.claimed = 0
        # When the last heartbeat Redis acknowledged was started: peers date it by the time
        # written in it, so its age, not the last error, says how dead we look to them.
        self._landed_at = clock()
        self._fence_reported = False
        self._beat_error: Exception | None = None  # why the last heartbeat failed
        # Our last members read lacked a beat Redis had acknowledged to us: our writes land
        # where the peers do not read, so to them we look silent however well we beat.
        self._unseen = False
        # Since when our heartbeats have been landing without a miss (None: not now). Peers'
        # heartbeats stop while Redis is away too: judge them only after a whole lease of
        # contact, so that every live peer has had time to beat again.
        self._in_contact_since: float | None = clock()
        self._last_beat_ms: int | None = None  # the last heartbeat Redis took from us
        self._started_ms = wall_ms()

    @property
    def lease_ms(self) -> int:
        return int(self._config.lease_s * 1000)

    def info(self) -> dict[str, object]:
        info: dict[str, object] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_ms": self._started_ms,
            "role": self.role,
        }
        if self._fingerprint is not None:
            info["config"] = self._fingerprint.as_dict()
        return info

    @property
    def fenced(self) -> bool:
        """Whether to stop starting deliveries: our last acknowledged beat is nearly a lease
        old, whether the writes since failed, hang, or the node stalled; or the members we
        read do not show it (the peers read the same)."""
        config = self._config
        return self._unseen or must_fence(
            self._clock() - self._landed_at,
            lease_s=config.lease_s,
            heartbeat_interval_s=config.heartbeat_interval_s,
        )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as loops:
            loops.create_task(self._every_interval(self.beat))
            loops.create_task(self._every_interval(self.watch))

    async def _every_interval(self, step: Callable[[], Awaitable[None]]) -> None:
        interval_s = self._config.heartbeat_interval_s
        while True:
            started = self._clock()
            await step()
            await asyncio.sleep(next_beat_delay_s(started, self._clock(), interval_s))

    async def tick(self) -> None:
        """One beat, then one look at the others (at start, and for tests)."""
        await self.beat()
        await self.watch()

    async def beat(self) -> None:
        now, started = self._wall_ms(), self._clock()
        try:
            previous = await self._store.heartbeat(
                self.node_id, now, self.info(), 2 * self.lease_ms
            )
        except Exception as exc:
            # Whatever kept our beat from landing (Redis away, or a bug on the way to it),
            # peers see us silent: fence on time all the same.
            if not isinstance(exc, QueueUnavailable):
                log.exception("heartbeat of %s failed", self.node_id)
            self._in_contact_since = None
            self._report_fence(exc)
            return
        quiet_s = self._clock() - self._landed_at  # the oldest our beat got, just now
        self._landed_at = started
        if self._in_contact_since is None or self._beats_were_lost(previous):
            self._in_contact_since = started
        self._last_beat_ms = now
        self._beat_error = None
        self._report_recovery(quiet_s)

    async def watch(self) -> None:
        """Judge the peers, take over the dead, and hear an operator's drain request."""
        try:
            await self._watch_members(self._wall_ms())
            if self._on_drain_request and await self._store.take_drain_request(self.node_id):
                log.warning("an operator asked %s to drain", self.node_id)
                self._on_drain_request()
        except QueueUnavailable as exc:
            log.warning("membership check failed: %s", exc)

    def _beats_were_lost(self, previous: int | None) -> bool:
        """Writes that landed on a primary that was then replaced (a forced failover) fail
        nowhere: only the beat we find in place of our last one shows it. Every peer's beats of
        that time are gone too, so like after an outage, judge nobody for a lease."""
        if self._last_beat_ms is None or (previous is not None and previous >= self._last_beat_ms):
            return False
        # A peer that judged us dead and removed us leaves the same trace (no beat at all):
        # in the cluster drill that, not a failover, was what this message reported.
        log.warning(
            "%s: our last heartbeats are not in Redis (a failover lost them, or a peer "
            "removed us): judging no peer for a lease",
            self.node_id,
        )
        return True

    def _check_view(self, seen: bool) -> None:
        """Beats and the watch run apart, so the beat that would reveal lost writes may come
        after a judgement: the members read itself must show our own last beat. If it does
        not, peers' beats in it are suspect too (judge no one for a lease), and the peers,
        reading the same, see us silent: fence until a read shows our beat again."""
        if seen:
            if self._unseen:
                log.warning("%s: our heartbeats show in Redis again", self.node_id)
            self._unseen = False
            return
        if not self._unseen:
            log.warning(
                "%s: the members read lacks our last acknowledged heartbeat (writes lost "
                "without an error, or a peer removed us): judging no peer for a lease, "
                "starting no delivery until our beats show",
                self.node_id,
            )
        self._unseen = True
        self._in_contact_since = self._clock()

    @property
    def redis_full(self) -> bool:
        """Whether the last heartbeat failed because Redis is at its maxmemory."""
        return isinstance(self._beat_error, RedisFull)

    def _report_fence(self, exc: Exception) -> None:
        self._beat_error = exc
        if self.fenced and not self._fence_reported:
            silent_s = self._clock() - self._landed_at
            if isinstance(exc, RedisFull):
                # Reachable, so "no Redis" would send the operator the wrong way; and waiting
                # does not help: finishing deliveries needs writes too (docs/operations.md).
                log.error(
                    "Redis refuses writes for %.1fs, full at its maxmemory: %s stops starting "
                    "deliveries until memory is freed or maxmemory raised (%s)",
                    silent_s,
                    self.node_id,
                    exc,
                )
            else:
                log.error(
                    "no Redis for %.1fs: %s stops starting deliveries (%s)",
                    silent_s,
                    self.node_id,
                    exc,
                )
            self._fence_reported = True

    def _report_recovery(self, quiet_s: float) -> None:
        """A fence seen by a failed write was reported then; one that only a slow write or a
        stalled loop caused is reported once it is over."""
        if self._fence_reported:
            log.warning("Redis is back: %s starts deliveries again", self.node_id)
            self._fence_reported = False
        elif must_fence(
            quiet_s,
            lease_s=self._config.lease_s,
            heartbeat_interval_s=self._config.heartbeat_interval_s,
        ):
            log.warning(
                "%s: no heartbeat landed for %.1fs, with no error: fenced meanwhile",
                self.node_id,
                quiet_s,
            )

    async def _watch_members(self, now: int) -> None:
        acked_ms = self._last_beat_ms  # before the read: a beat acknowledged later may be absent
        members = await self._store.members()
        self._check_view(view_shows_own_beat(members.get(self.node_id), acked_ms))
        if not may_judge_peers(
            self._in_contact_since, self._clock(), self._config.lease_s, fenced=self.fenced
        ):
            self.live = {*members, self.node_id}  # stale beats say nothing yet
            self._metrics.live_nodes.set(len(self.live))
            return
        self.live = live_nodes(members, now_ms=now, lease_s=self._config.lease_s) | {self.node_id}
        self._metrics.live_nodes.set(len(self.live))
        await self._compare_configs()
        for dead in sorted(set(members) - self.live):
            await self._take_over(dead, members[dead])

    async def _compare_configs(self) -> None:
        """Drift: does a live peer route with another configuration than ours?"""
        if self._fingerprint is None:
            return
        peers = self.live - {self.node_id}
        info = await self._store.node_info(peers) if peers else {}
        published = {n: Fingerprint.from_dict(i.get("config") or {}) for n, i in info.items()}
        fingerprints = {n: fp.digest for n, fp in published.items() if fp is not None}
        distinct = distinct_fingerprints(self._fingerprint.digest, fingerprints)
        if distinct > 1 and fingerprints != self.peer_fingerprints:
            differ = sorted(n for n, d in fingerprints.items() if d != self._fingerprint.digest)
            log.warning("configuration drift: %s route with another configuration", differ)
        self.peer_fingerprints = fingerprints
        self._metrics.config_drift.set(1 if distinct > 1 else 0)
        self._metrics.config_fingerprints.set(distinct)

    async def _take_over(self, dead: str, last_beat_ms: int) -> None:
        guard_ms = takeover_guard_ms(self._config.heartbeat_interval_s)
        claimed = await self._store.claim_from(dead, self.node_id, guard_ms, CLAIM_BATCH)
        if claimed:
            self._metrics.takeovers.inc()
            self.takeovers += 1
            self.claimed += len(claimed)
            log.warning("took over %d deliveries of dead node %s", len(claimed), dead)
            self._adopt(claimed)
            return
        if await self._store.pending_count(dead) == 0:
            if await self._store.forget_node(dead, last_beat_ms):
                log.info("removed dead node %s (nothing left pending)", dead)
            else:
                log.info("dead node %s is back under the same id: left as it is", dead)

    async def leave(self) -> None:
        """After a clean drain: deregister, unless work is left for survivors to claim."""
        try:
            if await self._store.pending_count(self.node_id) == 0:
                await self._store.forget_node(self.node_id)
        except QueueUnavailable as exc:
            log.warning("could not deregister %s: %s", self.node_id, exc)
