"""Relay health decisions on plain values: rise/fall, passive ejection, the cluster verdict.

- Active checks move a relay down after `fall` failed probes in a row and up after `rise`
  good ones (HAProxy's model).
- Passive checks watch real deliveries: `passive_failures` connection errors, timeouts or 421s
  in a row eject the relay at once for an ejection time that doubles on each repeat (Envoy's
  outlier detection), but never more than `max_ejection_percent` of a tier at a time.
- Each node publishes its own view; a relay is down for the cluster only when a majority of
  the live nodes that have it configured see it down, so one node's bad link does not evict
  it for everyone (and a node without the relay does not vote on it). That node still avoids
  the relay itself: its healthy set is the verdict minus what it sees down.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from smtpfleet.config import HealthConfig, RelayConfig


@dataclass
class RiseFall:
    """Active-check state of one relay: down after `fall` failed probes in a row, up after
    `rise` good ones."""

    fall: int
    rise: int
    up: bool = True
    _streak: int = 0  # consecutive results against the current state

    def observe(self, ok: bool) -> bool:
        """Record one probe result; True when the state changed."""
        if ok == self.up:
            self._streak = 0
            return False
        self._streak += 1
        if self._streak >= (self.rise if ok else self.fall):
            self.up, self._streak = ok, 0
            return True
        return False


@dataclass
class _Outlier:
    failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    last_ejected: float = 0.0


@dataclass
class PassiveEjector:
    """Passive checks: eject a relay that keeps failing real deliveries, for a doubling time,
    never more than `max_ejection_percent` of a tier at once."""

    config: HealthConfig
    tiers: Mapping[str, int]  # relay name -> priority
    _state: dict[str, _Outlier] = field(default_factory=dict)

    def _outlier(self, relay: str) -> _Outlier:
        return self._state.setdefault(relay, _Outlier())

    def ejected(self, relay: str, now: float) -> bool:
        return self._outlier(relay).ejected_until > now

    def success(self, relay: str, now: float) -> None:
        outlier = self._outlier(relay)
        outlier.failures = 0
        if outlier.ejections and now - outlier.last_ejected > self.config.max_ejection_s:
            outlier.ejections = 0  # well behaved for a long time: forget past ejections

    def failure(self, relay: str, now: float) -> bool:
        """Count a connection error / timeout / 421; True when this ejects the relay."""
        outlier = self._outlier(relay)
        outlier.failures += 1
        if outlier.failures < self.config.passive_failures or self.ejected(relay, now):
            return False
        if not self._may_eject(relay, now):
            return False
        duration = self.config.ejection_s * 2 ** min(outlier.ejections, 20)
        outlier.ejected_until = now + min(duration, self.config.max_ejection_s)
        outlier.ejections += 1
        outlier.last_ejected = now
        outlier.failures = 0
        return True

    def _may_eject(self, relay: str, now: float) -> bool:
        tier = [name for name, p in self.tiers.items() if p == self.tiers[relay]]
        already = sum(1 for name in tier if self.ejected(name, now))
        allowed = math.floor(len(tier) * self.config.max_ejection_percent / 100)
        return already < allowed


def cluster_verdict(
    relays: Iterable[str], views: Mapping[str, Mapping[str, bool]], live_nodes: Iterable[str]
) -> dict[str, bool]:
    """Up unless a strict majority of the relay's electorate sees the relay down.

    The electorate of a relay is the live nodes that have it: a node whose published view
    lacks the relay does not have it configured (configuration drift) and votes neither way.
    A live node with no view yet still counts (as not seeing it down). Views of nodes that are
    not live do not count; a relay no live node has a view of yet is up (a cluster that just
    started must not refuse to deliver).
    """
    live = set(live_nodes)
    voters = {node: view for node, view in views.items() if node in live}
    verdict = {}
    for relay in relays:
        lacking = sum(1 for view in voters.values() if relay not in view)
        quorum = (len(live) - lacking) // 2 + 1
        down = sum(1 for view in voters.values() if view.get(relay) is False)
        verdict[relay] = down < quorum
    return verdict


def view_ttl_ms(interval_s: float) -> int:
    """How long a node's published view counts: five check intervals plus 5 s. A node that
    stops publishing (dead, or cut off from Redis) stops voting soon after; a slow check or
    two does not make a live node's view vanish."""
    return int(interval_s * 5000) + 5000


def healthy_set(verdict: Mapping[str, bool], own_view: Mapping[str, bool]) -> set[str]:
    """What this node routes to: up for the cluster and not down from here."""
    return {relay for relay, up in verdict.items() if up and own_view.get(relay, True)}


def tier_map(relays: Iterable[RelayConfig]) -> dict[str, int]:
    return {relay.name: relay.priority for relay in relays}
