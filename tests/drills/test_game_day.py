"""Game day: `smtpfleet drill --all --out DIR` ends with one summary page over every drill."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import smtpfleet.testing.netns
from smtpfleet.cli import drill as drill_cli
from smtpfleet.cli import main
from smtpfleet.drills.scenarios import SCENARIOS
from smtpfleet.drills.summary import Entry, write_summary
from smtpfleet.drills.verdict import DrillResult, Sample

TWO = ("relay-down", "kill-node")


def _row(page: str, name: str) -> list[str]:
    line = next(line for line in page.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.slow
@pytest.mark.solo
@pytest.mark.timeout(150)
def test_a_game_day_ends_with_one_summary_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(drill_cli, "SCENARIOS", {n: SCENARIOS[n] for n in TWO})
    code = main(["drill", "--all", "--duration", "8", "--rate", "30", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"game day summary -> {tmp_path / 'summary.md'}" in out
    page = (tmp_path / "summary.md").read_text()
    assert page.startswith("# Game day: local cluster\n")
    assert "2 scenarios ran: 2 passed, 0 failed." in page
    for name in TWO:
        cells = _row(page, name)
        # scenario, injected, detected, RTO, accepts again, lost, duplicates, 4xx/5xx, verdict
        assert cells[5] == "0", cells
        assert cells[8] == "**PASS**", cells
        assert f"[md]({name}.md)" in cells[9], cells
        assert (tmp_path / f"{name}.md").exists()
    kill = _row(page, "kill-node")
    assert kill[1].startswith("SIGKILL of a node mid-delivery at ")
    assert 0 < float(kill[2]) <= 10  # the takeover was seen
    assert float(_row(page, "relay-down")[2]) <= 3  # the relay was ejected
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "summary.png").stat().st_size > 10_000
        assert "![every scenario's timeline](summary.png)" in page


def _result(name: str, *, passed: bool) -> DrillResult:
    timeline = [Sample(t / 4, int(t * 7), int(t * 7)) for t in range(40)]
    metrics: dict[str, float | int | None] = {
        "lost": 0 if passed else 3,
        "duplicates": 1,
        "detection_s": 1.5,
        "rto_s": 2.0,
        "accept_rto_s": 0.0,
        "client_4xx": 4,
        "client_5xx": 0,
    }
    return DrillResult(
        name,
        f"{name} breaks: and it holds",
        metrics,
        {"lost": 0},
        [] if passed else ["lost = 3 > 0"],
        timeline,
        [],
        {"inject": 3.0, "heal": 6.0, "detected": 4.5},
        settings={"rate": 30.0, "commands": [{"command": f"kubectl {name}", "exit": 0}]},
    )


def test_without_matplotlib_the_page_is_written_and_says_how_to_get_the_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    entries = [
        Entry("relay-down", _result("relay-down", passed=True), [tmp_path / "relay-down.md"]),
        Entry("redis-restart", _result("redis-restart", passed=False), []),
        Entry("net-redis-cut", skipped="network namespaces need root (this runs as uid 1000)"),
    ]
    assert write_summary(entries, tmp_path, "target staging") == [tmp_path / "summary.md"]
    page = (tmp_path / "summary.md").read_text()
    assert "2 scenarios ran: 1 passed, 1 failed; 1 skipped." in page
    assert "pip install -e '.[drills]'" in page
    assert _row(page, "relay-down")[1:9] == [
        "relay-down breaks at 3.0 s", "1.5", "2", "0", "0", "1", "4 / 0", "**PASS**"
    ]  # fmt: skip
    assert _row(page, "redis-restart")[8] == "**FAIL**"
    assert "- missed: lost = 3 > 0" in page
    assert "skipped: network namespaces need root (this runs as uid 1000)" in page
    assert "- relay-down: `kubectl relay-down` (exit 0)" in page  # what a target's drill ran
    assert not (tmp_path / "summary.png").exists()


def test_the_drill_cli_says_plainly_when_network_drills_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = "network namespaces need root (this runs as uid 1000)"
    monkeypatch.setattr(smtpfleet.testing.netns, "unavailable_reason", lambda: reason)
    assert main(["drill", "net-redis-cut", "--out", str(tmp_path)]) == 0
    assert f"net-redis-cut      SKIP  {reason}" in capsys.readouterr().out
