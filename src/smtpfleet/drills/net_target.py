"""The network drills against a running cluster: what the drill can see from outside.

On a cluster it built, a network drill reads node-1's log, its /readyz and its own relay view.
A target's drill knows only the endpoints, Redis, the recording relays and (optionally) the
nodes' /metrics, and not which endpoint the target's command cut off. So it judges the same
objectives from those:

- net-redis-cut: detection is a member leaving the member set (its heartbeat stopped and a
  survivor took its work over); before the heal every SMTP endpoint gets one message on the
  wire, and one of them must answer 4xx (the fenced node); takeovers from /metrics.
- net-relay-cut: detection is a node's view in Redis saying the target's `relay` is down;
  before the heal, no node's cluster verdict may evict it (/metrics, or a majority of the
  views in Redis without them), and the first sink (the recording relay behind `relay`)
  must still receive mail. The heal waits (up to 5 s) for a view to say down first, as the
  cluster-built drill waits for the cut-off node's 451.
- net-redis-slow, net-partition: their objectives need nothing but the load and the sinks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from smtpfleet.drills.context import DrillContext, Probe, Step
from smtpfleet.drills.remote import fetch
from smtpfleet.testing.client import send

__all__ = ["OnTarget", "a_member_left", "net_on_target", "remember_members"]

PROBE_TIMEOUT_S = 10.0
VIEW_WAIT_S = 5.0


@dataclass(frozen=True)
class OnTarget:
    """How a network scenario runs through a target's commands: its probe, the steps around
    the commands, and its floors (None: the scenario's own)."""

    detected: Probe | None = None
    before_inject: Step | None = None
    before_heal: Step | None = None
    floors: Mapping[str, float] | None = None
    notes: dict[str, str] = field(default_factory=dict)


def net_on_target(name: str, relay: str, *, has_metrics: bool) -> OnTarget | None:
    if name == "net-redis-cut":
        floors = {"cut_node_4xx": 1.0, **({"takeovers": 1.0} if has_metrics else {})}
        return OnTarget(a_member_left, before_heal=_probe_endpoints, floors=floors)
    if name == "net-relay-cut":
        return OnTarget(
            _a_view_says_down(relay),
            before_inject=_count_first_sink,
            before_heal=_relay_verdicts(relay),
            floors={"cut_node_sees_relay_down": 1.0, "relay_deliveries_in_fault": 1.0},
        )
    return None


def _measure(ctx: DrillContext, name: str, value: float) -> None:
    measures = ctx.notes.setdefault("measures", {})
    assert isinstance(measures, dict)
    measures[name] = value


async def remember_members(ctx: DrillContext) -> None:
    if "members_before" not in ctx.notes:
        ctx.notes["members_before"] = int(await ctx.redis.zcard(ctx.keys.nodes()))


async def a_member_left(ctx: DrillContext) -> bool:
    before = ctx.notes.get("members_before")
    return isinstance(before, int) and int(await ctx.redis.zcard(ctx.keys.nodes())) < before


async def _members(ctx: DrillContext) -> list[str]:
    members = await ctx.redis.zrange(ctx.keys.nodes(), 0, -1)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in members]


async def _probe_endpoints(ctx: DrillContext) -> None:
    """One message to every endpoint on its own (no next MX): the node cut off from Redis
    must answer 4xx, whichever it is."""
    replies = await asyncio.gather(
        *(send(endpoint, timeout_s=PROBE_TIMEOUT_S) for endpoint in ctx.smtp_targets)
    )
    codes = [reply.code for reply in replies]
    refused = [code for code in codes if 400 <= code < 500]
    _measure(ctx, "cut_node_reply", refused[0] if refused else codes[-1])
    _measure(ctx, "cut_node_4xx", int(bool(refused)))


async def _count_first_sink(ctx: DrillContext) -> None:
    await ctx.refresh()
    ctx.notes["fault_start_count"] = ctx.sinks[0].count


def _a_view_says_down(relay: str) -> Probe:
    async def probe(ctx: DrillContext) -> bool:
        return await _views_down(ctx, relay) > 0

    return probe


async def _views_down(ctx: DrillContext, relay: str) -> int:
    states = [await ctx.redis.hget(ctx.keys.view(n), relay) for n in await _members(ctx)]
    return sum(1 for s in states if s is not None and s[:1] == b"0")


def _relay_verdicts(relay: str) -> Step:
    async def step(ctx: DrillContext) -> None:
        down = await _wait_views_down(ctx, relay)
        _measure(ctx, "cut_node_sees_relay_down", int(down > 0))
        _measure(ctx, "nodes_evicting_relay", await _evicting(ctx, relay, down))
        await ctx.refresh()
        start = ctx.notes.get("fault_start_count")
        if isinstance(start, int):
            _measure(ctx, "relay_deliveries_in_fault", ctx.sinks[0].count - start)

    return step


async def _wait_views_down(ctx: DrillContext, relay: str) -> int:
    """Views saying `relay` is down, once one does (or after VIEW_WAIT_S): the health checks
    need fall x interval plus a timeout to see a cut, which a short fault may not outlast."""
    deadline = time.monotonic() + VIEW_WAIT_S
    while True:
        down = await _views_down(ctx, relay)
        if down or time.monotonic() >= deadline:
            return down
        await asyncio.sleep(0.1)


async def _evicting(ctx: DrillContext, relay: str, views_down: int) -> int:
    """Nodes whose cluster verdict evicts `relay`: from their /metrics when the target names
    them, else 1 when a majority of the members' views in Redis say down (the quorum)."""
    urls = ctx.remote.metrics_urls if ctx.remote is not None else ()
    if not urls:
        return int(views_down > len(await _members(ctx)) / 2)
    pages = await asyncio.gather(
        *(asyncio.to_thread(fetch, u) for u in urls), return_exceptions=True
    )
    evicted = f'relay="{relay}",view="cluster"}} 0.0'.encode()
    return sum(1 for page in pages if isinstance(page, bytes) and evicted in page)
