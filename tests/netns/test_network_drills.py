"""Faults in the network itself: the cluster in network namespaces, packets dropped, delayed
and lost on the wire between addresses the test created (smtpfleet.testing.netns).

Needs root and iproute2; elsewhere every test here is skipped, saying why."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpfleet.drills.report import write_reports
from smtpfleet.drills.runner import run_drill
from smtpfleet.drills.scenarios import SCENARIOS
from smtpfleet.drills.timing import Timing

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow, pytest.mark.solo]

NETWORK = [name for name, scenario in SCENARIOS.items() if scenario.netns]
# Shorter than Timing.short(): four drills must fit CI's budget (about 17 s each here).
TIMING = Timing(warmup_s=3.0, fault_s=3.0, recovery_s=3.0, settle_s=25.0, rate=30.0)


def test_every_network_fault_of_issue_15_is_a_drill() -> None:
    assert NETWORK == ["net-redis-cut", "net-relay-cut", "net-redis-slow", "net-partition"]


@pytest.mark.parametrize("name", NETWORK)
async def test_network_drill_meets_its_objectives(name: str, tmp_path: Path) -> None:
    result = await run_drill(SCENARIOS[name], TIMING)
    write_reports(result, tmp_path)
    metrics = result.metrics
    assert result.passed, f"{name} missed: {result.failures}"
    assert isinstance(metrics["accepted"], int)
    assert metrics["accepted"] > 100
    assert metrics["lost"] == 0
    assert metrics["delivered"] == metrics["accepted"]
    assert metrics["client_5xx"] == 0
    CHECKS[name](metrics)


Metrics = dict[str, float | int | None]


def _redis_cut(metrics: Metrics) -> None:
    assert metrics["cut_node_reply"] == 451  # on the wire, from the node cut off from Redis
    assert metrics["cut_node_fenced"] == 1  # its log: "... stops starting deliveries"
    assert isinstance(metrics["takeovers"], int)
    assert metrics["takeovers"] >= 1  # the survivors claimed what it had pending


def _relay_cut(metrics: Metrics) -> None:
    assert metrics["cut_node_sees_relay_down"] == 1  # node-1's own view: relay-1 down
    assert metrics["nodes_evicting_relay"] == 0  # but no node's cluster verdict evicts it
    assert isinstance(metrics["relay_deliveries_in_fault"], int)
    assert metrics["relay_deliveries_in_fault"] > 0  # and the others still deliver to it


def _redis_slow(metrics: Metrics) -> None:
    assert isinstance(metrics["fault_p99_ms"], float)
    assert metrics["fault_p99_ms"] >= 200  # the accepts felt the latency
    assert metrics["live_declared_dead"] == 0


def _partition(metrics: Metrics) -> None:
    assert metrics["live_declared_dead"] == 0  # node-3 was never judged dead
    assert metrics["client_errors"] == 0  # senders found node-3 after the 4xx of the others


CHECKS = {
    "net-redis-cut": _redis_cut,
    "net-relay-cut": _relay_cut,
    "net-redis-slow": _redis_slow,
    "net-partition": _partition,
}


async def test_net_redis_cut_on_an_ipv6_fabric(tmp_path: Path) -> None:
    """The same drill with every member on IPv6 (fd5f:…::/64): the cut must take IPv6 for
    node-1 to lose Redis at all."""
    result = await run_drill(SCENARIOS["net-redis-cut"], TIMING, ipv6=True)
    write_reports(result, tmp_path)
    assert str(result.settings["fabric"]).startswith("fd5f:")
    assert result.passed, f"net-redis-cut on IPv6 missed: {result.failures}"
    assert result.metrics["lost"] == 0
    _redis_cut(result.metrics)
