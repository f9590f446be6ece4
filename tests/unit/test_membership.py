"""Membership on the in-memory store: heartbeats, takeover of dead nodes, self-fencing, drain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from smtpfleet.cluster.drift import fingerprint
from smtpfleet.cluster.membership import Membership
from smtpfleet.config import ClusterConfig
from smtpfleet.envelope import QueuedMessage, new_qid
from smtpfleet.metrics import Metrics
from smtpfleet.queue.deliveries import Delivery
from smtpfleet.testing.memory import Clock, MemoryClusterStore, MemoryQueue

CONFIG = ClusterConfig(heartbeat_interval_s=1.0, lease_s=5.0, lease_refresh_s=1.0)


@dataclass
class Seconds:
    """A monotonic clock that moves with the wall clock of the test."""

    wall: Clock

    def __call__(self) -> float:
        return self.wall.ms / 1000


@dataclass
class Bench:
    clock: Clock = field(default_factory=Clock)
    adopted: list[Delivery] = field(default_factory=list)
    drains: list[str] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    queue: MemoryQueue = field(init=False)
    store: MemoryClusterStore = field(init=False)
    node: Membership = field(init=False)

    def __post_init__(self) -> None:
        self.queue = MemoryQueue(clock=self.clock)
        self.store = MemoryClusterStore(self.queue)
        self.node = Membership(
            store=self.store,
            config=CONFIG,
            node_id="node-a",
            adopt=self.adopted.extend,
            metrics=self.metrics,
            on_drain_request=lambda: self.drains.append("node-a"),
            clock=Seconds(self.clock),
            wall_ms=self.clock,
        )

    def pending_for(self, consumer: str) -> Delivery:
        return self.queue.hand_out(QueuedMessage(new_qid(0), "s@x", ("r@y",), 0), consumer)


@pytest.fixture
def bench() -> Bench:
    return Bench()


async def test_a_tick_writes_the_heartbeat(bench: Bench) -> None:
    await bench.node.tick()

    assert bench.store.heartbeats == {"node-a": bench.clock.ms}
    assert bench.store.info["node-a"]["role"] == "active"
    assert bench.node.live == {"node-a"}


async def test_a_node_silent_for_a_lease_is_taken_over(bench: Bench) -> None:
    bench.store.heartbeats["node-b"] = bench.clock.ms
    entry = bench.pending_for("node-b")
    bench.clock.advance(CONFIG.lease_s)

    await bench.node.tick()

    assert bench.node.live == {"node-a"}
    assert [d.key for d in bench.adopted] == [entry.key]
    assert bench.queue.pending_of("node-a") == [entry.key]
    assert bench.metrics.registry.get_sample_value("smtpfleet_takeovers_total") == 1
    assert "node-b" in bench.store.heartbeats  # forgotten only once nothing is left pending

    await bench.node.tick()
    assert "node-b" not in bench.store.heartbeats


async def test_a_live_node_is_left_alone(bench: Bench) -> None:
    bench.store.heartbeats["node-b"] = bench.clock.ms
    bench.pending_for("node-b")
    bench.clock.advance(CONFIG.lease_s - 0.1)

    await bench.node.tick()

    assert bench.node.live == {"node-a", "node-b"}
    assert bench.adopted == []
    assert len(bench.queue.pending_of("node-b")) == 1


async def test_entries_touched_within_the_guard_are_not_claimed(bench: Bench) -> None:
    """The min-idle guard: an entry the dead node (or another survivor) touched just now is
    not claimed again, so exactly one survivor gets each entry."""
    bench.clock.advance(CONFIG.lease_s)  # a lease of contact: peers' beats now say something
    bench.store.heartbeats["node-b"] = bench.clock.ms - int(CONFIG.lease_s * 1000)
    bench.pending_for("node-b")  # delivered to node-b just now

    await bench.node.tick()

    assert bench.adopted == []
    assert "node-b" in bench.store.heartbeats  # still has work pending
    bench.clock.advance(2 * CONFIG.heartbeat_interval_s)
    await bench.node.tick()
    assert len(bench.adopted) == 1


async def test_the_node_fences_itself_one_interval_before_its_lease_runs_out(
    bench: Bench,
) -> None:
    await bench.node.tick()
    bench.store.unavailable = True
    bench.clock.advance(CONFIG.lease_s - CONFIG.heartbeat_interval_s - 0.1)
    await bench.node.tick()
    assert not bench.node.fenced

    bench.clock.advance(0.1)
    await bench.node.tick()
    assert bench.node.fenced

    bench.store.unavailable = False
    await bench.node.tick()
    assert not bench.node.fenced


async def test_an_operator_drain_request_reaches_the_node(bench: Bench) -> None:
    await bench.node.tick()
    assert bench.drains == []
    bench.store.drain_requests.add("node-a")

    await bench.node.tick()
    await bench.node.tick()

    assert bench.drains == ["node-a"]  # once: the request is used up


async def test_leaving_deregisters_only_when_nothing_is_pending(bench: Bench) -> None:
    await bench.node.tick()
    bench.pending_for("node-a")
    await bench.node.leave()
    assert "node-a" in bench.store.heartbeats  # survivors must still find its work

    bench.queue.pending.clear()
    await bench.node.leave()
    assert "node-a" not in bench.store.heartbeats


async def _silent_peer_is_judged_only_after_a_lease(bench: Bench) -> None:
    """node-b's last beat is a lease old and it has work pending: left alone now, taken over
    once node-b stays silent through a whole lease of our contact with Redis."""
    bench.store.heartbeats["node-b"] = bench.clock.ms - int((CONFIG.lease_s + 1) * 1000)
    bench.pending_for("node-b")
    bench.clock.advance(2 * CONFIG.heartbeat_interval_s)  # past the claim guard
    await bench.node.tick()
    assert "node-b" in bench.node.live
    assert bench.adopted == []
    bench.clock.advance(CONFIG.lease_s)  # node-b stayed silent through a lease of contact
    await bench.node.tick()
    assert "node-b" not in bench.node.live
    assert len(bench.adopted) == 1


async def test_back_from_a_redis_outage_peers_are_not_judged_for_a_lease(bench: Bench) -> None:
    """Nobody's heartbeat landed while Redis was away (a failover): a node that judged its
    peers the moment it was back would take over every live node's work."""
    bench.clock.advance(CONFIG.lease_s)
    await bench.node.tick()
    bench.store.unavailable = True
    bench.clock.advance(CONFIG.lease_s + 1)
    await bench.node.tick()
    bench.store.unavailable = False
    await _silent_peer_is_judged_only_after_a_lease(bench)


