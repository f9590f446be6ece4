"""Where a shard's commands go: one server (single Redis, Sentinel), or the primary holding
the shard's hash slot (Redis Cluster).

A `Route` is one server's plain client with its two batchers (accepts, with the WAIT/WAITAOF
that closes a batch; deliveries). On Redis Cluster every primary gets its own route, so the
confirmation goes down the same connection as the writes it covers (a keyless WAIT sent
through the cluster client would land on some other node and confirm nothing). The shard ->
primary map comes from the cluster client's slot table and is refreshed after a MOVED/ASK
reply (a slot moved, or a replica took over).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

from smtpfleet.queue.batcher import Batcher, BatchObserver, Confirmation
from smtpfleet.queue.keys import Keys

# Replies meaning "this command did not run here; the slot is elsewhere or moving". redis-py
# parses them into these classes and strips the code from the message ("MOVED 12 h:p" becomes
# MovedError("12 h:p")), so the class, not the text, says which reply it was.
REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError)


def is_redirect(reply: Any) -> bool:
    return isinstance(reply, REDIRECTS)


@dataclass
class Route:
    address: str
    client: aioredis.Redis
    accepts: Batcher
    deliveries: Batcher

    async def close(self) -> None:
        await self.accepts.close()
        await self.deliveries.close()


@dataclass(frozen=True)
class Observers:
    """The group-commit metrics of the accept and the delivery batchers (None: not observed)."""

    accepts: BatchObserver | None = None
    deliveries: BatchObserver | None = None


def route_for(
    address: str,
    client: aioredis.Redis,
    confirmation: Confirmation | None,
    observers: Observers = Observers(),
) -> Route:
    # Accepts share pipelines and one confirmation per batch; deliveries share others,
    # never waiting behind an fsync.
    accepts = Batcher(client, confirmation, observe=observers.accepts)
    return Route(address, client, accepts, Batcher(client, observe=observers.deliveries))


@dataclass
class SingleRoutes:
    """Every shard on one server."""

    route: Route

    async def for_shard(self, shard: int) -> Route:
        return self.route

    async def by_route(self, shards: range) -> list[tuple[Route, list[int]]]:
        return [(self.route, list(shards))]

    async def primaries(self) -> list[Route]:
        return [self.route]

    async def refresh(self) -> None:
        return None

    async def close(self) -> None:
        await self.route.close()


@dataclass
class ClusterRoutes:
    """One route per primary; shard -> slot -> the primary serving it now."""

    cluster: RedisCluster
    keys: Keys
    confirmation: Confirmation | None
    client_options: dict[str, Any]
    observers: Observers = field(default_factory=Observers)
    _routes: dict[str, Route] = field(default_factory=dict)  # by "host:port"
    _shard_address: dict[int, str] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def for_shard(self, shard: int) -> Route:
        address = self._shard_address.get(shard)
        if address is None:
            await self.refresh()
            address = self._shard_address[shard]
        return self._routes[address]

    async def by_route(self, shards: range) -> list[tuple[Route, list[int]]]:
        """The shards grouped by the primary that holds them (one read pipeline per primary)."""
        groups: dict[str, list[int]] = {}
        for shard in shards:
            route = await self.for_shard(shard)
            groups.setdefault(route.address, []).append(shard)
        return [(self._routes[address], group) for address, group in groups.items()]

    async def primaries(self) -> list[Route]:
        if not self._shard_address:
            await self.refresh()
        return [self._routes[a] for a in sorted(set(self._shard_address.values()))]

    async def refresh(self) -> None:
        """Reload the slot table and point every shard at its slot's primary now."""
        async with self._lock:
            await self.cluster.initialize()
            await self.cluster.nodes_manager.initialize()
            manager = self.cluster.nodes_manager
            for shard in self.keys.all_shards():
                slot = self.cluster.keyslot(self.keys.stream(shard))
                node = manager.get_node_from_slot(slot)
                address = f"{node.host}:{node.port}"
                if address not in self._routes:
                    # from_pool: the client owns its pool, so aclose() disconnects it (a
                    # client given `connection_pool=` leaves it, and its sockets, open).
                    client = aioredis.Redis.from_pool(
                        aioredis.BlockingConnectionPool(
                            host=node.host, port=node.port, **self.client_options
                        )
                    )
                    self._routes[address] = route_for(
                        address, client, self.confirmation, self.observers
                    )
                self._shard_address[shard] = address

    async def close(self) -> None:
        for route in self._routes.values():
            await route.close()
            await route.client.aclose()


Routes = SingleRoutes | ClusterRoutes
