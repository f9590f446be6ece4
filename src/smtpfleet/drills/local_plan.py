"""What `smtpfleet drill SCENARIO --dry-run` prints for a local cluster: what each drill would
start, load and break, and what it must hold, with nothing started (no Redis, no node, no
namespace: even the check for network namespaces creates one, so it is not made here)."""

from __future__ import annotations

from collections.abc import Sequence

from smtpfleet.config import Durability
from smtpfleet.drills.context import Scenario
from smtpfleet.drills.runner import DRILL_CONFIG, PEAK_S
from smtpfleet.drills.scenarios import SCENARIOS
from smtpfleet.drills.timing import Timing
from smtpfleet.testing.localcluster import deep_merge


def local_plan(names: Sequence[str], timing: Timing, load: str, durability: str | None) -> str:
    """The plan of each named drill on a local cluster (`durability`: --durability, if any)."""
    phases = (
        f"warm-up {timing.warmup_s:g} s, fault {timing.fault_s:g} s, "
        f"recovery {timing.recovery_s:g} s, then up to {timing.settle_s:g} s for deliveries"
    )
    if timing.rate_fraction is not None:
        phases = f"{PEAK_S:g} s of unpaced load to measure the peak, then " + phases
    lines = [
        "drill plan for a local cluster (--dry-run: nothing is started):",
        f"  load    {load}",
        f"  phases  {phases}",
    ]
    for name in names:
        scenario = SCENARIOS[name]
        lines.append(f"  {name}: {scenario.proves}")
        mode = durability or deep_merge(DRILL_CONFIG, scenario.overrides)["queue"]["durability"]
        lines.append(f"  {' ' * len(name)}  on {_cluster(scenario, timing, mode)}")
        lines.append(f"  {' ' * len(name)}  must hold {_objectives(scenario, Durability(mode))}")
    return "\n".join(lines)


def _cluster(scenario: Scenario, timing: Timing, mode: str) -> str:
    if scenario.sentinel:
        redis = "a Sentinel set (a primary, 2 replicas, 3 Sentinels)"
    elif scenario.redis_cluster:
        redis = "a Redis Cluster (3 primaries, a replica each; needs valkey-cli)"
    else:
        redis = "one Redis server"
    where = " in network namespaces (needs root, ip and tc)" if scenario.netns else ""
    rate = f", load at its own {scenario.rate:g} msg/s" if scenario.rate is not None else ""
    return f"{timing.nodes} nodes, 2 sink relays and {redis}{where}, durability {mode}{rate}"


def _objectives(scenario: Scenario, durability: Durability) -> str:
    objectives = scenario.objectives_for(durability)
    bounds = [f"{name} ≤ {bound:g}" for name, bound in objectives.items()]
    bounds += [f"{name} ≥ {floor:g}" for name, floor in scenario.floors.items()]
    return ", ".join(bounds) or "(reported only)"
