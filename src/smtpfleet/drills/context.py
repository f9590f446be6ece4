"""What a drill is made of: the scenario (fault, heal, probe, objectives) and the context its
steps act on (the cluster, a Redis client, the Sentinel set when there is one, notes)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from smtpfleet.config import Config, Durability, load_config
from smtpfleet.queue.connection import RedisClient
from smtpfleet.queue.keys import Keys
from smtpfleet.testing.localcluster import LocalCluster
from smtpfleet.testing.sink import ReceivedMessage, Sink

if TYPE_CHECKING:
    from smtpfleet.drills.remote import RemoteCluster
    from smtpfleet.testing.redis_cluster import RedisClusterServers
    from smtpfleet.testing.sentinel import SentinelSet


class Relay(Protocol):
    """What the drill reads of a relay: a local Sink, or a RemoteSink over HTTP."""

    @property
    def name(self) -> str: ...
    @property
    def count(self) -> int: ...
    @property
    def messages(self) -> Sequence[ReceivedMessage]: ...
    @property
    def refused_recipients(self) -> Sized: ...
    @property
    def rejected(self) -> Sized: ...


@dataclass
class DrillContext:
    redis: RedisClient  # one server's client (or the Sentinels' primary), or the cluster's
    local: LocalCluster | None = None  # a cluster the drill started (None: --target)
    remote: RemoteCluster | None = None  # a running cluster named by a target file
    notes: dict[str, object] = field(default_factory=dict)
    sentinels: SentinelSet | None = None  # the Redis HA drills run on a Sentinel set
    redis_cluster: RedisClusterServers | None = None  # ... or on a Redis Cluster

    @property
    def cluster(self) -> LocalCluster:
        """The local cluster; only scenarios that act on local processes ask for it."""
        assert self.local is not None, "this step needs a local cluster"
        return self.local

    @property
    def sinks(self) -> Sequence[Relay]:
        if self.remote is not None:
            return self.remote.sinks
        return self.cluster.sink_servers

    @property
    def smtp_targets(self) -> list[tuple[str, int]]:
        if self.remote is not None:
            return list(self.remote.smtp)
        return [n.smtp for n in self.cluster.node_processes]

    async def refresh(self) -> None:
        """Fetch what remote relays received since the last call (local sinks are live)."""
        if self.remote is not None:
            await self.remote.refresh()

    @property
    def relay(self) -> Sink:
        """The relay the relay-* scenarios break (unless a scenario picks its own)."""
        faulty = self.notes.get("faulty_relay")
        for sink in self.cluster.sink_servers:
            if sink.name == faulty:
                return sink
        return self.cluster.sink_servers[0]

    @property
    def config(self) -> Config:
        """The configuration the first node runs with (read from its file), or the target's."""
        if self.remote is not None:
            return self.remote.config
        return load_config(self.cluster.node_processes[0].config_path, {})

    @property
    def keys(self) -> Keys:
        return Keys(self.config.redis.prefix, self.config.redis.shards)


Step = Callable[[DrillContext], Awaitable[None]]
Probe = Callable[[DrillContext], Awaitable[bool]]


@dataclass(frozen=True)
class Scenario:
    name: str
    proves: str
    inject: Step
    heal: Step | None = None
    detected: Probe | None = None
    # metric -> the most it may be (the drill fails when any is exceeded)
    objectives: Mapping[str, float] = field(default_factory=dict)
    # metric -> the least it must be (a fault that was never exercised proves nothing)
    floors: Mapping[str, float] = field(default_factory=dict)
    expects_bounces: bool = False
    # Detection is the first 4xx a sender saw (the cluster telling clients it is in trouble).
    detected_by_clients: bool = False
    # Configuration for this drill on top of the drills' own (runner.DRILL_CONFIG).
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # The load's rate (msg/s) when the scenario's claim depends on it (None: the run's rate).
    rate: float | None = None
    # Runs on a Sentinel set (a primary, two replicas, three Sentinels) instead of one Redis.
    sentinel: bool = False
    # Runs on a Redis Cluster (3 primaries, a replica each) instead of one Redis.
    redis_cluster: bool = False
    # Runs in network namespaces (testing.netns_cluster): needs root and `ip` (drills.netfaults).
    netns: bool = False
    # Replication is asynchronous: only `durability: replicated` promises that a 250 survives
    # the loss of the primary, so in the other modes `lost` is measured, not held to 0.
    lossless_only_when_replicated: bool = False
    # metric -> the open bug that makes it miss its objective: still measured and shown in the
    # report ("known issue"), but not failing the verdict until the fix lands.
    known_issues: Mapping[str, str] = field(default_factory=dict)

    def objectives_for(self, durability: Durability) -> dict[str, float]:
        if self.lossless_only_when_replicated and durability is not Durability.REPLICATED:
            return {k: v for k, v in self.objectives.items() if k != "lost"}
        return dict(self.objectives)
