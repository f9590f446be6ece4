"""Drill reports: JSON for machines, Markdown for people, a PNG timeline to see it at a glance.

The picture needs matplotlib (`pip install 'smtpfleet[drills]'`); without it the JSON and
Markdown are still written and the report says the picture was skipped.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from smtpfleet.drills.timing import SAMPLE_S
from smtpfleet.drills.verdict import DrillResult


def write_reports(result: DrillResult, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / result.scenario
    paths = [base.with_suffix(".json"), base.with_suffix(".md")]
    paths[0].write_text(json.dumps(_as_json(result), indent=2), encoding="utf-8")
    picture = _plot(result, base.with_suffix(".png"))
    paths[1].write_text(markdown(result, picture), encoding="utf-8")
    if picture is not None:
        paths.append(picture)
    return paths


def _as_json(result: DrillResult) -> dict[str, object]:
    return {
        "scenario": result.scenario,
        "proves": result.proves,
        "verdict": "pass" if result.passed else "fail",
        "failures": result.failures,
        "known_issues": result.waived,
        "lost": result.lost,
        "settings": result.settings,
        "metrics": result.metrics,
        "objectives": result.objectives,
        "floors": result.floors,
        "marks_s": result.marks,
        "timeline": [asdict(s) for s in result.timeline],
    }


def markdown(result: DrillResult, picture: Path | None) -> str:
    verdict = "PASS" if result.passed else "FAIL"
    lines = [
        f"# Drill `{result.scenario}`: {verdict}",
        "",
        result.proves,
        "",
        "| measure | value | objective |",
        "|---|---|---|",
    ]
    for name, value in result.metrics.items():
        bound, floor = result.objectives.get(name), result.floors.get(name)
        objective = f"≤ {bound:g}" if bound is not None else ""
        objective = f"≥ {floor:g}" if floor is not None else objective
        shown = "n/a" if value is None else value
        lines.append(f"| {name} | {shown} | {objective} |")
    if result.failures:
        lines += ["", "Missed objectives:", *(f"- {f}" for f in result.failures)]
    if result.waived:
        lines += ["", "Missed because of a known issue:", *(f"- {f}" for f in result.waived)]
    if result.lost:
        lines += [
            "",
            "Acknowledged, never delivered (Message-IDs):",
            *(f"- `{t}`" for t in result.lost),
        ]
    if result.settings:
        lines += ["", "Run with " + ", ".join(f"{k} {v}" for k, v in result.settings.items())]
    lines += [
        "",
        "Timeline (seconds since start): "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(result.marks.items(), key=lambda kv: kv[1])),
    ]
    if picture is not None:
        lines += ["", f"![timeline]({picture.name})"]
    else:
        lines += ["", "(no picture: install matplotlib, `pip install 'smtpfleet[drills]'`)"]
    return "\n".join(lines) + "\n"


def _plot(result: DrillResult, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    times, rates = delivered_rates(result)
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    ax.plot(times, rates, color="tab:blue", label="delivered msg/s")
    ax.set_xlabel("seconds")
    ax.set_ylabel("delivered msg/s", color="tab:blue")
    latency = ax.twinx()
    latency.scatter(
        [t for t, _ in result.latencies],
        [v * 1000 for _, v in result.latencies],
        s=4,
        color="tab:orange",
        alpha=0.5,
        label="accept latency",
    )
    latency.set_ylabel("accept latency ms", color="tab:orange")
    _shade(ax, result)
    verdict = "PASS" if result.passed else "FAIL"
    ax.set_title(
        f"{result.scenario}: {verdict} — lost {result.metrics['lost']}, "
        f"duplicates {result.metrics['duplicates']}, RTO {result.metrics['rto_s']} s"
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def delivered_rates(result: DrillResult) -> tuple[list[float], list[float]]:
    window = int(1.0 / SAMPLE_S)
    samples = result.timeline
    times = [samples[i].t for i in range(window, len(samples))]
    rates = [
        float(samples[i].delivered - samples[i - window].delivered)
        for i in range(window, len(samples))
    ]
    return times, rates


def _shade(ax: object, result: DrillResult) -> None:
    marks = result.marks
    end = marks.get("heal", marks["inject"] + 3.0)
    ax.axvspan(marks["inject"], end, color="tab:red", alpha=0.12, label="fault")  # type: ignore[attr-defined]
    for name, color in (("detected", "tab:purple"), ("recovered", "tab:green")):
        if name in marks:
            ax.axvline(marks[name], color=color, linestyle="--", label=name)  # type: ignore[attr-defined]
