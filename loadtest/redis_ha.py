"""What a 250 survives per durability mode: the Redis HA drills, each mode, several runs.

    python loadtest/redis_ha.py [--runs 3] [--short] [--json FILE]

Runs `redis-failover` (SENTINEL FAILOVER) and `redis-primary-kill` (SIGKILL of the primary)
on a Sentinel set (a primary, two replicas, three Sentinels) under the drills' steady load,
once per `queue.durability` (`server`, `fsync`, `replicated` with `replicas: 1`), and prints
one Markdown row per mode and fault: acknowledged messages lost, duplicates, the window in
which senders were refused (451) and the time until the fleet accepts again (each as
min–max over the runs), and how many runs passed their objectives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from smtpfleet.drills.runner import run_drill
from smtpfleet.drills.scenarios import SCENARIOS
from smtpfleet.drills.timing import Timing
from smtpfleet.drills.verdict import DrillResult

MODES = ("server", "fsync", "replicated")
FAULTS = ("redis-failover", "redis-primary-kill")
SHOWN = ("lost", "duplicates", "client_4xx", "refusal_window_s", "accept_rto_s", "detection_s")


def _span(values: list[float | int | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    low, high = min(known), max(known)
    return f"{low:g}" if low == high else f"{low:g}–{high:g}"


async def measure(runs: int, timing: Timing) -> dict[str, list[DrillResult]]:
    results: dict[str, list[DrillResult]] = {}
    for mode in MODES:
        for fault in FAULTS:
            key = f"{mode} {fault}"
            for _ in range(runs):
                result = await run_drill(SCENARIOS[fault], timing, {"queue": {"durability": mode}})
                results.setdefault(key, []).append(result)
                print(key, result.passed, {k: result.metrics[k] for k in SHOWN}, flush=True)
    return results


def table(results: dict[str, list[DrillResult]]) -> str:
    lines = [
        "| durability | fault | " + " | ".join(SHOWN) + " | passed |",
        "|---|---|" + "---|" * (len(SHOWN) + 1),
    ]
    for key, runs in results.items():
        mode, fault = key.split(" ")
        cells = [_span([r.metrics[name] for r in runs]) for name in SHOWN]
        passed = sum(r.passed for r in runs)
        lines.append(f"| {mode} | {fault} | " + " | ".join(cells) + f" | {passed}/{len(runs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--short", action="store_true", help="the CI timing of the drills")
    parser.add_argument("--json", type=Path, help="write every run's metrics here")
    args = parser.parse_args()
    timing = Timing.short() if args.short else Timing()
    results = asyncio.run(measure(args.runs, timing))
    print(table(results))
    if args.json:
        dump = {k: [r.metrics for r in runs] for k, runs in results.items()}
        args.json.write_text(json.dumps(dump, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
