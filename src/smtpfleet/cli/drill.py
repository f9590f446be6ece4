"""`smtpfleet drill SCENARIO | --all | --list [--target FILE] [--out DIR] [--short]
[--rate N] [--duration S] [--nodes N] [--size BYTES] [--durability MODE] [--ipv6]`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from smtpfleet.drills.report import write_reports
from smtpfleet.drills.runner import DrillResult, Timing, run_drill, run_target_drill
from smtpfleet.drills.scenarios import SCENARIOS
from smtpfleet.drills.summary import Entry, write_summary
from smtpfleet.drills.target import Target, TargetError, load_target, missing_commands, plan

EXIT_OK = 0
EXIT_MISSED = 1
EXIT_USAGE = 2
# Without --rate, drills run at this fraction of the rate the cluster was measured to carry.
DEFAULT_RATE_FRACTION = 0.5


def run(args: argparse.Namespace) -> int:
    if args.list:
        width = max(len(name) for name in SCENARIOS)
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:{width}} {scenario.proves}")
        return EXIT_OK
    names = _names(args)
    if names is None:
        return EXIT_USAGE
    target = None
    if args.target is not None:
        try:
            target = load_target(args.target)
        except (TargetError, OSError) as exc:
            print(f"smtpfleet: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if args.all:
            names = [n for n in names if n in target.faults]
        elif (missing := missing_commands(target, names[0], args.target)) is not None:
            print(f"smtpfleet: {missing}", file=sys.stderr)
            return EXIT_USAGE
        print(plan(target, names, _load_text(args)), flush=True)
        if args.dry_run:
            return EXIT_OK
    timing = timing_from(args)
    entries = [_one(name, timing, args, target) for name in names]
    if args.all:
        _summarize(entries, args.out, target)
    missed = sum(e.result is not None and not e.result.passed for e in entries)
    return EXIT_MISSED if missed else EXIT_OK


def _summarize(entries: list[Entry], out: Path, target: Target | None) -> None:
    """The game-day page over every scenario of the run."""
    title = f"target {target.name}" if target is not None else "local cluster"
    paths = write_summary(entries, out, title)
    print(f"game day summary -> {paths[0]}")
    if len(paths) == 1:
        print("    (no picture: it needs matplotlib, pip install -e '.[drills]')")


def _names(args: argparse.Namespace) -> list[str] | None:
    names = list(SCENARIOS) if args.all else [args.scenario] if args.scenario else []
    if not names:
        print("smtpfleet: name a scenario, or --all, or --list", file=sys.stderr)
        return None
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"smtpfleet: unknown scenario {unknown[0]!r} (see --list)", file=sys.stderr)
        return None
    return names


def timing_from(args: argparse.Namespace) -> Timing:
    load = {"size": args.size, "nodes": args.nodes}
    if args.rate is not None:
        load["rate"] = args.rate
    base = Timing.lasting(args.duration, **load) if args.duration else None
    if base is None:
        base = Timing.short() if args.short else Timing()
        base = Timing(**{**base.__dict__, **load})
    fraction = None if args.rate is not None else DEFAULT_RATE_FRACTION
    return Timing(**{**base.__dict__, "rate_fraction": fraction})


def _load_text(args: argparse.Namespace) -> str:
    rate = f"{args.rate:g} msg/s" if args.rate is not None else "half the measured peak"
    return f"{rate} of {args.size} bytes, a session per message"


def skip_reason(name: str, target: Target | None) -> str | None:
    """Why a scenario cannot run here, in plain words (None: it can)."""
    if SCENARIOS[name].redis_cluster and target is None:
        return _no_cluster_tools()
    if not SCENARIOS[name].netns or target is not None:
        return None  # a target's own commands make the network fault
    from smtpfleet.testing.netns import unavailable_reason

    return unavailable_reason()


def _no_cluster_tools() -> str | None:
    from smtpfleet.testing.redis_cluster import find_cli_binary

    try:
        find_cli_binary()
    except RuntimeError as exc:  # no server binary either (NoServerBinary is one)
        return f"a Redis Cluster drill builds its cluster with valkey-cli: {exc}"
    return None


def _one(name: str, timing: Timing, args: argparse.Namespace, target: Target | None) -> Entry:
    scenario = SCENARIOS[name]
    reason = skip_reason(name, target)
    if reason is not None:
        print(f"{name:18} SKIP  {reason}", flush=True)
        return Entry(name, skipped=reason)
    if target is not None:
        result = asyncio.run(run_target_drill(scenario, timing, target))
    else:
        overrides = {"queue": {"durability": args.durability}} if args.durability else {}
        result = asyncio.run(run_drill(scenario, timing, overrides, ipv6=args.ipv6))
    paths = write_reports(result, args.out)
    _print(result, paths)
    return Entry(name, result, paths)


def _print(result: DrillResult, paths: list[Path]) -> None:
    verdict = "PASS" if result.passed else "FAIL"
    shown = ", ".join(f"{k}={v}" for k, v in result.metrics.items() if k in _HEADLINE)
    print(f"{result.scenario:18} {verdict}  rate={result.settings.get('rate')}  {shown}")
    print(f"{'':18} -> {paths[1]}")
    for failure in result.failures:
        print(f"    missed: {failure}")
    for waived in result.waived:
        print(f"    known issue: {waived}")


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
