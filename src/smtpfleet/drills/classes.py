"""Traffic classes under a backlog (issue #14): `class-priority`.

Both relays go away; while they are down a burst of bulk mail (sender domain
`news.loadgen.example`, the `bulk` class) piles up beside the drill's steady load (the
`transactional` class). The relays come back with a shared rate limit that the backlog
saturates. Transactional mail, queued during the outage or sent after the heal, must be
delivered within seconds of the heal while the bulk drains behind it; nothing is lost.

Measures (in the report beside the runner's own):
- transactional_wait_after_heal_s: the slowest transactional message, from the heal (or its
  send, when later) to its first delivery.
- bulk_ahead_pct: the share of the bulk delivered before 90 % of the transactional mail queued
  during the outage had arrived: low means the transactional mail went first. (Not the last
  one: a message whose attempt met the relays going down waits out its retry backoff, up to
  `retry.max_s`, and would judge priority by one straggler.)
- bulk_accepted, bulk_lost, bulk_drain_s (heal to the last bulk delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from typing import Any

from smtpfleet.drills.context import DrillContext, Scenario
from smtpfleet.loadgen.messages import RECIPIENT, message_bytes, tag_of
from smtpfleet.loadgen.paced import Sent
from smtpfleet.testing.client import eventually, send
from smtpfleet.testing.sink import ReceivedMessage, Sink

__all__ = ["CLASS_SCENARIOS"]

BULK_SENDER = "news@news.loadgen.example"
BULK_MESSAGES = 400
BULK_SENDERS = 24  # sessions at once while the backlog is written
RELAY_RATE = 60  # messages per second per relay, cluster-wide: the backlog saturates it
# The drill's steady load is the transactional mail: a twelfth of what the two relays may take,
# so that what the heal proves is priority, not capacity (at 20/s the outage's transactional
# backlog alone needed 5-6 s of the relays' budget, bulk or no bulk).
TRANSACTIONAL_RATE = 10.0
DOWN_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 30.0

CLASSES: dict[str, Any] = {
    "queue": {
        "classes": [
            {"name": "transactional"},
            {"name": "bulk", "sender_domains": ["news.loadgen.example"]},
        ],
    },
    # A mapping under `relays` applies to every relay of the drill's cluster (localcluster).
    "relays": {"max_messages_per_s": RELAY_RATE},
}


def _sinks(ctx: DrillContext) -> list[Sink]:
    return ctx.cluster.sink_servers


async def _all_views_down(ctx: DrillContext) -> bool:
    names = [s.name for s in _sinks(ctx)]
    for node in ctx.cluster.node_processes:
        if not node.running:
            continue
        states = [await ctx.redis.hget(ctx.keys.view(f"node-{node.index}"), n) for n in names]
        if not all(s is not None and s[:1] == b"0" for s in states):
            return False
    return True


async def _outage_with_bulk_backlog(ctx: DrillContext) -> None:
    """Both relays stop; once every node sees them down, the bulk burst is queued."""
    ctx.notes["relay_ports"] = [s.port for s in _sinks(ctx)]
    for sink in _sinks(ctx):
        await sink.stop()
    with contextlib.suppress(TimeoutError):  # the burst goes out anyway, into retries
        await eventually(lambda: _all_views_down(ctx), timeout_s=DOWN_TIMEOUT_S, interval_s=0.1)
    ctx.notes["bulk_tags"] = await _send_bulk(ctx.smtp_targets, f"bulk-{id(ctx):x}")


async def _send_bulk(targets: Sequence[tuple[str, int]], run: str) -> list[str]:
    """The backlog: BULK_MESSAGES tagged messages from the bulk sender; the accepted tags."""
    gate = asyncio.Semaphore(BULK_SENDERS)

    async def one(n: int) -> str | None:
        tag = f"{run}-{n}"
        async with gate:
            reply = await send(
                targets[n % len(targets)],
                sender=BULK_SENDER,
                recipients=[RECIPIENT],
                data=message_bytes(tag, 2048)[: -len(b".\r\n")],
            )
        return tag if reply.code == 250 else None

    return [t for t in await asyncio.gather(*(one(n) for n in range(BULK_MESSAGES))) if t]


async def _heal_and_watch(ctx: DrillContext) -> None:
    """The relays come back on their ports (one record of deliveries each); a task measures
    the drain, and the runner awaits it once the load has settled."""
    ports = ctx.notes["relay_ports"]
    assert isinstance(ports, list)
    for i, port in enumerate(ports):
        old = _sinks(ctx)[i]
        fresh = Sink(port=port, name=old.name, pipelining=old.pipelining)
        await fresh.start()
        fresh.messages, fresh.accepted = old.messages, old.accepted
        ctx.cluster.sink_servers[i] = fresh
    healed_at = time.monotonic()
    inject_at = ctx.notes.get("inject_at", healed_at)
    assert isinstance(inject_at, float)
    tasks = ctx.notes.setdefault("command_tasks", [])
    assert isinstance(tasks, list)
    tasks.append(asyncio.create_task(_measure(ctx, inject_at, healed_at)))


async def _measure(ctx: DrillContext, inject_at: float, healed_at: float) -> None:
    tags = ctx.notes.get("bulk_tags") or []
    assert isinstance(tags, list)
    bulk = set(tags)
    with contextlib.suppress(TimeoutError):  # what never arrived is counted as bulk_lost
        await eventually(
            lambda: bulk <= set(_arrivals(ctx, bulk)), timeout_s=DRAIN_TIMEOUT_S, interval_s=0.1
        )
    sent = ctx.notes.get("sent") or []
    assert isinstance(sent, list)
    measures = ctx.notes.setdefault("measures", {})
    assert isinstance(measures, dict)
    measures.update(class_measures(_messages(ctx), bulk, sent, inject_at, healed_at))


def _messages(ctx: DrillContext) -> list[ReceivedMessage]:
    return [m for sink in _sinks(ctx) for m in sink.messages]


def _arrivals(ctx: DrillContext, tags: set[str]) -> dict[str, float]:
    return _first_arrival(_messages(ctx), tags)


def _first_arrival(messages: Sequence[ReceivedMessage], tags: set[str]) -> dict[str, float]:
    first: dict[str, float] = {}
    for message in messages:
        tag = tag_of(message.data)
        if tag in tags and message.sender:
            first[tag] = min(first.get(tag, message.at), message.at)
    return first


def class_measures(
    messages: Sequence[ReceivedMessage],
    bulk: set[str],
    sent: Sequence[Sent],
    inject_at: float,
    healed_at: float,
) -> dict[str, float | int | None]:
    """The drill's verdict figures from what the relays received and what the load sent."""
    urgent = [s for s in sent if s.code == 250 and s.at >= inject_at]
    arrived = _first_arrival(messages, bulk | {s.tag for s in urgent})
    waits = [arrived[s.tag] - max(s.at, healed_at) for s in urgent if s.tag in arrived]
    backlog = [arrived[s.tag] for s in urgent if s.at < healed_at and s.tag in arrived]
    bulk_times = sorted(arrived[t] for t in bulk if t in arrived)
    ahead = None
    if backlog and bulk:
        most = sorted(backlog)[math.ceil(0.9 * len(backlog)) - 1]
        ahead = round(100 * sum(1 for t in bulk_times if t < most) / len(bulk), 1)
    return {
        "bulk_accepted": len(bulk),
        "bulk_lost": len(bulk) - len(bulk_times),
        "bulk_drain_s": round(bulk_times[-1] - healed_at, 2) if bulk_times else None,
        "bulk_ahead_pct": ahead,
        "transactional_wait_after_heal_s": round(max(waits), 2) if waits else None,
        "transactional_backlog": len(backlog),
    }


async def _note_inject(ctx: DrillContext) -> None:
    ctx.notes["inject_at"] = time.monotonic()
    await _outage_with_bulk_backlog(ctx)


CLASS_SCENARIOS = [
    Scenario(
        "class-priority",
        "a bulk backlog built during a relay outage drains behind transactional mail, which is "
        "delivered within seconds of the heal, under the relays' shared rate limit",
        inject=_note_inject,
        heal=_heal_and_watch,
        objectives={
            "lost": 0,
            "client_5xx": 0,
            "client_errors": 0,
            "duplicates": 0,
            "bulk_lost": 0,
            "transactional_wait_after_heal_s": 5.0,
            # Bulk's floor and what was in flight go ahead (2-16 % seen); alike: about half.
            "bulk_ahead_pct": 30,
        },
        floors={"bulk_accepted": BULK_MESSAGES * 0.9},  # the backlog really was there
        overrides=CLASSES,
        rate=TRANSACTIONAL_RATE,
    )
]