async def test_heartbeats_lost_in_a_failover_hold_judgement_for_a_lease(bench: Bench) -> None:
    """A forced failover loses the writes that went to the old primary without an error: the
    node sees it only because its own last heartbeat is not there. Its peers' beats of that
    time are lost too, so it must not take their work as if they had died."""
    bench.clock.advance(CONFIG.lease_s)
    await bench.node.tick()
    written = bench.store.heartbeats["node-a"]
    bench.clock.advance(CONFIG.lease_s + 1)  # our beats and node-b's land on a doomed primary
    bench.store.heartbeats["node-a"] = written - 1000  # the new primary has an older one
    await _silent_peer_is_judged_only_after_a_lease(bench)


async def test_a_node_removed_as_dead_while_it_lived_holds_judgement_too(bench: Bench) -> None:
    bench.clock.advance(CONFIG.lease_s)
    await bench.node.tick()
    del bench.store.heartbeats["node-a"]  # a peer judged us dead on lost beats and forgot us
    bench.store.heartbeats["node-b"] = bench.clock.ms - int((CONFIG.lease_s + 1) * 1000)
    bench.pending_for("node-b")
    bench.clock.advance(2 * CONFIG.heartbeat_interval_s)
    await bench.node.tick()
    assert bench.adopted == []


def _with_fingerprint(bench: Bench, relays: list[str]) -> Membership:
    sections = {"relays": [{"name": n, "host": n} for n in relays], "routing": {}}
    return Membership(
        store=bench.store,
        config=CONFIG,
        node_id="node-a",
        adopt=bench.adopted.extend,
        metrics=bench.metrics,
        fingerprint=fingerprint(sections),
        clock=Seconds(bench.clock),
        wall_ms=bench.clock,
    )


async def _tick_after_a_lease(bench: Bench, node: Membership) -> None:
    """Peers are judged (and compared) only after a whole lease of contact."""
    await node.tick()
    bench.clock.advance(CONFIG.lease_s)
    bench.store.heartbeats["node-b"] = bench.clock.ms
    await node.tick()


def _drift(bench: Bench) -> tuple[float | None, float | None]:
    sample = bench.metrics.registry.get_sample_value
    return sample("smtpfleet_config_drift"), sample("smtpfleet_config_fingerprints")


async def test_the_heartbeat_carries_the_fingerprint_and_a_differing_peer_is_drift(
    bench: Bench,
) -> None:
    node = _with_fingerprint(bench, ["r1", "r2"])
    other = fingerprint({"relays": [{"name": "r1", "host": "r1"}], "routing": {}})
    bench.store.heartbeats["node-b"] = bench.clock.ms
    bench.store.info["node-b"] = {"config": other.as_dict()}

    await _tick_after_a_lease(bench, node)

    assert bench.store.info["node-a"]["config"]["parts"].keys() == {
        "relay r1",
        "relay r2",
        "routing",
    }
    assert _drift(bench) == (1, 2)
    assert node.peer_fingerprints == {"node-b": other.digest}

    bench.store.info["node-b"] = dict(bench.store.info["node-a"])
    bench.store.heartbeats["node-b"] = bench.clock.ms
    await node.tick()

    assert _drift(bench) == (0, 1)


