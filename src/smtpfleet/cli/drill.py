"""`smtpfleet drill SCENARIO | --all | --list [--out DIR] [--short]`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from smtpfleet.drills.report import write_reports
from smtpfleet.drills.runner import Timing, run_drill
from smtpfleet.drills.scenarios import SCENARIOS

EXIT_OK = 0
EXIT_MISSED = 1
EXIT_USAGE = 2


def run(args: argparse.Namespace) -> int:
    if args.list:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:18} {scenario.proves}")
        return EXIT_OK
    names = list(SCENARIOS) if args.all else [args.scenario] if args.scenario else []
    if not names:
        print("smtpfleet: name a scenario, or --all, or --list", file=sys.stderr)
        return EXIT_USAGE
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"smtpfleet: unknown scenario {unknown[0]!r} (see --list)", file=sys.stderr)
        return EXIT_USAGE
    timing = Timing.short() if args.short else Timing()
    overrides = {"queue": {"durability": args.durability}} if args.durability else {}
    missed = 0
    for name in names:
        result = asyncio.run(run_drill(SCENARIOS[name], timing, overrides))
        paths = write_reports(result, args.out)
        verdict = "PASS" if result.passed else "FAIL"
        shown = ", ".join(f"{k}={v}" for k, v in result.metrics.items() if k in _HEADLINE)
        print(f"{name:18} {verdict}  {shown}  -> {paths[1]}")
        for failure in result.failures:
            print(f"    missed: {failure}")
        missed += not result.passed
    return EXIT_MISSED if missed else EXIT_OK


_HEADLINE = (
    "lost",
    "duplicates",
    "client_errors",
    "detection_s",
    "rto_s",
    "accept_rto_s",
    "refusal_window_s",
    "fault_p99_ms",
)
