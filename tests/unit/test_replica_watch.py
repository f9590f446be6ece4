"""How many replicas an accept's WAIT asks for under Sentinel (no Sentinel asked here)."""

from __future__ import annotations

from smtpfleet.queue.replica_watch import IDLE_GRACE_S, ReplicaWatch, merged
from smtpfleet.queue.topology import ReplicaState


def _watch() -> ReplicaWatch:
    return ReplicaWatch([], "smtpfleet", minimum=1)


def _replica(address: str, *, in_sync: bool, promotable: bool = True) -> ReplicaState:
    return ReplicaState(address, promotable=promotable, in_sync=in_sync, priority=100)


def test_an_out_of_sync_replica_counts_only_for_a_grace() -> None:
    watch = _watch()
    states = [
        _replica("a", in_sync=True),
        _replica("b", in_sync=False),  # the old primary after a forced failover, say
        _replica("c", in_sync=True, promotable=False),
    ]
    assert watch._count(states, now=100.0) == 2  # the switch: replicas look out of sync a moment
    assert watch._count(states, now=100.0 + IDLE_GRACE_S / 2) == 2
    assert watch._count(states, now=100.0 + IDLE_GRACE_S) == 1  # syncing: it cannot confirm yet


def test_a_replica_back_in_sync_counts_at_once_and_its_grace_starts_over() -> None:
    watch = _watch()
    out = [_replica("a", in_sync=True), _replica("b", in_sync=False)]
    assert watch._count(out, now=0.0) == 2
    assert watch._count(out, now=10.0) == 1
    back = [_replica("a", in_sync=True), _replica("b", in_sync=True)]
    assert watch._count(back, now=11.0) == 2
    assert watch._count(out, now=11.5) == 2


def test_sentinels_that_differ_on_a_replica_give_the_stricter_reading() -> None:
    first = [_replica("a", in_sync=True), _replica("b", in_sync=False)]
    second = [_replica("a", in_sync=False), _replica("b", in_sync=False, promotable=False)]
    by_address = {s.address: s for s in merged([first, second])}
    assert by_address["a"].in_sync  # one saw it in sync: it must confirm
    assert by_address["b"].promotable  # one would promote it
    assert not by_address["b"].in_sync