async def test_a_peer_that_publishes_no_fingerprint_is_no_drift(bench: Bench) -> None:
    node = _with_fingerprint(bench, ["r1"])
    bench.store.heartbeats["node-b"] = bench.clock.ms
    bench.store.info["node-b"] = {"role": "active"}

    await _tick_after_a_lease(bench, node)

    assert _drift(bench) == (0, 1)


@dataclass
class StuckStore(MemoryClusterStore):
    """A store whose heartbeat write or takeover claim hangs until released (a primary that
    stopped answering holds the call until the socket timeout, or longer with retries)."""

    hang_heartbeat: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    claiming: asyncio.Event = field(default_factory=asyncio.Event)
    beaten: asyncio.Event = field(default_factory=asyncio.Event)

    async def heartbeat(
        self, node_id: str, now_ms: int, info: Mapping[str, Any], ttl_ms: int
    ) -> int | None:
        if self.hang_heartbeat:
            await self.release.wait()
        self.beaten.set()
        return await super().heartbeat(node_id, now_ms, info, ttl_ms)

    async def next_beats(self, count: int) -> None:
        for _ in range(count):
            self.beaten.clear()
            await self.beaten.wait()

    async def claim_from(self, dead: str, me: str, min_idle_ms: int, count: int) -> list[Delivery]:
        self.claiming.set()
        await self.release.wait()
        return await super().claim_from(dead, me, min_idle_ms, count)


def _on(store: StuckStore, bench: Bench, config: ClusterConfig = CONFIG) -> Membership:
    return Membership(
        store=store,
        config=config,
        node_id="node-a",
        adopt=bench.adopted.extend,
        metrics=bench.metrics,
        clock=Seconds(bench.clock),
        wall_ms=bench.clock,
    )


async def test_a_heartbeat_that_hangs_fences_the_node_though_no_write_failed(
    bench: Bench,
) -> None:
    """Peers date us by our last beat that landed; a write still waiting says nothing."""
    store = StuckStore(bench.queue)
    node = _on(store, bench)
    await node.tick()
    store.hang_heartbeat = True
    beat = asyncio.create_task(node.tick())
    bench.clock.advance(CONFIG.lease_s - CONFIG.heartbeat_interval_s - 0.1)
    assert not node.fenced

    bench.clock.advance(0.1)
    assert node.fenced  # before any peer may judge us dead, with no error seen

    store.release.set()
    await beat
    assert not node.fenced


async def test_beats_go_on_while_a_takeover_is_stuck(bench: Bench) -> None:
    """The drill's cascade: a takeover's claims stalled the beats of the node taking over, so
    it looked dead in turn. Beats have a loop of their own."""
    fast = ClusterConfig(heartbeat_interval_s=0.01, lease_s=0.05, lease_refresh_s=0.01)
    store = StuckStore(bench.queue)
    node = _on(store, bench, fast)
    await node.tick()
    bench.clock.advance(fast.lease_s)  # a lease of contact, and node-b's beat a lease old
    store.heartbeats["node-b"] = 0
    bench.pending_for("node-b")
    bench.clock.advance(fast.lease_s)
    running = asyncio.create_task(node.run())
    try:
        await asyncio.wait_for(store.claiming.wait(), timeout=5)
        await asyncio.wait_for(store.next_beats(3), timeout=5)
        assert not node.fenced
        store.release.set()
        await asyncio.wait_for(store.next_beats(3), timeout=5)
        assert len(bench.adopted) == 1
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


@dataclass
class SplitStore(MemoryClusterStore):
    """Beats acknowledged by a server the members are not read from: a killed primary back
    and still believing it is one, or Sentinel's pool holding connections to old and new."""

    zombie: dict[str, int] | None = None

    async def heartbeat(
        self, node_id: str, now_ms: int, info: Mapping[str, Any], ttl_ms: int
    ) -> int | None:
        if self.zombie is None:
            return await super().heartbeat(node_id, now_ms, info, ttl_ms)
        previous = self.zombie.get(node_id)
        self.zombie[node_id] = now_ms
        return previous


async def test_a_members_read_without_our_own_last_beat_judges_no_peer_and_fences(
    bench: Bench,
) -> None:
    """Peers' beats written to the same lost server are missing from that read too: node-b
    only looks a lease old. The heartbeat's own answer says nothing wrong here."""
    store = SplitStore(bench.queue)
    node = _on(store, bench)
    await node.tick()
    store.heartbeats["node-b"] = bench.clock.ms
    bench.pending_for("node-b")
    bench.clock.advance(CONFIG.lease_s)
    store.zombie = dict(store.heartbeats)

    await node.tick()

    assert bench.adopted == []
    assert "node-b" in node.live
    assert node.fenced  # node-b, reading the same, sees us silent
    store.zombie = None  # writes land where they are read again: a lease of contact first
    await node.tick()
    assert not node.fenced
    bench.clock.advance(CONFIG.lease_s)
    await node.tick()
    assert len(bench.adopted) == 1  # node-b, still silent, is dead after all
