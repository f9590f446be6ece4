"""The class-priority drill, short (issue #14): a bulk backlog from a relay outage drains
behind transactional mail, which reaches the relays within seconds of the heal."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpfleet.drills.report import write_reports
from smtpfleet.drills.runner import run_drill
from smtpfleet.drills.scenarios import SCENARIOS
from smtpfleet.drills.timing import Timing

pytestmark = [pytest.mark.timeout(40), pytest.mark.slow, pytest.mark.solo]


async def test_transactional_mail_goes_first_after_an_outage_with_a_bulk_backlog(
    tmp_path: Path,
) -> None:
    result = await run_drill(SCENARIOS["class-priority"], Timing.short())
    paths = write_reports(result, tmp_path)
    assert result.passed, f"class-priority missed: {result.failures}"
    m = result.metrics
    assert (m["lost"], m["bulk_lost"], m["duplicates"]) == (0, 0, 0)
    assert m["bulk_accepted"] == 400
    # The outage left transactional mail queued too, and it beat most of the bulk.
    assert isinstance(m["transactional_backlog"], int)
    assert m["transactional_backlog"] > 10
    assert isinstance(m["bulk_ahead_pct"], float)
    assert m["bulk_ahead_pct"] <= 30
    wait, drain = m["transactional_wait_after_heal_s"], m["bulk_drain_s"]
    assert isinstance(wait, float)
    assert isinstance(drain, float)
    assert wait < drain  # bulk drained behind it
    assert paths[1].read_text().startswith("# Drill `class-priority`: PASS")
