"""Property tests of the hash ring (DESIGN invariant 5)."""

from __future__ import annotations

import collections

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpfleet.config import RelayConfig, RoutingKey
from smtpfleet.envelope import QueuedMessage
from smtpfleet.relays.ring import Ring, routing_key


def relays(n: int, priority: int = 10, weights: list[int] | None = None) -> list[RelayConfig]:
    return [
        RelayConfig(
            name=f"r{priority}-{i}",
            host="127.0.0.1",
            priority=priority,
            weight=(weights or [1] * n)[i],
        )
        for i in range(n)
    ]


KEYS = [f"domain{i}.example" for i in range(5000)]


@given(st.integers(min_value=2, max_value=8), st.integers(min_value=0, max_value=7))
@settings(max_examples=20, deadline=None)
def test_same_healthy_set_same_choice_and_removal_moves_only_its_keys(n: int, drop: int) -> None:
    pool = relays(n)
    names = {r.name for r in pool}
    node_a, node_b = Ring(pool), Ring(list(reversed(pool)))  # config order must not matter
    before = {k: node_a.order(k, names)[0].name for k in KEYS}
    assert before == {k: node_b.order(k, names)[0].name for k in KEYS}
    gone = pool[drop % n].name
    after = {k: node_a.order(k, names - {gone})[0].name for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(before[k] == gone for k in moved)  # only the removed relay's keys move
    assert gone not in after.values()
    share = len(moved) / len(KEYS)
    assert abs(share - 1 / n) < 0.6 / n  # about 1/N of the keys


def test_weights_are_respected() -> None:
    pool = relays(3, weights=[1, 2, 5])
    ring = Ring(pool)
    firsts = collections.Counter(ring.order(k, {r.name for r in pool})[0].name for k in KEYS)
    shares = {name: count / len(KEYS) for name, count in firsts.items()}
    for relay, expected in zip(pool, [1 / 8, 2 / 8, 5 / 8], strict=True):
        assert abs(shares[relay.name] - expected) < 0.06


def test_bounded_load_passes_keys_on_from_an_overloaded_relay() -> None:
    pool = relays(4)
    names = {r.name for r in pool}
    ring = Ring(pool, load_factor=1.25)
    load: collections.Counter[str] = collections.Counter()
    for key in ["hot.example"] * 400:  # one hot domain
        load[ring.order(key, names, load)[0].name] += 1
    fair = 400 / 4
    assert max(load.values()) <= 1.25 * fair + 1
    assert len(load) == 4


def test_lower_tier_first_and_failover_and_failback() -> None:
    active, standby = relays(2, 10), relays(1, 20)
    ring = Ring(active + standby)
    everyone = {r.name for r in active + standby}
    order = [r.name for r in ring.order("k.example", everyone)]
    assert set(order[:2]) == {"r10-0", "r10-1"}
    assert order[2] == "r20-0"
    assert [r.name for r in ring.order("k.example", {"r20-0"})] == ["r20-0"]  # failover
    assert ring.order("k.example", everyone)[0].priority == 10  # failback
    assert ring.order("k.example", set()) == []  # nothing healthy: nothing to try


def test_warm_percent_sends_a_stable_small_share_to_standby() -> None:
    active, standby = relays(2, 10), relays(1, 20)
    ring = Ring(active + standby, warm_percent=5)
    everyone = {r.name for r in active + standby}
    warm = [k for k in KEYS if ring.order(k, everyone)[0].priority == 20]
    assert 0.03 < len(warm) / len(KEYS) < 0.07
    assert warm == [k for k in KEYS if ring.order(k, everyone)[0].priority == 20]


def test_routing_keys() -> None:
    message = QueuedMessage("1.X", "a@Sender.example", ("b@Rcpt.example", "c@o.example"), 0)
    assert routing_key(message, RoutingKey.RECIPIENT_DOMAIN) == "rcpt.example"
    assert routing_key(message, RoutingKey.SENDER_DOMAIN) == "sender.example"
    assert routing_key(message, RoutingKey.MESSAGE_ID) == "1.X"


def _labelled(name: str, region: str, provider: str, priority: int = 10) -> RelayConfig:
    return RelayConfig(name=name, host="h", region=region, provider=provider, priority=priority)


LABELLED = [
    _labelled("eu-a1", "eu", "a"),
    _labelled("eu-a2", "eu", "a"),
    _labelled("eu-a3", "eu", "a"),
    _labelled("eu-b1", "eu", "b"),
    _labelled("us-a1", "us", "a"),
    _labelled("us-c1", "us", "c"),
]
LABELLED_NAMES = {r.name for r in LABELLED}


def test_the_nodes_region_comes_first_and_other_regions_follow() -> None:
    ring = Ring(LABELLED, region="eu")
    for key in KEYS[:200]:
        regions = [r.region for r in ring.order(key, LABELLED_NAMES)]
        assert regions == ["eu"] * 4 + ["us"] * 2
        assert ring.order(key, {"us-a1", "us-c1"})[0].region == "us"  # failover across regions


@given(st.sampled_from(KEYS), st.sets(st.sampled_from(sorted(LABELLED_NAMES)), min_size=1))
@settings(max_examples=200, deadline=None)
def test_the_fallback_is_on_another_provider_whenever_one_is_healthy(
    key: str, healthy: set[str]
) -> None:
    order = Ring(LABELLED, region="eu").order(key, healthy)
    first, rest = order[0], order[1:]
    same_region = [r for r in rest if r.region == first.region]
    if any(r.provider != first.provider for r in same_region):
        assert same_region[0].provider != first.provider
    plain = [r.name for r in Ring(LABELLED).order(key, healthy)]
    assert sorted(plain) == sorted(r.name for r in order)


@given(st.sampled_from(sorted(LABELLED_NAMES)))
@settings(max_examples=6, deadline=None)
def test_with_labels_an_evicted_relay_moves_only_its_keys(gone: str) -> None:
    ring = Ring(LABELLED, region="eu")
    before = {k: ring.order(k, LABELLED_NAMES)[0].name for k in KEYS[:2000]}
    after = {k: ring.order(k, LABELLED_NAMES - {gone})[0].name for k in KEYS[:2000]}
    assert all(before[k] == gone for k in before if before[k] != after[k])
