"""Consistent hashing with bounded load over the healthy relays, tier by tier. Pure.

Every node builds the same ring from the same relay list, so with the same healthy set a key
maps to the same relay everywhere (DESIGN invariant 5), and taking one relay out moves only
the keys it held: their walk round the ring simply passes it by.

Tiers work like MX preference: the lowest tier with a healthy relay carries the traffic
(active-active inside it); higher tiers only follow as fallbacks, unless `warm_percent` sends
a small, stable share of keys to the next tier first to keep it warm.

Regions and providers: with `region` (the node's), the relays of that region come first and
every other region is a further set of tiers after them. Inside a tier, a key's fallbacks are
spread over providers: after a relay of provider A, the next one tried is on another provider
whenever the tier has one healthy (relays of one cloud tend to fail together). The first choice
is never changed by the spread, so evicting a relay still moves only its keys.

Bounded load (Mirrokni, Thorup, Zadimoghaddam 2018): a relay already carrying more than
`load_factor` times its weighted fair share passes the key to the next relay in the key's
order, so one hot domain cannot pin a relay.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Mapping, Sequence, Set

from smtpfleet.config import RelayConfig, RoutingKey
from smtpfleet.envelope import QueuedMessage

POINTS_PER_WEIGHT = 160
WARM_SCALE = 10_000


def stable_hash(text: str) -> int:
    """Same value on every node and every run (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def routing_key(message: QueuedMessage, key: RoutingKey) -> str:
    if key is RoutingKey.SENDER_DOMAIN:
        return message.sender.rpartition("@")[2].lower()
    if key is RoutingKey.MESSAGE_ID or not message.recipients:
        return message.qid
    return message.recipients[0].rpartition("@")[2].lower()


class _TierRing:
    def __init__(self, relays: Sequence[RelayConfig]) -> None:
        self.relays = {relay.name: relay for relay in relays}
        points = sorted(
            (stable_hash(f"{relay.name}#{i}"), relay.name)
            for relay in relays
            for i in range(POINTS_PER_WEIGHT * relay.weight)
        )
        self._hashes = [h for h, _ in points]
        self._names = [n for _, n in points]

    def walk(self, key: str, healthy: Set[str]) -> list[str]:
        """Healthy relays of this tier in the key's order round the ring."""
        wanted = [name for name in self.relays if name in healthy]
        if not wanted:
            return []
        start = bisect.bisect(self._hashes, stable_hash(key))
        order: list[str] = []
        size = len(self._names)
        for step in range(size):
            name = self._names[(start + step) % size]
            if name in healthy and name not in order:
                order.append(name)
                if len(order) == len(wanted):
                    break
        return order


class Ring:
    """The relays' consistent-hash rings, one per priority tier (lowest first, like MX
    preference). `order` gives a routing key's relays, healthy ones only, with bounded load
    (a relay above `load_factor` × its fair share passes the key on) and `warm_percent` of
    keys sent to the next tier to keep it warm. Pure: the same inputs give the same order on
    every node."""

    def __init__(
        self,
        relays: Sequence[RelayConfig],
        *,
        load_factor: float = 1.25,
        warm_percent: float = 0.0,
        region: str = "",
    ) -> None:
        by_tier: dict[tuple[bool, int], list[RelayConfig]] = {}
        for relay in relays:
            away = bool(region) and relay.region != region  # other regions: further tiers
            by_tier.setdefault((away, relay.priority), []).append(relay)
        self._tiers = [_TierRing(by_tier[p]) for p in sorted(by_tier)]
        self._load_factor = load_factor
        self._warm_percent = warm_percent
        self.relays = {relay.name: relay for relay in relays}

    def order(
        self, key: str, healthy: Set[str], load: Mapping[str, int] | None = None
    ) -> list[RelayConfig]:
        """Healthy relays to try for this key, best first; empty when none is healthy."""
        walks = [walk for tier in self._tiers if (walk := tier.walk(key, healthy))]
        if not walks:
            return []
        walks[0] = self._bounded(walks[0], load or {})
        walks = [self._spread(walk) for walk in walks]
        if len(walks) > 1 and self._warms(key):
            walks[0], walks[1] = walks[1], walks[0]
        return [self.relays[name] for walk in walks for name in walk]

    def _spread(self, walk: list[str]) -> list[str]:
        """Keep the first choice; then each next relay is on another provider than the one
        before it whenever the rest of the walk has one (else the walk's own order)."""
        order, rest = walk[:1], walk[1:]
        while rest:
            last = self.relays[order[-1]].provider
            pick = next((n for n in rest if self.relays[n].provider != last), rest[0])
            order.append(pick)
            rest.remove(pick)
        return order

    def _warms(self, key: str) -> bool:
        return stable_hash(f"{key}#warm") % WARM_SCALE < self._warm_percent * WARM_SCALE / 100

    def _bounded(self, walk: list[str], load: Mapping[str, int]) -> list[str]:
        total = sum(load.get(name, 0) for name in walk) + 1
        weights = {name: self.relays[name].weight for name in walk}
        all_weight = sum(weights.values())
        for i, name in enumerate(walk):
            capacity = math.ceil(self._load_factor * total * weights[name] / all_weight)
            if load.get(name, 0) < capacity:
                return [name, *walk[:i], *walk[i + 1 :]]
        return walk
