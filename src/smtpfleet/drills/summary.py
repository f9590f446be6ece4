"""The game-day page: every drill of a run on one page, for the review.

`smtpfleet drill --all [--target FILE] --out DIR` ends by writing `DIR/summary.md` (a table:
what was injected, when it was detected, how long recovery took, what was lost and duplicated,
the verdict, a link to each drill's own report) and `DIR/summary.png` (every scenario's
timeline side by side, small multiples on one figure). The picture needs matplotlib
(`pip install -e '.[drills]'`); without it the Markdown is written and says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smtpfleet.drills.report import delivered_rates
from smtpfleet.drills.verdict import DrillResult

SUMMARY_NAME = "summary"
COLUMNS = 3  # small multiples per row
NO_PICTURE = "(no picture: it needs matplotlib, `pip install -e '.[drills]'`)"


@dataclass(frozen=True)
class Entry:
    """One scenario of the run: its result and report files, or why it was skipped."""

    name: str
    result: DrillResult | None = None
    reports: Sequence[Path] = field(default_factory=list)
    skipped: str | None = None


def write_summary(entries: Sequence[Entry], out_dir: Path, title: str) -> list[Path]:
    """summary.md, and summary.png when matplotlib is there; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = _plot(
        [e.result for e in entries if e.result is not None], out_dir / f"{SUMMARY_NAME}.png"
    )
    page = out_dir / f"{SUMMARY_NAME}.md"
    page.write_text(markdown(entries, title, picture, out_dir), encoding="utf-8")
    return [page] if picture is None else [page, picture]


def _injected(result: DrillResult) -> str:
    """The fault, from the scenario's one-line claim ("what: what must hold")."""
    return result.proves.split(":", 1)[0].replace("|", "\\|")  # a table cell


def _seconds(value: object) -> str:
    return "–" if value is None else f"{value:g}" if isinstance(value, int | float) else str(value)


def _row(entry: Entry, out_dir: Path) -> str:
    if entry.result is None:
        return f"| {entry.name} | – | – | – | – | – | – | – | skipped: {entry.skipped} | – | – |"
    result, metrics = entry.result, entry.result.metrics
    verdict = "**PASS**" if result.passed else "**FAIL**"
    if result.waived:
        verdict += f" ({len(result.waived)} known issue{'s' if len(result.waived) > 1 else ''})"
    links = ", ".join(f"[{p.suffix[1:]}]({_relative(p, out_dir)})" for p in entry.reports)
    return (
        f"| {entry.name} | {_injected(result)} at {result.marks['inject']:.1f} s "
        f"| {_seconds(metrics.get('detection_s'))} | {_seconds(metrics.get('rto_s'))} "
        f"| {_seconds(metrics.get('accept_rto_s'))} | {_seconds(metrics.get('lost'))} "
        f"| {_seconds(metrics.get('duplicates'))} "
        f"| {_seconds(metrics.get('client_4xx'))} / {_seconds(metrics.get('client_5xx'))} "
        f"| {verdict} | {links} | {_seconds(result.settings.get('rate'))} |"
    )


def _relative(path: Path, out_dir: Path) -> str:
    try:
        return str(path.relative_to(out_dir))
    except ValueError:
        return str(path)


def markdown(entries: Sequence[Entry], title: str, picture: Path | None, out_dir: Path) -> str:
    ran = [e.result for e in entries if e.result is not None]
    passed = sum(r.passed for r in ran)
    skipped = sum(e.result is None for e in entries)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"# Game day: {title}",
        "",
        f"{stamp}. {len(ran)} scenarios ran: {passed} passed, {len(ran) - passed} failed"
        + (f"; {skipped} skipped." if skipped else "."),
        "",
        "| scenario | injected | detected s | recovery (RTO) s | accepts again s | lost "
        "| duplicates | senders' 4xx / 5xx | verdict | report | msg/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(e, out_dir) for e in entries),
        "",
        "Detected: inject until the cluster noticed (views in Redis, a takeover, the first 4xx). "
        "Recovery: inject until delivered throughput is back to 90 % of the baseline for good. "
        "Lost: accepted with 250, neither delivered nor bounced. 4xx / 5xx: final replies a "
        "sender saw after trying every node.",
    ]
    lines += _details(ran)
    lines += _commands(ran)
    lines += ["", f"![every scenario's timeline]({picture.name})" if picture else NO_PICTURE]
    return "\n".join(lines) + "\n"


def _details(results: Sequence[DrillResult]) -> list[str]:
    lines: list[str] = []
    for result in results:
        if not (result.failures or result.waived):
            continue
        lines += ["", f"## {result.scenario}", "", result.proves, ""]
        lines += [f"- missed: {f}" for f in result.failures]
        lines += [f"- known issue: {w}" for w in result.waived]
    if results:
        settings = results[0].settings
        shown = {k: v for k, v in settings.items() if k not in ("commands", "peak_rate", "rate")}
        lines += ["", "Run with " + ", ".join(f"{k} {v}" for k, v in shown.items())]
    return lines


def _commands(results: Sequence[DrillResult]) -> list[str]:
    """What a target's drills ran (the file's commands or the preset's kubectl): the exact
    injection, for the review."""
    lines: list[str] = []
    for result in results:
        ran = result.settings.get("commands")
        for command in ran if isinstance(ran, list) else []:
            if isinstance(command, dict):
                lines.append(f"- {result.scenario}: `{command.get('command')}` "
                             f"(exit {command.get('exit')})")  # fmt: skip
    return ["", "## Commands run", "", *lines] if lines else []


def _plot(results: Sequence[DrillResult], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not results:
        return None
    rows = math.ceil(len(results) / COLUMNS)
    columns = min(COLUMNS, len(results))
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 2.8 * rows), dpi=100, squeeze=False
    )
    for ax, result in zip(axes.flat, results, strict=False):
        _panel(ax, result)
    for ax in list(axes.flat)[len(results) :]:
        ax.set_visible(False)
    fig.suptitle("delivered msg/s per scenario (red: fault; purple: detected; green: recovered)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _panel(ax: object, result: DrillResult) -> None:
    times, rates = delivered_rates(result)
    color = "tab:blue" if result.passed else "tab:red"
    ax.plot(times, rates, color=color, linewidth=1.2)  # type: ignore[attr-defined]
    marks = result.marks
    end = marks.get("heal", marks["inject"] + 3.0)
    ax.axvspan(marks["inject"], end, color="tab:red", alpha=0.12)  # type: ignore[attr-defined]
    for name, mark_color in (("detected", "tab:purple"), ("recovered", "tab:green")):
        if name in marks:
            ax.axvline(marks[name], color=mark_color, linestyle="--", linewidth=1)  # type: ignore[attr-defined]
    verdict = "PASS" if result.passed else "FAIL"
    metrics = result.metrics
    ax.set_title(  # type: ignore[attr-defined]
        f"{result.scenario}: {verdict}\nlost {metrics['lost']}, dup {metrics['duplicates']}, "
        f"RTO {metrics['rto_s']} s",
        fontsize=9,
    )
    ax.tick_params(labelsize=7)  # type: ignore[attr-defined]
