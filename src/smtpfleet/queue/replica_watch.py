"""How many replicas an accept must reach before its 250, under Sentinel (`replicated`).

`WAIT n` with fewer replicas than a failover could promote is no durability: in a forced
failover the old primary goes on taking writes after the Sentinels promoted another replica,
confirmed by the replica it still has, until it is demoted and they all vanish (a loopback
experiment lost 600-1,000 of 3,500 writes that `WAIT 1` of two replicas had confirmed;
`WAIT 2` lost none). So the accept's WAIT asks for every replica the Sentinels could promote
now, and for at least `queue.replicas`. A replica that dies holds accepts back (451) until
the Sentinels mark it down (`down-after-milliseconds`); after a failover, until the replicas
have synced with the new primary.

A replica out of sync (its link to the primary down: syncing after a restart, or the old
primary after a forced failover, which the Sentinels demote only about 10 s later) stops
counting after `IDLE_GRACE_S`: it cannot acknowledge anything yet, and a failover picks it only
after every in-sync replica (among equal priorities the most data wins; a better priority
keeps it counted). Otherwise a replica's restart would refuse all mail until its full sync.
The grace covers the moment the Sentinels show every replica out of sync while they switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from smtpfleet.queue.topology import ReplicaState, must_confirm, replica_states

log = logging.getLogger(__name__)

POLL_S = 0.5
ASK_TIMEOUT_S = 1.0
IDLE_GRACE_S = 2.0


class ReplicaWatch:
    """The replicas the Sentinels could promote, read every `poll_s` while accepts flow."""

    def __init__(
        self,
        sentinels: list[Any],
        master_name: str,
        minimum: int,
        poll_s: float = POLL_S,
        on_switch: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._sentinels = sentinels
        self._on_switch = on_switch
        self._primary: str | None = None  # the one most Sentinels named last time
        self._master_name = master_name
        self._minimum = minimum
        self._poll_s = poll_s
        self._needed = minimum
        self._task: asyncio.Task[None] | None = None
        self._out_of_sync_since: dict[str, float] = {}  # replica -> first seen out of sync

    def needed(self) -> int:
        """The replicas a write must reach now; starts the watch on first use."""
        self.start()
        return self._needed

    def start(self) -> None:
        """Watch from now on (also where no accept asks for a count: following a switch
        matters in every durability mode)."""
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="replica-watch")

    async def refresh(self) -> None:
        """Ask every Sentinel. The view of the primary most of them name counts (one that has
        not heard of a switch yet lists the old primary's replicas), else all of them; where
        they differ on a replica, the stricter reading (`merged`). With no answer the last
        figure stands (never below `queue.replicas`)."""
        asked = list(self._sentinels)
        replies = await asyncio.gather(*map(self._ask, asked))
        answers = [reply for reply in replies if reply is not None]
        if not answers:
            return
        named = [primary for primary, _ in answers]
        majority = max(set(named), key=named.count)
        if named.count(majority) * 2 > len(asked):
            answers = [answer for answer in answers if answer[0] == majority]
            agreeing = [s for s, r in zip(asked, replies, strict=True) if r and r[0] == majority]
            await self._follow(majority, agreeing[0])
        needed = max(self._minimum, self._count(merged(states for _, states in answers)))
        if needed != self._needed:
            log.info("accepts now wait for %d replicas (were %d)", needed, self._needed)
        self._needed = needed

    async def _follow(self, primary: str, agreeing: Any) -> None:
        """A new primary: drop our connections to the old one. redis-py asks the Sentinels for
        the primary only when it connects, and the old primary takes writes (each one a 451
        here, as no replica confirms it) until the Sentinels demote it, about 10 s later.
        redis-py takes the first Sentinel's word, which may not have heard of the switch yet:
        one of the majority goes first (redis-py's own way to prefer a Sentinel)."""
        switched = self._primary is not None and primary != self._primary
        self._primary = primary
        if not switched or self._on_switch is None:
            return
        at = self._sentinels.index(agreeing)
        self._sentinels[0], self._sentinels[at] = self._sentinels[at], self._sentinels[0]
        log.warning("the Sentinels name a new primary, %s: reconnecting", primary)
        await self._on_switch()

    def _count(self, states: list[ReplicaState], now: float | None = None) -> int:
        """The replicas a write must reach (`topology.must_confirm`), and those that fell out
        of sync less than `IDLE_GRACE_S` ago: the Sentinels show every replica so for a moment
        as they switch to a new primary, before they have asked it again."""
        now = time.monotonic() if now is None else now
        for state in states:
            if state.in_sync:
                self._out_of_sync_since.pop(state.address, None)
            else:
                self._out_of_sync_since.setdefault(state.address, now)
        return sum(
            1
            for state in states
            if must_confirm(state, states)
            or (
                state.promotable
                and now - self._out_of_sync_since.get(state.address, now) < IDLE_GRACE_S
                and not state.in_sync
            )
        )

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug here must not freeze the count: it is retried
                log.exception("the replica watch failed; asking the Sentinels again")
            await asyncio.sleep(self._poll_s)

    async def _ask(self, sentinel: Any) -> tuple[str, list[ReplicaState]] | None:
        """(the primary this Sentinel names, its replicas), or None if it did not answer.

        The primary as `SENTINEL MASTER` names it, which is what redis-py connects to: during
        a failover `GET-MASTER-ADDR-BY-NAME` names the promoted replica a second or so before
        the Sentinel's own record (and redis-py) switch to it."""
        try:
            master = await asyncio.wait_for(
                sentinel.sentinel_master(self._master_name), ASK_TIMEOUT_S
            )
            replies = await asyncio.wait_for(
                sentinel.sentinel_slaves(self._master_name), ASK_TIMEOUT_S
            )
        except Exception as exc:  # one Sentinel away is an answer missing, not a failure
            log.debug("Sentinel did not list the replicas: %s", exc)
            return None
        return f"{master.get('ip')}:{master.get('port')}", replica_states(replies)


def merged(views: Iterable[list[ReplicaState]]) -> list[ReplicaState]:
    """One state per replica from several Sentinels' views, the stricter reading of each:
    promotable if any says so, in sync if any says so (then it must confirm), the best
    priority. The Sentinels refresh their views at different moments."""
    by_address: dict[str, ReplicaState] = {}
    for view in views:
        for state in view:
            seen = by_address.get(state.address)
            by_address[state.address] = (
                state
                if seen is None
                else ReplicaState(
                    state.address,
                    promotable=seen.promotable or state.promotable,
                    in_sync=seen.in_sync or state.in_sync,
                    priority=min(seen.priority, state.priority),
                )
            )
    return list(by_address.values())
