"""Redis under Sentinel (issue #10): the primary goes away under load; what does a 250 survive?

Both drills run the cluster on a Sentinel set (a primary, two replicas, three Sentinels on
loopback, `smtpfleet.testing.sentinel`). `redis-failover` forces a coordinated switch
(`SENTINEL FAILOVER`); `redis-primary-kill` SIGKILLs the primary and brings it back later as a
replica. Each reports the acknowledged messages lost, the duplicates, the window in which
senders were refused (451) and the time until the fleet accepts again. Run them once per
`queue.durability` (`smtpfleet drill redis-failover --durability server`): only `replicated`
promises that no acknowledged message is lost, so only there is `lost` an objective.
"""

from __future__ import annotations

import asyncio

from smtpfleet.drills.context import DrillContext, Scenario
from smtpfleet.testing.sentinel import MASTER_NAME, SentinelSet

# The primary is gone for a second or two: senders may see 451 meanwhile, never 5xx; the
# fleet takes mail again within 15 s of the primary's death; no live node is declared dead
# and robbed of its deliveries because Redis was away. Duplicates are reported, not bounded:
# what is in flight includes deliveries whose acknowledgement went to the old primary (after
# a forced promotion, or not yet replicated when it died), which no sample of the backlog
# sees. Measured: 1-2 per forced failover at half of peak (docs/drills.md).
OBJECTIVES = {
    "lost": 0,
    "client_5xx": 0,
    "accept_rto_s": 15,
    "detection_s": 10,
    "takeovers": 0,
    "live_declared_dead": 0,
}
# At least one replica confirms each write; in fact each node waits for every replica the
# Sentinels could promote (queue/replica_watch.py): WAIT 1 of two lost confirmed writes.
REPLICATED = {"queue": {"durability": "replicated", "replicas": 1, "durability_timeout_ms": 2000}}


def _set(ctx: DrillContext) -> SentinelSet:
    assert ctx.sentinels is not None, "a Redis HA drill runs on a Sentinel set"
    return ctx.sentinels


async def _primary_port(ctx: DrillContext) -> int | None:
    return await asyncio.to_thread(_set(ctx).master_port)


async def _force_failover(ctx: DrillContext) -> None:
    ctx.notes["old_primary"] = await _primary_port(ctx)
    sentinel = _set(ctx).sentinels[0]
    await asyncio.to_thread(sentinel.command, "SENTINEL", "FAILOVER", MASTER_NAME)


async def _kill_primary(ctx: DrillContext) -> None:
    port = await _primary_port(ctx)
    assert port is not None, "no primary to kill"
    ctx.notes["old_primary"] = port
    await asyncio.to_thread(_set(ctx).server_on(port).kill)


async def _restart_old_primary(ctx: DrillContext) -> None:
    """The killed server comes back; the Sentinels turn it into a replica of the new primary."""
    port = ctx.notes["old_primary"]
    assert isinstance(port, int)
    await asyncio.to_thread(_set(ctx).server_on(port).start)


async def _promoted(ctx: DrillContext) -> bool:
    """The Sentinels name a new primary."""
    port = await _primary_port(ctx)
    return port is not None and port != ctx.notes.get("old_primary")


REDIS_HA_SCENARIOS = [
    Scenario(
        "redis-failover",
        "a forced Sentinel failover under load: senders see 451 at worst, the fleet follows the "
        "new primary, and (durability replicated) no acknowledged message is lost",
        inject=_force_failover,
        detected=_promoted,
        objectives=OBJECTIVES,
        overrides=REPLICATED,
        sentinel=True,
        lossless_only_when_replicated=True,
    ),
    Scenario(
        "redis-primary-kill",
        "SIGKILL of the Redis primary under Sentinel: a replica is promoted, the fleet accepts "
        "again within 15 s, and (durability replicated) no acknowledged message is lost",
        inject=_kill_primary,
        heal=_restart_old_primary,
        detected=_promoted,
        objectives=OBJECTIVES,
        overrides=REPLICATED,
        sentinel=True,
        lossless_only_when_replicated=True,
    ),
]
