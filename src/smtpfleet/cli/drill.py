"""`smtpfleet drill SCENARIO | --all | --list [--target FILE] [--dry-run] [--out DIR] [--short]
[--rate N] [--duration S] [--nodes N] [--size BYTES] [--durability MODE] [--ipv6]`.

Errors are one line on stderr: 2 for what is wrong on the command line or in the target
file (before anything starts), 1 for a drill that could not run or missed an objective, and
130 for Ctrl-C, once the drill in progress has stopped everything it started (and, against a
target, run the heal command of a fault it had injected).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path

from redis.exceptions import RedisError

from smtpfleet.drills.local_plan import local_plan
from smtpfleet.drills.report import write_reports
from smtpfleet.drills.runner import run_drill, run_target_drill
from smtpfleet.drills.scenarios import SCENARIOS
from smtpfleet.drills.summary import Entry, write_summary
from smtpfleet.drills.target import (
    Aftermath,
    Target,
    TargetError,
    load_target,
    missing_commands,
    plan,
)
from smtpfleet.drills.timing import Timing
from smtpfleet.drills.verdict import DrillResult
from smtpfleet.errors import SmtpfleetError

EXIT_OK = 0
EXIT_MISSED = 1
EXIT_FAILED = 1  # the drill could not run (a cluster that did not start, a target out of reach)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
# Without --rate, drills run at this fraction of the rate the cluster was measured to carry.
DEFAULT_RATE_FRACTION = 0.5
# What stops a drill short without being a bug of ours: a process or server that did not
# start, a target (Redis, relays, endpoints) out of reach, a configuration it refused.
DRILL_FAILURES = (OSError, TimeoutError, RuntimeError, RedisError, SmtpfleetError, ValueError)


@dataclass
class _Progress:
    """Where the run is, for the one line an interrupt or a failure prints."""

    name: str | None = None  # the scenario started last
    running: bool = False  # its drill has not returned yet
    target: Target | None = None
    aftermath: Aftermath = field(default_factory=Aftermath)


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
        except TargetError as exc:
            print(f"smtpfleet: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if args.all:
            names = [n for n in names if n in target.faults]
        elif (missing := missing_commands(target, names[0], args.target)) is not None:
            print(f"smtpfleet: {missing}", file=sys.stderr)
            return EXIT_USAGE
        print(plan(target, names, _load_text(args)), flush=True)
    elif args.dry_run:
        print(local_plan(names, timing_from(args), _load_text(args), args.durability))
    if args.dry_run:
        return EXIT_OK
    return _run_drills(names, args, target)


def _run_drills(names: list[str], args: argparse.Namespace, target: Target | None) -> int:
    timing = timing_from(args)
    progress = _Progress(target=target)
    try:
        entries = [_one(name, timing, args, progress) for name in names]
        if args.all:
            _summarize(entries, args.out, target)
    except KeyboardInterrupt:
        # asyncio.run has cancelled the drill and let it unwind (its cluster shut down, its
        # commands killed, a target's fault healed) before this is raised.
        print(f"smtpfleet: {_interrupted(progress)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DRILL_FAILURES as exc:
        print(f"smtpfleet: {_failed(progress, exc)}", file=sys.stderr)
        return EXIT_FAILED
    missed = sum(e.result is not None and not e.result.passed for e in entries)
    return EXIT_MISSED if missed else EXIT_OK


def _interrupted(progress: _Progress) -> str:
    name = progress.name
    if name is None:
        return "interrupted before any drill started"
    if not progress.running:
        return f"interrupted after {name} (its reports may be incomplete)"
    if progress.target is None:
        return f"interrupted: {name} stopped, and every process it started with it"
    return f"interrupted: {name} stopped{_target_state(progress)}"


def _failed(progress: _Progress, exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # One line: the first of a message, and its last (a node's log tail ends with the cause).
    text = lines[0].rstrip(".") if lines else type(exc).__name__
    if len(lines) > 1:
        text += f" ... {lines[-1]}"
    where = f"{progress.name} stopped: " if progress.name else ""
    state = _target_state(progress) if progress.target is not None and progress.running else ""
    return f"{where}{text}{state}"


def _target_state(progress: _Progress) -> str:
    """What the drill left on the target: its fault healed, or the command to heal it."""
    after = progress.aftermath
    commands = progress.target.faults.get(progress.name or "") if progress.target else None
    if not after.injected:
        return "; its fault was not injected"
    if after.heal is None:
        if commands is None or commands.heal is None:
            return "; its fault was injected and has no heal command"
        return "; its fault was injected and healed"
    if after.heal_exit == 0:
        return "; its fault was injected, and its heal command has run (exit 0)"
    status = "did not finish" if after.heal_exit is None else f"exited {after.heal_exit}"
    return f"; its fault is still injected: the heal command {status}, run it: {after.heal}"


def _summarize(entries: list[Entry], out: Path, target: Target | None) -> None:
    """The game-day page over every scenario of the run."""
    title = f"target {target.name}" if target is not None else "local cluster"
    paths = write_summary(entries, out, title)
    print(f"game day summary -> {paths[0]}")
    if len(paths) == 1:
        print("    (no picture: it needs matplotlib, pip install -e '.[drills]')")


def _names(args: argparse.Namespace) -> list[str] | None:
    if args.all and args.scenario:
        # Either one would be a guess: running every drill for a typo costs half an hour.
        print(
            f"smtpfleet: --all runs every scenario: drop {args.scenario!r} or drop --all",
            file=sys.stderr,
        )
        return None
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


def _one(name: str, timing: Timing, args: argparse.Namespace, progress: _Progress) -> Entry:
    scenario = SCENARIOS[name]
    target = progress.target
    reason = skip_reason(name, target)
    if reason is not None:
        print(f"{name:18} SKIP  {reason}", flush=True)
        return Entry(name, skipped=reason)
    progress.name, progress.running, progress.aftermath = name, True, Aftermath()
    if target is not None:
        result = asyncio.run(run_target_drill(scenario, timing, target, progress.aftermath))
    else:
        overrides = {"queue": {"durability": args.durability}} if args.durability else {}
        result = asyncio.run(run_drill(scenario, timing, overrides, ipv6=args.ipv6))
    progress.running = False
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
