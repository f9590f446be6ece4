"""How many replicas an accept's WAIT asks for under Sentinel (no Sentinel asked here)."""

from __future__ import annotations

from smtpfleet.queue.replica_watch import IDLE_GRACE_S, ReplicaWatch
from smtpfleet.queue.topology import ReplicaState


def _watch() -> ReplicaWatch:
    return ReplicaWatch([], "smtpfleet", minimum=1)


def test_every_promotable_replica_counts_and_one_following_no_primary_only_for_a_grace() -> None:
    watch = _watch()
    states = [
        ReplicaState("a", promotable=True, replicating=True),
        ReplicaState("b", promotable=True, replicating=False),  # the old primary, say
        ReplicaState("c", promotable=False, replicating=True),
    ]
    assert watch._count(states, now=100.0) == 2  # the switch: every replica looks idle a moment
    assert watch._count(states, now=100.0 + IDLE_GRACE_S / 2) == 2
    assert watch._count(states, now=100.0 + IDLE_GRACE_S) == 1  # it follows no primary


def test_a_replica_that_follows_a_primary_again_counts_at_once() -> None:
    watch = _watch()
    idle = [ReplicaState("b", promotable=True, replicating=False)]
    assert watch._count(idle, now=0.0) == 1
    assert watch._count(idle, now=10.0) == 0
    back = [ReplicaState("b", promotable=True, replicating=True)]
    assert watch._count(back, now=11.0) == 1
    assert watch._count(idle, now=11.5) == 1  # its grace starts over
