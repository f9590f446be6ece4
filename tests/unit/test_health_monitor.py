"""The health monitor on the in-memory store and scripted probes: active rise/fall, passive
ejection, the quorum verdict across nodes' views, operator pauses, Redis away."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from smtpfleet.config import HealthConfig, RelayConfig
from smtpfleet.delivery.classify import (
    Verdict,
    classify_exception,
    classify_reply,
    unsendable,
)
from smtpfleet.health.checker import HealthMonitor
from smtpfleet.metrics import Metrics
from smtpfleet.testing.memory import MemoryClusterStore, MemoryQueue

RELAYS = [RelayConfig(name=f"relay-{i}", host=f"10.0.0.{i}") for i in (1, 2, 3, 4)]
CONFIG = HealthConfig(fall=2, rise=2, passive_failures=3, max_ejection_percent=50)


@dataclass
class Bench:
    down: set[str] = field(default_factory=set)  # relays whose probes fail
    live: set[str] = field(default_factory=lambda: {"node-a"})
    store: MemoryClusterStore = field(default_factory=lambda: MemoryClusterStore(MemoryQueue()))
    monitor: HealthMonitor = field(init=False)

    def __post_init__(self) -> None:
        self.monitor = HealthMonitor(
            relays=RELAYS,
            config=CONFIG,
            store=self.store,
            node_id="node-a",
            helo="mx.test",
            live_nodes=lambda: self.live,
            metrics=Metrics(),
            probe=self.probe,
        )

    async def probe(self, relay: RelayConfig) -> tuple[bool, str]:
        return (False, "connection refused") if relay.name in self.down else (True, "ok")


@pytest.fixture
def bench() -> Bench:
    return Bench()


async def test_a_relay_goes_down_after_fall_failed_probes_and_back_after_rise(
    bench: Bench,
) -> None:
    bench.down = {"relay-1"}
    await bench.monitor.check_once()
    assert "relay-1" in bench.monitor.healthy  # one failure is not `fall`

    await bench.monitor.check_once()
    assert "relay-1" not in bench.monitor.healthy
    assert bench.store.view_of["node-a"]["relay-1"] is False

    bench.down = set()
    await bench.monitor.check_once()
    assert "relay-1" not in bench.monitor.healthy
    await bench.monitor.check_once()
    assert "relay-1" in bench.monitor.healthy


async def test_one_node_alone_does_not_evict_a_relay_for_the_cluster(bench: Bench) -> None:
    bench.live = {"node-a", "node-b", "node-c"}
    bench.store.view_of = {"node-b": {"relay-1": True}, "node-c": {"relay-1": True}}
    bench.down = {"relay-1"}
    for _ in range(CONFIG.fall):
        await bench.monitor.check_once()

    assert bench.monitor.verdict["relay-1"] is True  # the cluster still routes to it
    assert "relay-1" not in bench.monitor.healthy  # this node avoids it itself


async def test_a_majority_of_live_nodes_evicts_a_relay(bench: Bench) -> None:
    bench.live = {"node-a", "node-b", "node-c"}
    bench.store.view_of = {"node-b": {"relay-2": False}, "node-c": {"relay-2": False}}
    bench.store.view_of["node-x"] = {"relay-3": False}  # not live: its view does not count

    await bench.monitor.check_once()

    assert bench.monitor.verdict["relay-2"] is False
    assert bench.monitor.verdict["relay-3"] is True
    assert bench.monitor.healthy == {"relay-1", "relay-3", "relay-4"}


async def test_paused_relays_get_no_traffic(bench: Bench) -> None:
    bench.store.paused = {"relay-4"}

    await bench.monitor.check_once()

    assert bench.monitor.healthy == {"relay-1", "relay-2", "relay-3"}
    assert bench.monitor.paused == {"relay-4"}


async def test_redis_away_keeps_the_last_cluster_verdict(bench: Bench) -> None:
    bench.live = {"node-a", "node-b", "node-c"}
    bench.store.view_of = {"node-b": {"relay-2": False}, "node-c": {"relay-2": False}}
    await bench.monitor.check_once()
    bench.store.unavailable = True
    bench.store.view_of = {}

    await bench.monitor.check_once()

    assert bench.monitor.verdict["relay-2"] is False
    assert "relay-2" not in bench.monitor.healthy


def test_passive_checks_eject_a_relay_that_keeps_failing_to_talk(bench: Bench) -> None:
    trouble = classify_exception(ConnectionRefusedError("refused"))
    for _ in range(CONFIG.passive_failures - 1):
        bench.monitor.record("relay-1", {"r@x": trouble})
    assert "relay-1" in bench.monitor.healthy

    bench.monitor.record("relay-1", {"r@x": trouble})

    assert "relay-1" not in bench.monitor.healthy
    assert bench.monitor.own_view()["relay-1"] is False


@pytest.mark.parametrize(
    "verdict",
    [
        classify_reply(550, "5.1.1 no such user"),
        classify_reply(451, "4.3.0 try later"),
        unsendable("bad\x01@x", sender=False),
    ],
    ids=["5xx", "4xx", "unsendable"],
)
def test_answers_about_the_message_are_not_relay_trouble(bench: Bench, verdict: Verdict) -> None:
    for _ in range(CONFIG.passive_failures * 2):
        bench.monitor.record("relay-1", {"r@x": verdict})

    assert "relay-1" in bench.monitor.healthy


def test_a_421_is_relay_trouble(bench: Bench) -> None:
    closing = classify_reply(421, "4.3.2 shutting down")
    for _ in range(CONFIG.passive_failures):
        bench.monitor.record("relay-2", {"r@x": closing})

    assert "relay-2" not in bench.monitor.healthy
