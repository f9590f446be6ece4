"""Compliance routing: which relays each recipient of a message may use. Pure.

`routing.rules` are tried in order and the first that matches a recipient decides (like a
firewall): its selector names the relays that recipient's copy may leave through, on
failover too. A rule looks at the sender's domain, the recipient's domain and the tenant
(the authenticated user, or the tenant header of a trusted client, stored with the entry),
so one message can fall under several rules; its recipients are grouped per rule and each
group is routed on its own ring order, restricted to the rule's relays. A group none of whose
relays is healthy waits; it never takes a relay outside its set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

from smtpfleet.config import RelayConfig, RoutingConfig, RoutingKey, RoutingRule
from smtpfleet.envelope import QueuedMessage
from smtpfleet.relays.ring import Ring, routing_key

# The group of recipients no rule restricts.
UNRESTRICTED = ""
# Recipients parked for want of a healthy relay in their rule's set are counted with the
# relays' recent outcomes (`{P}:outcomes:<minute>`), under this prefix and the rule's name:
# `smtpfleet status` shows them as "waiting for a route".
WAITING_PREFIX = "rule:"
WAITING_OUTCOME = "waiting"
NO_RULE = "(no rule)"


def waiting_counter(rule: str) -> str:
    return f"{WAITING_PREFIX}{rule or NO_RULE}|{WAITING_OUTCOME}"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


def domain_matches(domain: str, patterns: Sequence[str]) -> bool:
    """Exact names, and `*.example.com` for every subdomain of example.com (not itself)."""
    for pattern in patterns:
        if pattern.startswith("*."):
            if domain.endswith(pattern[1:]):
                return True
        elif domain == pattern:
            return True
    return False


def rule_matches(rule: RoutingRule, sender: str, recipient: str, tenant: str | None) -> bool:
    if rule.sender_domains and not domain_matches(domain_of(sender), rule.sender_domains):
        return False
    if rule.recipient_domains and not domain_matches(domain_of(recipient), rule.recipient_domains):
        return False
    return not rule.tenants or (tenant is not None and tenant in rule.tenants)


def rule_for(
    rules: Sequence[RoutingRule], sender: str, recipient: str, tenant: str | None
) -> RoutingRule | None:
    """The first rule that matches this recipient's copy; None: any relay will do."""
    return next((r for r in rules if rule_matches(r, sender, recipient, tenant)), None)


@dataclass(frozen=True)
class Route:
    """Recipients that share a rule, and the relays to try for them, best first (empty: none
    of the rule's relays is healthy, so they wait)."""

    rule: str  # UNRESTRICTED when no rule matched
    recipients: tuple[str, ...]
    order: tuple[RelayConfig, ...]

    @property
    def waiting_reason(self) -> str:
        """Stored with the retry entry and shown by `queue show`: why nothing was tried."""
        if self.rule == UNRESTRICTED:
            return "4.4.1 waiting: no healthy relay"
        return f"4.4.1 waiting: no healthy relay allowed by routing rule {self.rule}"


class Router:
    """Routing rules over the ring: `routes` gives, per group of recipients, the relays to try.

    Every node computes the same routes from the same config and healthy set.
    """

    def __init__(self, ring: Ring, relays: Sequence[RelayConfig], routing: RoutingConfig) -> None:
        self._ring = ring
        self._routing = routing
        self._rules = routing.rules
        self.eligible: dict[str, frozenset[str]] = {
            rule.name: frozenset(r.name for r in relays if rule.relays.selects(r))
            for rule in routing.rules
        }
        self.eligible[UNRESTRICTED] = frozenset(r.name for r in relays)

    def groups(self, message: QueuedMessage) -> dict[str, tuple[str, ...]]:
        """Recipients by the name of the rule that decides them (in the message's order)."""
        groups: dict[str, list[str]] = {}
        for recipient in message.recipients:
            rule = rule_for(self._rules, message.sender, recipient, message.tenant)
            groups.setdefault(rule.name if rule else UNRESTRICTED, []).append(recipient)
        return {name: tuple(recipients) for name, recipients in groups.items()}

    def routes(
        self, message: QueuedMessage, healthy: Set[str], load: Mapping[str, int] | None = None
    ) -> list[Route]:
        return [
            Route(rule, recipients, self._order(message, rule, recipients, healthy, load))
            for rule, recipients in self.groups(message).items()
        ]

    def _order(
        self,
        message: QueuedMessage,
        rule: str,
        recipients: tuple[str, ...],
        healthy: Set[str],
        load: Mapping[str, int] | None,
    ) -> tuple[RelayConfig, ...]:
        key = self._key(message, recipients)
        return tuple(self._ring.order(key, healthy & self.eligible[rule], load))

    def _key(self, message: QueuedMessage, recipients: tuple[str, ...]) -> str:
        """The routing key of the group: by recipient domain, its first recipient's."""
        if self._routing.key is RoutingKey.RECIPIENT_DOMAIN and recipients:
            return recipients[0].rpartition("@")[2].lower()  # as routing_key() does
        return routing_key(message, self._routing.key)
