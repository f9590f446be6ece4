"""The `smtpfleet` command. Errors are one line on stderr and an exit code, never a traceback.

The entry stays thin: it parses the arguments (`parser.py`, which imports nothing heavy) and
imports only the module of the subcommand that runs, so `smtpfleet serve` loads the node and
never the test bench, the load generator or the drills (tests/qa checks this).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence

from smtpfleet.cli.parser import build_parser
from smtpfleet.errors import ConfigError
from smtpfleet.logs import configure_logging

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_USAGE = 2

# Subcommand -> the module under smtpfleet.cli whose run(args) carries it out.
MODULES = {
    "serve": "serve",
    "config": "config",
    "dev": "dev",
    "check-dns": "check_dns",
    "auth": "auth",
    "loadtest": "loadtest",
    "drill": "drill",
    **dict.fromkeys(("status", "queue", "dead", "relay", "node"), "ops"),
}
# These report their own errors, with their own exit codes.
SELF_REPORTING = frozenset({"ops", "loadtest", "drill"})


def main(argv: Sequence[str] | None = None) -> int:
    # SIGPIPE stays ignored (Python's default): with it at SIG_DFL, a write to any socket
    # whose peer is gone would kill a node, a drill or a dev cluster without a word.
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as an error at exit
    except BrokenPipeError:
        # The reader of our output went away (`smtpfleet queue list | head`): stop quietly,
        # with the status a SIGPIPE would give, and no second error when stdout is flushed.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    name = MODULES[args.command]
    run: Callable[[argparse.Namespace], int] = importlib.import_module(f"{__name__}.{name}").run
    if name in SELF_REPORTING:
        return run(args)
    try:
        return run(args)
    except ConfigError as exc:
        print(f"smtpfleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED
    except (RuntimeError, OSError, TimeoutError) as exc:
        print(f"smtpfleet: {exc}", file=sys.stderr)
        return EXIT_FAILED
