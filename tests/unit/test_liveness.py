"""The liveness, fencing and takeover-guard rules, on plain values."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from smtpfleet.cluster.liveness import live_nodes, must_fence, takeover_guard_ms


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
