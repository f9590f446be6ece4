"""Which relays a message tries, in order. Pure: no sockets, no Redis.

Lowest priority tier first (like MX preference); within a tier the starting relay rotates so
traffic is shared active-active, and the rest of the tier follows as the at-once fallbacks
(DESIGN invariant 3: a 4xx or connection error moves to the next relay immediately).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from smtpfleet.config import RelayConfig


class RelayPool:
    def __init__(self, relays: Sequence[RelayConfig]) -> None:
        self._tiers = self._group_by_tier(relays)
        self._turn = itertools.count()

    @staticmethod
    def _group_by_tier(relays: Sequence[RelayConfig]) -> list[list[RelayConfig]]:
        tiers: dict[int, list[RelayConfig]] = {}
        for relay in relays:
            # A relay of weight w takes w slots of the rotation, so it starts w times as often.
            tiers.setdefault(relay.priority, []).extend([relay] * relay.weight)
        return [tiers[priority] for priority in sorted(tiers)]

    def order(self) -> list[RelayConfig]:
        """Every relay once: tiers in order, each tier rotated to this message's turn."""
        turn = next(self._turn)
        ordered: list[RelayConfig] = []
        for tier in self._tiers:
            start = turn % len(tier)
            for relay in tier[start:] + tier[:start]:
                if relay not in ordered:
                    ordered.append(relay)
        return ordered

    def __len__(self) -> int:
        return sum(len(set(map(id, tier))) for tier in self._tiers)
