"""The `smtpfleet` command. Errors are one line on stderr and an exit code, never a traceback.

The entry stays thin: it parses the arguments (`parser.py`, which imports nothing heavy) and
imports only the module of the subcommand that runs, so `smtpfleet serve` loads the node and
never the test bench, the load generator or the drills (tests/qa checks this).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence

from smtpfleet.errors import ConfigError

__all__ = ["main"]

Run = Callable[[argparse.Namespace], int]

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
    except KeyboardInterrupt:
        # Ctrl-C before a command's own handling is in place (while it is imported, on a
        # slow or busy machine for seconds): the same one line as a cluster command's.
        print("smtpfleet: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _run(argv: Sequence[str] | None) -> int:
    with _ctrl_c_held():
        args, run = _command(argv)
    name = MODULES[args.command]
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


def _command(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Run]:
    """The parsed arguments and the subcommand's `run`, its module imported."""
    # Imported here, not above: the parser reads the configuration's schema (pydantic).
    from smtpfleet.cli.parser import build_parser
    from smtpfleet.logs import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    module = importlib.import_module(f"{__name__}.{MODULES[args.command]}")
    return args, module.run


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold a Ctrl-C back while the command is imported (0.4 s and more on a busy machine).
    Delivered inside a library's import it ended in a traceback, or a Rust extension's panic
    (pydantic-core importing `datetime`); held, it is raised here, as main's one line."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
