"""Fuzz the delivery side for minutes: a relay whose faults change at random, many messages
at once through one RelayClient (`smtpfleet.testing.relay_fuzz`); replay a failure by seed.

    python loadtest/relay_fuzz.py [--seed N] [--seconds 60] [--runs 5] [--step-by-step]

Each run uses seed, seed+1, ...; prints one JSON line per run; exit status 1 on any violation.
"""

from __future__ import annotations

import argparse
import json
import sys

import uvloop

from smtpfleet.testing.relay_fuzz import run


async def main(args: argparse.Namespace) -> int:
    failed = 0
    for seed in range(args.seed, args.seed + args.runs):
        report = await run(seed, args.seconds, pipelining=not args.step_by_step)
        failed += bool(report.violations)
        print(json.dumps(report.__dict__ | {"violations": report.violations[:20]}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=18001)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--step-by-step",
        action="store_true",
        help="the relay does not advertise PIPELINING: every command waits for its reply",
    )
    sys.exit(uvloop.run(main(parser.parse_args())))
