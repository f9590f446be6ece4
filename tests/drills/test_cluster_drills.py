"""The Redis Cluster drills (issue #10), short form: a real 3-primary, 3-replica cluster on
loopback under a 3-node fleet. A primary is killed (or a shard's slot moved) under load, and
the report must show that the slot changed primary and that, with `durability: replicated`,
no acknowledged message was lost and no sender saw a 5xx."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpfleet.drills.cluster_ha import REDIS_CLUSTER_SCENARIOS
from smtpfleet.drills.report import write_reports
from smtpfleet.drills.runner import run_drill
from smtpfleet.drills.timing import Timing
from smtpfleet.testing.redis_cluster import find_cli_binary
from smtpfleet.testing.tools import unavailable

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow, pytest.mark.solo]

BY_NAME = {s.name: s for s in REDIS_CLUSTER_SCENARIOS}


@pytest.fixture(autouse=True)
def _cluster_tools() -> None:
    try:
        find_cli_binary()
    except RuntimeError as exc:
        unavailable(f"cannot build a Redis Cluster here: {exc}")


def _int(value: object) -> int:
    assert isinstance(value, int), value
    return value


async def test_killing_a_cluster_primary_under_load_loses_no_acknowledged_message(
    tmp_path: Path,
) -> None:
    result = await run_drill(BY_NAME["redis-cluster-primary-kill"], Timing.short())
    assert result.passed, result.failures
    assert result.settings["durability"] == "replicated"  # the only mode that promises this
    metrics = result.metrics
    assert _int(metrics["accepted"]) > 50
    assert metrics["lost"] == 0
    assert metrics["client_5xx"] == 0
    # The kill happened and the cluster noticed: another primary serves the slot.
    assert metrics["slot_moved"] == 1
    detection = metrics["detection_s"]
    assert isinstance(detection, float)
    assert 0 < detection <= 10
    # Measured, still waived: a heartbeat may land a lease late behind the cluster client's
    # reset of every connection (a known issue, docs/drills.md; 12 of 13 kills gave 0).
    assert isinstance(metrics["takeovers"], int)
    assert isinstance(metrics["live_declared_dead"], int)
    paths = write_reports(result, tmp_path)
    report = paths[1].read_text()
    assert report.startswith("# Drill `redis-cluster-primary-kill`: PASS")
    assert "| slot_moved | 1 | ≥ 1 |" in report


async def test_moving_a_shards_slot_under_load_loses_nothing_and_delivers_once() -> None:
    result = await run_drill(BY_NAME["redis-cluster-reshard"], Timing.short())
    assert result.passed, result.failures
    metrics = result.metrics
    assert _int(metrics["accepted"]) > 50
    assert metrics["slot_moved"] == 1
    assert metrics["lost"] == 0
    assert metrics["duplicates"] == 0
    assert metrics["client_errors"] == 0
