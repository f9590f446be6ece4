"""Ask the Redis servers what they are: the I/O behind queue/topology.py, for `status`.

Single server: its INFO. Sentinel: every Sentinel is asked where the primary is (which ones
answered is part of the answer), the first that answers for its replicas, and the primary
for INFO. Cluster: CLUSTER NODES from the first node that answers, then INFO from every
primary that serves slots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from redis.asyncio.cluster import RedisCluster

from smtpfleet.queue.connection import RedisConnection
from smtpfleet.queue.keys import Keys
from smtpfleet.queue.suitability import server_version
from smtpfleet.queue.topology import (
    ClusterNode,
    Primary,
    Replica,
    ReplicaState,
    SentinelAnswer,
    Topology,
    agreed_primary,
    cluster_replicas,
    must_confirm,
    parse_cluster_nodes,
    replica_states,
    replicas_from_info,
    role_name,
    shard_slots,
    shards_by_primary,
    with_known_replicas,
)

ASK_TIMEOUT_S = 2.0  # one Sentinel or cluster node that does not answer must not stall status


async def topology(connection: RedisConnection, keys: Keys, master_name: str) -> Topology:
    if isinstance(connection.client, RedisCluster):
        return await _cluster(connection.client, keys)
    # Any: redis-py's return types are unions over every decode mode and RESP version.
    client: Any = connection.client
    server, replication = await _info(client)
    listed = replicas_from_info(replication)
    if connection.sentinel is None:
        kwargs = client.connection_pool.connection_kwargs
        address = kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        return Topology("single", (_primary(address, server, replication, listed, keys),))
    answers, states = await _ask_sentinels(connection.sentinel.sentinels, master_name)
    address = agreed_primary(answers) or "?"
    replicas = with_known_replicas(listed, [state.address for state in states or ()])
    primary = _primary(address, server, replication, replicas, keys)
    to_confirm = None if states is None else sum(must_confirm(s, states) for s in states)
    return Topology("sentinel", (primary,), tuple(answers), replicas_to_confirm=to_confirm)


def _primary(
    address: str,
    server: dict[str, Any],
    replication: dict[str, Any],
    replicas: Iterable[Replica],
    keys: Keys,
) -> Primary:
    return Primary(
        address=address,
        role=role_name(replication),
        version=server_version(server),
        replicas=tuple(replicas),
        shards=tuple(keys.all_shards()),
    )


async def _info(client: Any, **target: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    server = await client.info("server", **target)
    replication = await client.info("replication", **target)
    return dict(server), dict(replication)


async def _ask_sentinels(
    sentinels: list[Any], master_name: str
) -> tuple[list[SentinelAnswer], list[ReplicaState] | None]:
    """Where each Sentinel says the primary is; the replicas as the first to answer lists them."""
    answers = []
    known: list[ReplicaState] | None = None
    for sentinel in sentinels:
        kwargs = sentinel.connection_pool.connection_kwargs
        address = f"{kwargs.get('host')}:{kwargs.get('port')}"
        try:
            master = await asyncio.wait_for(sentinel.sentinel_master(master_name), ASK_TIMEOUT_S)
            if known is None:
                replies = await asyncio.wait_for(
                    sentinel.sentinel_slaves(master_name), ASK_TIMEOUT_S
                )
                known = replica_states(replies)
        except Exception as exc:  # an unreachable Sentinel is an answer, not a failure
            answers.append(SentinelAnswer(address, error=f"{exc.__class__.__name__}: {exc}"))
            continue
        answers.append(SentinelAnswer(address, primary=f"{master['ip']}:{master['port']}"))
    return answers, known


async def _cluster(client: RedisCluster, keys: Keys) -> Topology:
    await client.initialize()
    nodes = await _cluster_nodes(client)
    held, unassigned = shards_by_primary(nodes, shard_slots(keys))
    primaries = [
        await _cluster_primary(client, nodes, node, held.get(node.address, ()))
        for node in sorted(nodes, key=lambda n: n.address)
        if node.serving_primary and node.slots
    ]
    return Topology("cluster", tuple(primaries), unassigned_shards=unassigned)


async def _cluster_nodes(client: RedisCluster) -> list[ClusterNode]:
    """CLUSTER NODES from the first node that answers (as raw text: no client parsing)."""
    failure: Exception | None = None
    for node in client.get_nodes():
        try:
            raw = await asyncio.wait_for(
                client.execute_command("CLUSTER", "NODES", target_nodes=node), ASK_TIMEOUT_S
            )
        except Exception as exc:  # try the next node
            failure = exc
            continue
        return parse_cluster_nodes(raw.decode() if isinstance(raw, bytes) else str(raw))
    raise ConnectionError(f"no cluster node answered CLUSTER NODES: {failure}")


async def _cluster_primary(
    client: RedisCluster, nodes: list[ClusterNode], node: ClusterNode, shards: tuple[int, ...]
) -> Primary:
    host, _, port = node.address.rpartition(":")
    target = client.get_node(host=host, port=int(port))
    known = cluster_replicas(nodes, node)
    try:
        if target is None:
            raise ConnectionError("not in the client's node table yet")
        server, replication = await asyncio.wait_for(
            _info(client, target_nodes=target), ASK_TIMEOUT_S
        )
    except Exception as exc:  # one node away: show it, and the rest of the cluster
        replicas = with_known_replicas([], known)
        error = f"{exc.__class__.__name__}: {exc}"
        return Primary(node.address, "primary", "?", replicas, shards, error)
    replicas = with_known_replicas(replicas_from_info(replication), known)
    return Primary(node.address, role_name(replication), server_version(server), replicas, shards)
