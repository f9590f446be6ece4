"""The Redis topology `smtpfleet status` shows, built from what the servers answer. Pure.

Replies in (INFO replication, Sentinel's view of the replicas, CLUSTER NODES), rows out:
every primary with its version, its replicas with their link and lag, and which of our
shards it holds. The I/O that asks for those replies is queue/redis_topology.py.

Replication lag is read on the primary: `lag_bytes` is its replication offset minus the
offset the replica last acknowledged, `last_ack_s` the seconds since that acknowledgement
(INFO's `lag`; the primary's side of the replica's `master_last_io_seconds_ago`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from smtpfleet.queue.keys import Keys

CLUSTER_SLOTS = 16384
LINK_UP = "up"
LINK_DOWN = "down"
ROLES = {"master": "primary", "slave": "replica"}


@dataclass(frozen=True)
class Replica:
    address: str
    link: str  # "up", "down", or the primary's sync state ("wait_bgsave", "send_bulk", ...)
    lag_bytes: int | None = None  # the primary's offset minus the replica's acknowledged one
    last_ack_s: int | None = None  # seconds since the replica's last acknowledgement


@dataclass(frozen=True)
class Primary:
    address: str
    role: str  # "primary"; "replica" when a single URL points at a replica
    version: str
    replicas: tuple[Replica, ...] = ()
    shards: tuple[int, ...] = ()
    error: str | None = None  # this server did not answer INFO


@dataclass(frozen=True)
class SentinelAnswer:
    address: str
    primary: str | None = None  # where this Sentinel says the primary is
    error: str | None = None


@dataclass(frozen=True)
class Topology:
    mode: str  # "single", "sentinel" or "cluster"
    primaries: tuple[Primary, ...]
    sentinels: tuple[SentinelAnswer, ...] = ()
    unassigned_shards: tuple[int, ...] = ()  # Cluster: shards whose slot no live primary serves
    # Sentinel: the replicas a `replicated` accept waits for now (`must_confirm`; the nodes
    # add `queue.replicas` as a floor). None: not known (no Sentinel listed the replicas).
    replicas_to_confirm: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClusterNode:
    """One line of CLUSTER NODES."""

    node_id: str
    address: str  # host:port, without the bus port
    flags: frozenset[str]
    primary_id: str | None  # a replica's primary
    slots: tuple[tuple[int, int], ...] = field(default=())

    @property
    def serving_primary(self) -> bool:
        return "master" in self.flags and not self.flags & {"fail", "fail?", "noaddr"}


# -- single server and Sentinel --------------------------------------------------------------


def role_name(replication: Mapping[str, Any]) -> str:
    role = str(replication.get("role", "unknown"))
    return ROLES.get(role, role)


def replicas_from_info(replication: Mapping[str, Any]) -> list[Replica]:
    """The replicas a primary lists in INFO replication (`slaveN:ip=..,port=..,state=..`)."""
    primary_offset = _int(replication.get("master_repl_offset"))
    found = []
    for name, value in replication.items():
        if not (name.startswith("slave") and name[5:].isdigit()):
            continue
        row = value if isinstance(value, Mapping) else _info_fields(str(value))
        offset = _int(row.get("offset"))
        state = str(row.get("state", ""))
        found.append(
            Replica(
                address=f"{row.get('ip')}:{row.get('port')}",
                link=LINK_UP if state == "online" else state or LINK_DOWN,
                lag_bytes=lag_bytes(primary_offset, offset),
                last_ack_s=_int(row.get("lag")),
            )
        )
    return sorted(found, key=lambda r: r.address)


def lag_bytes(primary_offset: int | None, replica_offset: int | None) -> int | None:
    """How far behind the replica's acknowledged offset is (never negative: the two figures
    are read at slightly different moments)."""
    if primary_offset is None or replica_offset is None:
        return None
    return max(0, primary_offset - replica_offset)


def with_known_replicas(listed: Sequence[Replica], known: Iterable[str]) -> tuple[Replica, ...]:
    """The primary's replicas, plus those Sentinel or the cluster know of that the primary does
    not list: a replica whose link is down drops out of the primary's INFO."""
    seen = {r.address for r in listed}
    missing = [Replica(address, LINK_DOWN) for address in sorted(set(known) - seen)]
    return tuple(sorted([*listed, *missing], key=lambda r: r.address))


