"""Every subcommand's arguments, in one argparse tree that imports nothing heavy.

The implementations live in one module per subcommand (`serve.py`, `ops.py`, ...), and the
entry (`smtpfleet.cli.main`) imports only the one that runs.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smtpfleet import __version__
from smtpfleet.config import WORKERS_ENV

CONFIG_ENV = "SMTPFLEET_CONFIG"
# Of a queued message (`queue list --state`): EntryState's values, spelled out here so the
# parser imports nothing (a test checks they match).
STATES = ("ready", "in_flight", "retry", "dead")
MAX_LISTING = 100_000
DESCRIPTION = (
    "The `smtpfleet` command. Errors are one line on stderr and an exit code, never a traceback."
)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("auto", "json", "text")


def _one_of(names: tuple[str, ...], normal: Callable[[str], str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if normal(text.strip()) not in names:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(names)}, not {text!r}")
        return normal(text.strip())

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpfleet", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"smtpfleet {__version__}")
    # A default from the environment goes through `type` too (argparse converts a string
    # default), so a bad SMTPFLEET_LOG_LEVEL is a usage error, as a bad --log-level is.
    parser.add_argument(
        "--log-level",
        type=_one_of(LOG_LEVELS, str.upper),
        default=os.environ.get("SMTPFLEET_LOG_LEVEL", "INFO"),
        help=", ".join(LOG_LEVELS),
    )
    parser.add_argument(
        "--log-format",
        type=_one_of(LOG_FORMATS, str.lower),
        default=os.environ.get("SMTPFLEET_LOG_FORMAT", "auto"),
        help="auto (JSON unless stderr is a terminal), json or text",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve(sub)
    _config(sub)
    _dev(sub)
    _ops(sub)
    _loadtest(sub)
    _drill(sub)
    _check_dns(sub)
    _auth(sub)
    return parser


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:  # `not >`: NaN too
        raise argparse.ArgumentTypeError(f"expected a positive number, not {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive number, not {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def positive_int(text: str) -> int:
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()) or int(digits) < 1:  # "²" is a digit
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return int(digits)


def listing_limit(text: str) -> int:
    """How many entries a listing shows: Redis takes a count up to 2**63, people far fewer."""
    limit = positive_int(text)
    if limit > MAX_LISTING:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_LISTING:,}, not {text!r}")
    return limit


def _serve(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run one node (SMTP front + delivery workers)")
    serve.add_argument(
        "--config", default=os.environ.get(CONFIG_ENV), help=f"YAML file (${CONFIG_ENV})"
    )
    serve.add_argument(
        "--workers",
        type=positive_int,
        default=os.environ.get(WORKERS_ENV, "1"),
        help=f"node processes sharing the SMTP port, one per core (${WORKERS_ENV}, default 1)",
    )


def _config(sub: Any) -> None:
    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a config file offline")
    check.add_argument("file")
    check.add_argument(
        "--skip-files",
        action="store_true",
        help="do not read the files it names (certificates, keys, users): where they are not "
        "mounted, e.g. a chart's CI",
    )


def _dev(sub: Any) -> None:
    dev = sub.add_parser("dev", help="run a local cluster: Redis, demo relays and N nodes")
    dev.add_argument("--nodes", type=int, default=3, help="node processes (default 3)")
    dev.add_argument("--sinks", type=int, default=2, help="demo sink relays (default 2)")
    dev.add_argument(
        "--relay", action="append", default=[], metavar="HOST:PORT", help="a real relay (repeat)"
    )
    dev.add_argument("--json", action="store_true", help="print one JSON line once ready")


def _cluster_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis", metavar="URL", help="the cluster's Redis (overrides --config)")
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV), help="a node's YAML config")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _ops(sub: Any) -> None:
    status = sub.add_parser("status", help="nodes, relays and queue of the whole cluster")
    _cluster_options(status)

    queue = sub.add_parser("queue", help="inspect and change queued messages")
    queue_sub = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = queue_sub.add_parser("list", help="list queued messages, oldest first")
    listing.add_argument("--state", action="append", choices=STATES, help="repeatable")
    listing.add_argument("--limit", type=listing_limit, default=50)
    for name, text in (("show", "one message"), ("retry", "retry now"), ("delete", "delete")):
        action = queue_sub.add_parser(name, help=text)
        action.add_argument("qid")
        _cluster_options(action)
    _cluster_options(listing)

    dead = sub.add_parser("dead", help="dead letters: list, requeue, purge")
    dead_sub = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    dead_list = dead_sub.add_parser("list", help="list dead letters, oldest first")
    dead_list.add_argument("--limit", type=listing_limit, default=50)
    for name, text in (("requeue", "queue again for delivery"), ("purge", "delete for good")):
        action = dead_sub.add_parser(name, help=text)
        group = action.add_mutually_exclusive_group(required=True)
        group.add_argument("qid", nargs="?")
        group.add_argument("--all", action="store_true")
        _cluster_options(action)
    _cluster_options(dead_list)

    relay = sub.add_parser("relay", help="pause or resume a relay, cluster-wide")
    relay_sub = relay.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("pause", "send it nothing new"), ("resume", "send to it again")):
        action = relay_sub.add_parser(name, help=text)
        action.add_argument("name")
        _cluster_options(action)

    node = sub.add_parser("node", help="ask a node to drain and exit")
    node_sub = node.add_subparsers(dest="action", required=True, metavar="ACTION")
    drain = node_sub.add_parser("drain", help="stop taking mail, finish deliveries, exit")
    drain.add_argument("id")
    _cluster_options(drain)


# -- the numbers of `loadtest` and `drill` ---------------------------------------------------

# The largest message `loadtest` and `drill` make: a node's default inbound.max_message_bytes
# (25 MiB). A default node refuses more (552), and each sender holds its message in memory:
# `--size 100000000000000` was a MemoryError.
MAX_MESSAGE_BYTES = 25 * 1024 * 1024
# Senders of one `loadtest`, each with a socket of its own: far past a node's max_sessions
# (1000 by default) the run measures this machine's file descriptor limit, not the cluster.
MAX_CONCURRENCY = 10_000


def finite_positive_float(text: str) -> float:
    """Seconds and rates: `inf` would never end (a run of `--duration inf` hung)."""
    value = positive_float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, not {text!r}")
    return value


def finite_non_negative_float(text: str) -> float:
    value = non_negative_float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected 0 or a finite positive number, not {text!r}")
    return value


def whole_number_up_to(most: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = positive_int(text)
        if value > most:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from 1 to {most}, not {text!r}"
            )
        return value

    return parse


def _loadtest(sub: Any) -> None:
    load = sub.add_parser("loadtest", help="send load and reconcile it against the sinks")
    load.add_argument("--target", action="append", required=True, metavar="HOST:PORT")
    size = load.add_mutually_exclusive_group(required=True)
    size.add_argument("--count", type=positive_int, help="messages to send")
    size.add_argument(
        "--duration",
        type=finite_positive_float,
        metavar="SECONDS",
        help="send for this long: no message starts after it (replies to those sent are "
        "still read)",
    )
    load.add_argument(
        "--rate",
        type=finite_positive_float,
        help="messages per second (default: as fast as possible)",
    )
    load.add_argument(
        "--concurrency",
        type=whole_number_up_to(MAX_CONCURRENCY),
        default=50,
        help=f"senders at once (default 50, at most {MAX_CONCURRENCY})",
    )
    load.add_argument(
        "--size",
        type=whole_number_up_to(MAX_MESSAGE_BYTES),
        default=2048,
        help=f"message size in bytes (default 2048, at most {MAX_MESSAGE_BYTES}: a node's "
        "default inbound.max_message_bytes)",
    )
    load.add_argument(
        "--per-session", type=positive_int, default=100, help="messages per connection"
    )
    load.add_argument(
        "--sink",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="run a sink here (a relay of the cluster) and reconcile against it",
    )
    load.add_argument(
        "--settle",
        type=finite_non_negative_float,
        default=30.0,
        help="seconds to wait for deliveries (default 30)",
    )
    load.add_argument(
        "--starttls", action="store_true", help="upgrade every connection with STARTTLS"
    )
    load.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="with --starttls: the CA (PEM) to verify the targets with (default: system CAs)",
    )
    load.add_argument(
        "--allow-remote", action="store_true", help="allow targets that are not loopback addresses"
    )
    load.add_argument("--json", action="store_true")


def _drill(sub: Any) -> None:
    drill = sub.add_parser("drill", help="failure-injection drills with verdicts")
    drill.add_argument("scenario", nargs="?", help="a scenario name (see --list)")
    drill.add_argument("--all", action="store_true", help="run every scenario in turn")
    drill.add_argument("--list", action="store_true", help="name the scenarios")
    drill.add_argument("--out", type=Path, default=Path("drill-reports"), help="report folder")
    drill.add_argument("--short", action="store_true", help="shorter phases (CI)")
    drill.add_argument(
        "--durability",
        choices=("server", "fsync", "replicated"),
        help="queue.durability for the drill's cluster (default: the scenario's own)",
    )
    drill.add_argument(
        "--target", type=Path, metavar="FILE", help="drill a running cluster (docs/drills.md)"
    )
    drill.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (a local cluster's, or the target's) and start nothing",
    )
    drill.add_argument(
        "--rate", type=finite_positive_float, help="msg/s (default: half of the measured peak)"
    )
    drill.add_argument("--duration", type=finite_positive_float, help="seconds of load per drill")
    drill.add_argument("--nodes", type=positive_int, default=3, help="nodes of a local cluster")
    drill.add_argument(
        "--size",
        type=whole_number_up_to(MAX_MESSAGE_BYTES),
        default=2048,
        help=f"message bytes (default 2048, at most {MAX_MESSAGE_BYTES})",
    )
    drill.add_argument(
        "--ipv6", action="store_true", help="net-* drills: the namespaces talk over IPv6 (ULA)"
    )


def _check_dns(sub: Any) -> None:
    dns_check = sub.add_parser("check-dns", help="check MX, SPF, DKIM and DMARC of a domain")
    dns_check.add_argument("domain")
    dns_check.add_argument("--config", default=os.environ.get(CONFIG_ENV), help="node config")
    dns_check.add_argument("--nameserver", metavar="IP[:PORT]", help="ask this server")
    dns_check.add_argument("--json", action="store_true")


def _auth(sub: Any) -> None:
    auth = sub.add_parser("auth", help="SMTP AUTH tools")
    auth_sub = auth.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    hash_ = auth_sub.add_parser(
        "hash", help="print a users-file line; the password is read from stdin"
    )
    hash_.add_argument("user")
