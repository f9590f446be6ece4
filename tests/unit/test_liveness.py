"""The liveness, fencing and takeover-guard rules, on plain values."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpfleet.cluster.liveness import (
    live_nodes,
    may_judge_peers,
    must_fence,
    next_beat_delay_s,
    takeover_guard_ms,
    view_shows_own_beat,
)


def test_a_node_is_live_until_its_heartbeat_is_a_lease_old() -> None:
    beats = {"a": 10_000, "b": 5_001, "c": 5_000}
    assert live_nodes(beats, now_ms=10_000, lease_s=5.0) == {"a", "b"}


@given(
    lease_s=st.floats(min_value=0.2, max_value=60),
    ratio=st.floats(min_value=0.01, max_value=0.5),
    silent_s=st.floats(min_value=0, max_value=120),
)
def test_a_node_fences_itself_before_anyone_may_declare_it_dead(
    lease_s: float, ratio: float, silent_s: float
) -> None:
    interval_s = lease_s * ratio  # config: lease_s >= 2 * heartbeat_interval_s
    fenced = must_fence(silent_s, lease_s=lease_s, heartbeat_interval_s=interval_s)
    if silent_s >= lease_s:  # others may have declared it dead by now
        assert fenced
    if silent_s < lease_s - interval_s:
        assert not fenced


def test_the_takeover_guard_spans_two_heartbeats() -> None:
    assert takeover_guard_ms(0.2) == 400


@given(
    interval_s=st.floats(min_value=0.01, max_value=10),
    took_s=st.floats(min_value=0, max_value=100),
)
def test_beats_start_every_interval_whatever_a_write_took(interval_s: float, took_s: float) -> None:
    delay = next_beat_delay_s(100.0, 100.0 + took_s, interval_s)
    assert delay >= 0
    assert took_s + delay == pytest.approx(max(interval_s, took_s))


def test_a_node_whose_own_beat_is_overdue_judges_no_peer() -> None:
    assert may_judge_peers(0.0, 10.0, 5.0)
    assert not may_judge_peers(0.0, 10.0, 5.0, fenced=True)
    assert not may_judge_peers(6.0, 10.0, 5.0)
    assert not may_judge_peers(None, 10.0, 5.0)


def test_a_view_must_show_our_last_acknowledged_beat() -> None:
    assert view_shows_own_beat(None, None)  # nothing acknowledged yet
    assert view_shows_own_beat(1_000, 1_000)
    assert view_shows_own_beat(1_500, 1_000)  # a later beat landed meanwhile
    assert not view_shows_own_beat(500, 1_000)  # lost without an error
    assert not view_shows_own_beat(None, 1_000)  # lost, or removed by a peer