# Flags of a replica the Sentinels will not promote. ("disconnected" is not one: it is the
# Sentinel's own link, and the replica being promoted shows it for a moment.)
NOT_PROMOTABLE = frozenset({"s_down", "o_down"})
DEFAULT_PRIORITY = 100


@dataclass(frozen=True)
class ReplicaState:
    """One replica as a `SENTINEL REPLICAS` reply shows it, for the accepts' WAIT."""

    address: str
    promotable: bool  # not down, and its priority lets a failover pick it
    in_sync: bool  # its link to the primary is up: it receives (and acknowledges) writes
    priority: int  # lower wins a failover first; only then the most data


def replica_states(replies: Iterable[Mapping[str, Any]]) -> list[ReplicaState]:
    """What each replica in a `SENTINEL REPLICAS` reply could do for a write's durability."""
    states = []
    for reply in replies:
        flags = set(str(reply.get("flags", "")).split(","))
        priority = _int(reply.get("slave-priority"))
        states.append(
            ReplicaState(
                address=f"{reply.get('ip')}:{reply.get('port')}",
                promotable=not flags & NOT_PROMOTABLE and priority != 0,
                in_sync=reply.get("master-link-status") == "ok",
                priority=DEFAULT_PRIORITY if priority is None else priority,
            )
        )
    return states


def must_confirm(state: ReplicaState, states: Sequence[ReplicaState]) -> bool:
    """Whether a write must reach this replica before its 250.

    Every replica in sync that a failover could pick. Not one that is out of sync (syncing
    after a restart, or the old primary after a forced failover, until the Sentinels demote
    it): it cannot acknowledge yet, and a failover picks it only after every in-sync replica
    (the most data wins among equal priorities), unless its priority is better than theirs.
    """
    if not state.promotable:
        return False
    if state.in_sync:
        return True
    in_sync = [s.priority for s in states if s.promotable and s.in_sync]
    return not in_sync or state.priority < min(in_sync)


def agreed_primary(answers: Sequence[SentinelAnswer]) -> str | None:
    """The primary most answering Sentinels name (None when none answered)."""
    named = [a.primary for a in answers if a.primary]
    return max(sorted(set(named)), key=named.count) if named else None


# -- Redis Cluster ---------------------------------------------------------------------------


def parse_cluster_nodes(raw: str) -> list[ClusterNode]:
    """CLUSTER NODES: `id host:port@bus flags primary ping pong epoch link slot...`."""
    rows = []
    for line in raw.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        slots = tuple(_slot_range(item) for item in parts[8:] if not item.startswith("["))
        rows.append(
            ClusterNode(
                node_id=parts[0],
                address=parts[1].split("@", 1)[0],
                flags=frozenset(parts[2].split(",")),
                primary_id=None if parts[3] == "-" else parts[3],
                slots=slots,
            )
        )
    return rows


def _slot_range(item: str) -> tuple[int, int]:
    low, _, high = item.partition("-")
    return int(low), int(high or low)


def shard_slots(keys: Keys) -> dict[int, int]:
    """Shard -> the hash slot of its keys (every key of a shard shares its hash tag)."""
    return {shard: key_slot(keys.stream(shard)) for shard in keys.all_shards()}


def shards_by_primary(
    nodes: Sequence[ClusterNode], slots: Mapping[int, int]
) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
    """Primary address -> the shards whose slot it serves; and the shards nobody serves."""
    held: dict[str, list[int]] = {n.address: [] for n in nodes if n.serving_primary}
    unassigned = []
    for shard, slot in sorted(slots.items()):
        owner = next(
            (
                n.address
                for n in nodes
                if n.serving_primary and any(low <= slot <= high for low, high in n.slots)
            ),
            None,
        )
        if owner is None:
            unassigned.append(shard)
        else:
            held[owner].append(shard)
    return {a: tuple(s) for a, s in held.items()}, tuple(unassigned)


def cluster_replicas(nodes: Sequence[ClusterNode], primary: ClusterNode) -> list[str]:
    return sorted(n.address for n in nodes if n.primary_id == primary.node_id)


def key_slot(key: str) -> int:
    """The Redis Cluster hash slot of a key: CRC16 (XMODEM) of its hash tag, mod 16384."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return _crc16(data) % CLUSTER_SLOTS


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


# -- presentation helpers --------------------------------------------------------------------


def compact_ranges(numbers: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    ordered = sorted(set(numbers))
    spans: list[list[int]] = []
    for n in ordered:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _info_fields(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
