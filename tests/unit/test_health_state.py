from __future__ import annotations

from smtpfleet.config import HealthConfig
from smtpfleet.health.state import PassiveEjector, RiseFall, cluster_verdict, healthy_set


def test_rise_and_fall_need_consecutive_results() -> None:
    state = RiseFall(fall=2, rise=3)
    assert not state.observe(False)
    assert not state.observe(True)  # the streak is broken
    assert not state.observe(False)
    assert state.observe(False)  # two in a row: down
    assert not state.up
    assert not state.observe(True)
    assert not state.observe(True)
    assert state.observe(True)  # three in a row: up
    assert state.up


def test_passive_ejection_grows_on_repeat_and_expires() -> None:
    config = HealthConfig(passive_failures=2, ejection_s=10, max_ejection_s=300)
    ejector = PassiveEjector(config, {"a": 10, "b": 10})
    assert not ejector.failure("a", 0.0)
    assert ejector.failure("a", 0.0)
    assert ejector.ejected("a", 9.9)
    assert not ejector.ejected("a", 10.1)
    ejector.failure("a", 11.0)
    assert ejector.failure("a", 11.0)  # second ejection: twice as long
    assert ejector.ejected("a", 30.9)
    assert not ejector.ejected("a", 31.1)


def test_success_resets_the_failure_streak() -> None:
    ejector = PassiveEjector(HealthConfig(passive_failures=2), {"a": 10, "b": 10})
    ejector.failure("a", 0.0)
    ejector.success("a", 0.0)
    assert not ejector.failure("a", 0.0)


def test_never_more_than_the_allowed_share_of_a_tier_is_ejected() -> None:
    config = HealthConfig(passive_failures=1, max_ejection_percent=50)
    ejector = PassiveEjector(config, {"a": 10, "b": 10, "standby": 20})
    assert ejector.failure("a", 0.0)
    assert not ejector.failure("b", 0.0)  # half of tier 10 is out already
    assert not ejector.failure("standby", 0.0)  # a tier of one: 50% of 1 rounds down to 0


def test_quorum_of_live_nodes_decides() -> None:
    views = {
        "n1": {"r1": False, "r2": True},
        "n2": {"r1": True, "r2": False},
        "n3": {"r1": True, "r2": False},
        "gone": {"r1": False},
    }
    verdict = cluster_verdict(["r1", "r2", "r3"], views, ["n1", "n2", "n3"])
    assert verdict == {"r1": True, "r2": False, "r3": True}
    # The node with the bad link still avoids r1 itself.
    assert healthy_set(verdict, views["n1"]) == {"r3"}
    assert healthy_set(verdict, views["n2"]) == {"r1", "r3"}


def test_a_lone_node_decides_for_itself() -> None:
    assert cluster_verdict(["r1"], {"n1": {"r1": False}}, ["n1"]) == {"r1": False}


def test_a_node_without_the_relay_does_not_vote_on_it() -> None:
    # n1 has r1 and r2 and sees r2 down; n2 has only r1. r2's electorate is n1 alone.
    views = {"n1": {"r1": True, "r2": False}, "n2": {"r1": True}}

    assert cluster_verdict(["r1", "r2"], views, ["n1", "n2"]) == {"r1": True, "r2": False}


def test_a_node_without_the_relay_does_not_keep_it_up_or_take_it_down() -> None:
    # Three nodes: n3 lacks r2. n1 sees it down, n2 up: one of two is no majority.
    views = {"n1": {"r2": False}, "n2": {"r2": True}, "n3": {"r1": True}}
    assert cluster_verdict(["r2"], views, ["n1", "n2", "n3"]) == {"r2": True}
    # Both that have it see it down: down, whatever n3 would have said.
    views["n2"]["r2"] = False
    assert cluster_verdict(["r2"], views, ["n1", "n2", "n3"]) == {"r2": False}


def test_a_live_node_without_a_view_yet_still_counts() -> None:
    views = {"n1": {"r1": False}}

    assert cluster_verdict(["r1"], views, ["n1", "n2"]) == {"r1": True}
