"""A drill's report names the acknowledged messages it lost, so an operator can look them up."""

from __future__ import annotations

from smtpfleet.drills.report import markdown
from smtpfleet.drills.verdict import DrillResult


def _result(lost: list[str]) -> DrillResult:
    return DrillResult(
        scenario="redis-failover",
        proves="a forced failover loses nothing acknowledged",
        metrics={"lost": len(lost)},
        objectives={"lost": 0},
        failures=[f"lost = {len(lost)} > 0"] if lost else [],
        timeline=[],
        latencies=[],
        marks={"inject": 3.0},
        lost=lost,
    )


def test_the_report_lists_the_lost_messages_message_ids() -> None:
    page = markdown(_result(["<m-7@load.test>", "<m-9@load.test>"]), None)
    assert "Acknowledged, never delivered (Message-IDs):" in page
    assert "- `<m-7@load.test>`" in page
    assert "- `<m-9@load.test>`" in page


def test_a_run_that_lost_nothing_has_no_such_list() -> None:
    assert "never delivered" not in markdown(_result([]), None)
