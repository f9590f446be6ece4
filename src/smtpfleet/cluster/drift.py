"""Configuration drift: a fingerprint of the routing configuration, and what differs.

Nodes whose relays or routing differ map the same key to different relays and fail over
differently, silently. Each node publishes `fingerprint(routing_sections(config))` in its
heartbeat: a short digest of the whole, plus one digest per part (each relay, each other
section), so `smtpfleet status` can say what differs without publishing the settings.

Canonical form: relays (any list of objects with a `name`) are keyed by name, so their order
does not count; lists of plain values (e.g. `egress_addresses`, tags) are sets; any other list
keeps its order (a rule list is read first match first). Secrets never leave the node: each is
replaced by a slow salted hash, so a changed password is drift but the digest says nothing
useful about it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from smtpfleet.config import Config

# The sections of the configuration that decide where a message goes. A section added to
# routing (labels live in each relay; rules, regions) is added here and nothing else changes.
ROUTING_SECTIONS = ("relays", "routing")
SECRET_FIELDS = frozenset({"password"})
DIGEST_CHARS = 12
_SECRET_SALT = b"smtpfleet config fingerprint"
_SECRET_ROUNDS = 100_000


def routing_sections(config: Config) -> dict[str, Any]:
    """The routing-relevant sections of `config`, as plain JSON values."""
    dumped = config.model_dump(mode="json")
    return {name: dumped[name] for name in ROUTING_SECTIONS if name in dumped}


@dataclass(frozen=True)
class Fingerprint:
    """`digest` of the whole routing configuration; `parts`: "relay NAME" or a section name ->
    its digest."""

    digest: str
    parts: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "parts": dict(self.parts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fingerprint | None:
        digest, parts = data.get("digest"), data.get("parts")
        if not isinstance(digest, str) or not isinstance(parts, dict):
            return None
        return cls(digest, {str(k): str(v) for k, v in parts.items()})


def fingerprint(sections: Mapping[str, Any]) -> Fingerprint:
    """A stable digest of `sections` (see the module docstring for the canonical form)."""
    canonical = {name: _canonical(value) for name, value in sections.items()}
    parts: dict[str, str] = {}
    for name, value in canonical.items():
        if name == "relays" and isinstance(value, dict):
            parts |= {f"relay {relay}": _digest(item) for relay, item in value.items()}
        else:
            parts[name] = _digest(value)
    return Fingerprint(_digest(canonical), parts)


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            str(k): _secret(v) if k in SECRET_FIELDS else _canonical(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        items = [_canonical(v) for v in value]
        if items and all(isinstance(v, dict) and "name" in v for v in items):
            return {str(v["name"]): v for v in items}
        if all(v is None or isinstance(v, str | int | float | bool) for v in items):
            return sorted(items, key=_dumps)
        return items
    return value


def _secret(value: Any) -> str | None:
    if value is None or value == "":
        return None
    slow = hashlib.pbkdf2_hmac("sha256", str(value).encode(), _SECRET_SALT, _SECRET_ROUNDS)
    return slow.hex()


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _digest(value: Any) -> str:
    return hashlib.sha256(_dumps(value).encode()).hexdigest()[:DIGEST_CHARS]


def differences(reference: Fingerprint, other: Fingerprint) -> list[str]:
    """What `other` has that differs from `reference`, one phrase per part, sorted."""
    found = []
    for part in sorted(reference.parts.keys() | other.parts.keys()):
        mine, theirs = reference.parts.get(part), other.parts.get(part)
        if theirs is None:
            found.append(f"{part} missing")
        elif mine is None:
            found.append(f"{part} extra")
        elif mine != theirs:
            found.append(
                f"{part} settings differ" if part.startswith("relay ") else f"{part} differs"
            )
    return found


@dataclass(frozen=True)
class DriftReport:
    """The fingerprints of the live nodes: how many distinct, the most common one (the
    reference), and what each node that differs from it has differently."""

    distinct: int
    reference: str | None
    differing: dict[str, list[str]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "drift": self.distinct > 1,
            "distinct": self.distinct,
            "reference": self.reference,
            "differing": self.differing,
        }

    def lines(self) -> list[str]:
        return [f"{node} differs: {', '.join(what)}" for node, what in self.differing.items()]


def drift_report(fingerprints: Mapping[str, Fingerprint]) -> DriftReport:
    """Compare the nodes' fingerprints against the most common one (ties: the one of the
    node that sorts first), so one odd node out is the one named."""
    if not fingerprints:
        return DriftReport(0, None, {})
    counts = Counter(fp.digest for fp in fingerprints.values())
    order = sorted(fingerprints)
    first_seen = {fingerprints[n].digest: i for i, n in reversed(list(enumerate(order)))}
    reference_digest = max(counts, key=lambda d: (counts[d], -first_seen[d]))
    reference = next(fp for fp in fingerprints.values() if fp.digest == reference_digest)
    differing = {
        node: differences(reference, fingerprints[node]) or ["fingerprint differs"]
        for node in order
        if fingerprints[node].digest != reference_digest
    }
    return DriftReport(len(counts), reference_digest, differing)


def distinct_fingerprints(own: str, peers: Mapping[str, str]) -> int:
    """How many distinct fingerprints this node sees among itself and its live peers."""
    return len({own, *peers.values()})
