"""What nodes share besides the mail, as small Protocols, one per user.

`ClusterStore` (queue/redis_cluster.py) implements them all on Redis; the in-memory doubles in
`smtpfleet.testing.memory` implement them for unit tests. Membership, the health monitor, the
worker and the relay pool depend on these, never on Redis; `node.py` wires the concrete store.
Every method raises `QueueUnavailable` when the store is away, except the relay limits, which
raise `LimitsUnavailable` (their callers fail open: the per-node caps still hold).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from smtpfleet.queue.deliveries import Delivery


class MembershipStore(Protocol):
    """Heartbeats, the member list, and the takeover of dead members' pending entries."""

    async def heartbeat(
        self, node_id: str, now_ms: int, info: Mapping[str, Any], ttl_ms: int
    ) -> int | None:
        """Record this beat; return the beat it replaced (None: this node was not a member)."""
        ...

    async def members(self) -> dict[str, int]:
        """Every node that registered and was not removed: id -> last heartbeat (ms)."""
        ...

    async def node_info(self, node_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """What each node published with its last heartbeat (nodes whose info expired are
        left out)."""
        ...

    async def claim_from(self, dead: str, me: str, min_idle_ms: int, count: int) -> list[Delivery]:
        """Move a dead consumer's entries idle for `min_idle_ms` to `me` (each to one claimer)."""
        ...

    async def pending_count(self, consumer: str) -> int: ...

    async def forget_node(self, node_id: str, last_beat_ms: int | None = None) -> bool:
        """Deregister a node: from the members, unless it beat since `last_beat_ms` (False:
        it is back, under the same id); and its consumers, each only with nothing pending."""
        ...

    async def take_drain_request(self, node_id: str) -> bool:
        """Whether an operator asked this node to drain; the request is used up in the asking,
        so the node started again under the same id (a pod restarted in place) runs."""
        ...


class HealthViews(Protocol):
    """Each node's own view of the relays, and the relays an operator paused."""

    async def publish_view(
        self,
        node_id: str,
        view: Mapping[str, bool],
        ttl_ms: int,
        reasons: Mapping[str, str] | None = None,
    ) -> None:
        """`reasons`: why a relay this node sees down is down (for `smtpfleet status`)."""

    async def views(self, node_ids: Iterable[str]) -> dict[str, dict[str, bool]]: ...

    async def paused_relays(self) -> set[str]: ...


class DeliveryBookkeeping(Protocol):
    """What a worker keeps fresh and shares while it delivers."""

    async def refresh_leases(self, me: str, entries: Mapping[tuple[int, str], list[str]]) -> None:
        """Reset the idle time of entries (by shard and traffic class lane) still in flight
        here, so no claim takes live work."""
        ...

    async def add_outcomes(self, minute: int, counts: Mapping[str, int]) -> None:
        """Add recent per-relay verdict counts ("relay|kind" -> n), for `smtpfleet status`."""
        ...


class SharedLimits(Protocol):
    """Cluster-wide relay limits: connection leases and a per-second message budget."""

    async def acquire_connection(
        self, relay: str, member: str, now_ms: int, ttl_ms: int, limit: int
    ) -> bool:
        """Take (or refresh) lease `member` until now + ttl; False when `limit` are held."""
        ...

    async def release_connection(self, relay: str, member: str) -> None: ...

    async def waiting_owners(self, relay: str, now_ms: int) -> set[str]:
        """The owners a lease was refused to within the last second: they wait for one."""
        ...

    async def take_rate_slot(self, relay: str, second: int, limit: int) -> bool:
        """One message in this second's budget; False when the budget is spent."""
        ...
