from __future__ import annotations

import collections

from smtpfleet.config import RelayConfig
from smtpfleet.relays.pool import RelayPool


def relay(name: str, priority: int = 10, weight: int = 1) -> RelayConfig:
    return RelayConfig(name=name, host="127.0.0.1", port=25, priority=priority, weight=weight)


def test_every_relay_once_lower_tier_first() -> None:
    pool = RelayPool([relay("standby", 20), relay("a"), relay("b")])
    for _ in range(4):
        order = [r.name for r in pool.order()]
        assert sorted(order[:2]) == ["a", "b"]
        assert order[2] == "standby"


def test_first_choice_rotates_within_a_tier_by_weight() -> None:
    pool = RelayPool([relay("a", weight=3), relay("b", weight=1)])
    firsts = collections.Counter(pool.order()[0].name for _ in range(400))
    assert firsts == {"a": 300, "b": 100}


def test_empty_pool_orders_nothing() -> None:
    assert RelayPool([]).order() == []
