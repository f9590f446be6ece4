"""Where the ring sends a key, computed with the node's own `Ring` from a config.

A test of "the next relay is tried at once" means something only when the failing relay comes
first for the message's key; these helpers pick such a key (or name the relay that is first)
so the test can assert that precondition instead of trusting the hash.
"""

from __future__ import annotations

from smtpfleet.config import Config
from smtpfleet.relays.ring import Ring

SEARCH_LIMIT = 10_000


def ring_order(config: Config, key: str) -> list[str]:
    """Relay names in the order a node tries them for `key`: all healthy, nothing in flight."""
    ring = Ring(
        config.relays,
        load_factor=config.routing.load_factor,
        warm_percent=config.routing.warm_percent,
        region=config.node.region,
    )
    return [relay.name for relay in ring.order(key, {relay.name for relay in config.relays})]


def domain_routed_first_to(config: Config, relay: str, *, suffix: str = "example.net") -> str:
    """A domain (``dN.<suffix>``) whose ring order starts with `relay`."""
    for n in range(SEARCH_LIMIT):
        domain = f"d{n}.{suffix}"
        if ring_order(config, domain)[0] == relay:
            return domain
    raise ValueError(f"none of {SEARCH_LIMIT} domains is routed to {relay} first")
