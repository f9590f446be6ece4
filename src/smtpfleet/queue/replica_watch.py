"""How many replicas an accept must reach before its 250, under Sentinel (`replicated`).

`WAIT n` with fewer replicas than a failover could promote is no durability: in a forced
failover the old primary goes on taking writes after the Sentinels promoted another replica,
confirmed by the replica it still has, until it is demoted and they all vanish (a loopback
experiment lost 600-1,000 of 3,500 writes that `WAIT 1` of two replicas had confirmed;
`WAIT 2` lost none). So the accept's WAIT asks for every replica the Sentinels could promote
now, and for at least `queue.replicas`. A replica that dies holds accepts back (451) until
the Sentinels mark it down (`down-after-milliseconds`); after a failover, until the replicas
have synced with the new primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from smtpfleet.queue.topology import promotable_replicas

log = logging.getLogger(__name__)

POLL_S = 0.5
ASK_TIMEOUT_S = 1.0


class ReplicaWatch:
    """The replicas the Sentinels could promote, read every `poll_s` while accepts flow."""

    def __init__(
        self, sentinels: list[Any], master_name: str, minimum: int, poll_s: float = POLL_S
    ) -> None:
        self._sentinels = sentinels
        self._master_name = master_name
        self._minimum = minimum
        self._poll_s = poll_s
        self._needed = minimum
        self._task: asyncio.Task[None] | None = None

    def needed(self) -> int:
        """The replicas a write must reach now; starts the watch on first use."""
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="replica-watch")
        return self._needed

    async def refresh(self) -> None:
        """Ask every Sentinel; the most replicas any of them could promote count. With no
        answer the last figure stands (it never falls below `queue.replicas`)."""
        answers = await asyncio.gather(*(self._ask(s) for s in self._sentinels))
        counts = [count for count in answers if count is not None]
        if not counts:
            return
        needed = max(self._minimum, *counts)
        if needed != self._needed:
            log.info("accepts now wait for %d replicas (were %d)", needed, self._needed)
        self._needed = needed

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._poll_s)

    async def _ask(self, sentinel: Any) -> int | None:
        try:
            call = sentinel.sentinel_slaves(self._master_name)
            return promotable_replicas(await asyncio.wait_for(call, ASK_TIMEOUT_S))
        except Exception as exc:  # one Sentinel away is an answer missing, not a failure
            log.debug("Sentinel did not list the replicas: %s", exc)
            return None
