"""Who is alive, when a node must fence itself, and how takeover avoids double claims. Pure.

Every node heartbeats each `heartbeat_interval_s`. A node whose last heartbeat is `lease_s` old
is dead (for membership and for `smtpfleet status` alike). A node that has not reached Redis
for one interval less than that stops starting deliveries, so it is fenced before anyone may
take its work (DESIGN invariant 4).
"""

from __future__ import annotations

from collections.abc import Mapping


def live_nodes(heartbeats: Mapping[str, int], *, now_ms: int, lease_s: float) -> set[str]:
    """The nodes whose last heartbeat (ms) is younger than the lease."""
    lease_ms = lease_s * 1000
    return {node for node, beat in heartbeats.items() if now_ms - beat < lease_ms}


def must_fence(silent_s: float, *, lease_s: float, heartbeat_interval_s: float) -> bool:
    """Others declare us dead `lease_s` after our last heartbeat; stop one interval sooner.

    `silent_s` counts from the start of the last heartbeat Redis acknowledged (peers date a
    beat by the time written in it), whether the writes since failed, hang, or were never
    started because the node stalled: a beat that is late without an error looks just as
    old to the peers.
    """
    return silent_s >= lease_s - heartbeat_interval_s


def next_beat_delay_s(started: float, now: float, heartbeat_interval_s: float) -> float:
    """How long to wait before the next beat, so beats start every interval whatever one
    write took (a slow write shortens the pause instead of adding to it)."""
    return max(0.0, heartbeat_interval_s - (now - started))


def takeover_guard_ms(heartbeat_interval_s: float) -> int:
    """The min-idle of a takeover claim: a claim resets an entry's idle time, so of several
    survivors racing for one entry within this window, exactly one gets it."""
    return int(2 * heartbeat_interval_s * 1000)


def may_judge_peers(
    in_contact_since: float | None, now: float, lease_s: float, *, fenced: bool = False
) -> bool:
    """Whether peers' heartbeats say anything yet: only after a whole lease of contact, and
    not while our own beats are overdue.

    While Redis was away (a failover, a partition) nobody's heartbeat landed; judging peers
    the moment we are back would declare every live node dead and take over its work. A node
    whose own beat is overdue (fenced) may be slowed by what slows its peers' beats too.
    """
    return not fenced and in_contact_since is not None and now - in_contact_since >= lease_s


def view_shows_own_beat(own_beat_in_view: int | None, last_acked_ms: int | None) -> bool:
    """Whether a read of the members shows the last beat Redis acknowledged to us before the
    read was sent. It must, unless writes were lost without an error: acknowledged by a
    primary that was then replaced, or by a killed one that came back believing it still was
    one. Peers' beats in such a view may be stale in the same way, so it judges no one."""
    if last_acked_ms is None:
        return True
    return own_beat_in_view is not None and own_beat_in_view >= last_acked_ms
