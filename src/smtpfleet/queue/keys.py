"""Every Redis key smtpfleet uses, built in one place.

Each key of one shard carries the hash tag ``{prefix:N}``, so every script and transaction
touches a single hash slot and the same code runs on one Redis, Sentinel, and Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "delivery"  # the consumer group every node's workers read through
ENTRY_FIELD = "m"  # the stream entry's one field: QueuedMessage.encode()


@dataclass(frozen=True)
class Keys:
    """Every Redis key name of one deployment (prefix, shard count), and the parsing of them."""

    prefix: str
    shards: int
    # The traffic classes' lanes, highest priority first (queue/classes.py); "" alone: none.
    lanes: tuple[str, ...] = ("",)

    def tag(self, shard: int) -> str:
        return f"{{{self.prefix}:{shard}}}"

    def stream(self, shard: int, lane: str = "") -> str:
        """Ready and in-flight entries; entries are deleted (XDEL) once finished, never trimmed.

        One per traffic class (queue/classes.py): the default class's lane "" keeps the key
        of a queue without classes; another class's stream carries its name, in the same slot.
        """
        return f"{self.tag(shard)}:stream" + (f":{lane}" if lane else "")

    def body(self, shard: int, qid: str) -> str:
        """A hash: ``d`` the message bytes, ``ok`` once durability was confirmed."""
        return f"{self.tag(shard)}:body:{qid}"

    def retry(self, shard: int, lane: str = "") -> str:
        """Sorted set of encoded entries waiting for a retry, scored by due time (ms); one
        per traffic class, so a due entry goes back into its own class's stream."""
        return f"{self.tag(shard)}:retry" + (f":{lane}" if lane else "")

    def dedupe(self, shard: int, fingerprint: str) -> str:
        return f"{self.tag(shard)}:dedupe:{fingerprint}"

    def dead(self, shard: int) -> str:
        """Dead letters: undeliverable bounces and failures for null senders."""
        return f"{self.tag(shard)}:dead"

    def shard_of_stream(self, key: str) -> int:
        """The shard of a key built by `stream` (XREADGROUP replies name streams, not shards)."""
        return self.parse_stream(key)[0]

    def parse_stream(self, key: str) -> tuple[int, str]:
        """The shard and lane of a key built by `stream`."""
        head, sep, tail = key.rpartition("}:")
        prefix = f"{{{self.prefix}:"
        kind, _, lane = tail.partition(":")
        if not sep or kind != "stream" or not head.startswith(prefix):
            raise ValueError(f"not a stream key of prefix {self.prefix!r}: {key!r}")
        shard = head.removeprefix(prefix)
        if not shard.isdigit() or int(shard) >= self.shards:
            raise ValueError(f"not a stream key of prefix {self.prefix!r}: {key!r}")
        return int(shard), lane

    def all_shards(self) -> range:
        return range(self.shards)

    def streams(self, shard: int) -> list[str]:
        """The shard's stream of every class, highest priority first."""
        return [self.stream(shard, lane) for lane in self.lanes]

    def all_streams(self) -> list[tuple[int, str, str]]:
        """(shard, lane, stream key) of every stream of the queue."""
        return [(s, lane, self.stream(s, lane)) for s in self.all_shards() for lane in self.lanes]

    # Cluster-wide keys: one key per operation, so they need no common hash tag.

    def nodes(self) -> str:
        """Sorted set: node id -> time of its last heartbeat (ms)."""
        return f"{{{self.prefix}}}:nodes"

    def node(self, node_id: str) -> str:
        """Hash with what a node says about itself (host, pid, started, role); expires."""
        return f"{{{self.prefix}}}:node:{node_id}"

    def view(self, node_id: str) -> str:
        """Hash: relay name -> "1" (up) / "0" (down), as this node sees it; expires."""
        return f"{{{self.prefix}}}:view:{node_id}"

    def relay_connections(self, relay: str) -> str:
        """Sorted set of connection leases (member: node/connection, score: expiry ms)."""
        return f"{{{self.prefix}}}:relay:{relay}:conns"

    def relay_waiting(self, relay: str) -> str:
        """Sorted set of owners (nodes) waiting for a connection lease, scored by expiry (ms)."""
        return f"{{{self.prefix}}}:relay:{relay}:waiting"

    def relay_rate(self, relay: str, second: int) -> str:
        return f"{{{self.prefix}}}:relay:{relay}:rate:{second}"

    def paused_relays(self) -> str:
        """Set of relay names an operator paused, cluster-wide."""
        return f"{{{self.prefix}}}:paused"

    def drain_request(self, node_id: str) -> str:
        return f"{{{self.prefix}}}:drain:{node_id}"

    def outcomes(self, minute: int) -> str:
        """Hash "relay|outcome" -> count of delivery verdicts in that minute (for `status`)."""
        return f"{{{self.prefix}}}:outcomes:{minute}"

    def auth_failures(self, client_ip: str) -> str:
        """Counter of failed SMTP AUTH attempts from one client IP; expires with its window."""
        return f"{{{self.prefix}}}:authfail:{client_ip}"

    # Per-client limits: each client's keys share a hash tag of their own, so one round trip
    # touches one slot, and on Redis Cluster the clients spread over the slots.

    def client_tag(self, client: str) -> str:
        return f"{{{self.prefix}:client:{client}}}"

    def client_sessions(self, client: str) -> str:
        """Sorted set of a client's session leases (member: node/session, score: expiry ms)."""
        return f"{self.client_tag(client)}:sessions"

    def client_minute(self, client: str, minute: int) -> str:
        """Hash ``m`` (MAIL commands), ``r`` (recipients) of one client in one fixed minute."""
        return f"{self.client_tag(client)}:minute:{minute}"


# How long a refused lease keeps its owner in `relay_waiting`: its poller renews it every
# 50 ms while it waits, and a holder over its share sees it within a reap interval.
WAITING_TTL_MS = 1000


def lease_member(owner: str, token: int) -> str:
    """A connection lease's member in `relay_connections`: its owner (node) and a counter."""
    return f"{owner}:{token}"


def lease_owner(member: str) -> str:
    """The owner (node) of a lease member; node ids may hold ':' themselves, tokens never."""
    return member.rpartition(":")[0]
