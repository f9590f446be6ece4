"""The `smtpfleet` command. Errors are one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence

from smtpfleet import __version__, opscli
from smtpfleet.config import WORKERS_ENV, Config, load_config, parse_hostport
from smtpfleet.drills import cli as drill_cli
from smtpfleet.errors import ConfigError
from smtpfleet.loadgen import loadtest
from smtpfleet.logs import configure_logging

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
CONFIG_ENV = "SMTPFLEET_CONFIG"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpfleet", description=__doc__)
    parser.add_argument("--version", action="version", version=f"smtpfleet {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("SMTPFLEET_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "text"],
        default=os.environ.get("SMTPFLEET_LOG_FORMAT", "auto"),
        help="auto: JSON unless stderr is a terminal",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run one node (SMTP front + delivery workers)")
    serve.add_argument(
        "--config", default=os.environ.get(CONFIG_ENV), help=f"YAML file (${CONFIG_ENV})"
    )
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=os.environ.get(WORKERS_ENV, "1"),
        help=f"node processes sharing the SMTP port, one per core (${WORKERS_ENV}, default 1)",
    )

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a config file offline")
    check.add_argument("file")

    dev = sub.add_parser("dev", help="run a local cluster: Redis, demo relays and N nodes")
    dev.add_argument("--nodes", type=int, default=3, help="node processes (default 3)")
    dev.add_argument("--sinks", type=int, default=2, help="demo sink relays (default 2)")
    dev.add_argument(
        "--relay", action="append", default=[], metavar="HOST:PORT", help="a real relay (repeat)"
    )
    dev.add_argument("--json", action="store_true", help="print one JSON line once ready")
    opscli.register(sub)
    loadtest.register(sub)
    drill_cli.register(sub)
    dns_check = sub.add_parser("check-dns", help="check MX, SPF, DKIM and DMARC of a domain")
    dns_check.add_argument("domain")
    dns_check.add_argument("--config", default=os.environ.get(CONFIG_ENV), help="node config")
    dns_check.add_argument("--nameserver", metavar="IP[:PORT]", help="ask this server")
    dns_check.add_argument("--json", action="store_true")
    return parser


def _load(path: str | None) -> Config:
    return load_config(path)


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return int(text)


def _cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if args.workers > 1:
        from smtpfleet.supervisor import serve_workers

        return serve_workers(config, args.config, args.workers, args.log_level, args.log_format)
    from smtpfleet.lifecycle import serve

    return serve(config)


def _cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    listen = ", ".join(config.inbound.listen)
    print(
        f"{args.file}: ok: listen {listen}; {len(config.relays)} relays; "
        f"redis {config.redis.url.rsplit('@', 1)[-1]}; {config.redis.shards} shards; "
        f"durability {config.queue.durability.value}"
    )
    return EXIT_OK


def _cmd_dev(args: argparse.Namespace) -> int:
    if args.nodes < 1 or args.sinks < 0:
        raise ConfigError("--nodes must be at least 1 and --sinks at least 0")
    for relay in args.relay:
        try:
            parse_hostport(relay)
        except ValueError as exc:
            raise ConfigError(f"--relay {exc}") from None
    if not args.relay and args.sinks < 1:
        raise ConfigError("no relays: give --relay HOST:PORT or at least one --sinks")
    from smtpfleet.dev import run_dev

    return asyncio.run(
        run_dev(nodes=args.nodes, sinks=args.sinks, relays=args.relay, as_json=args.json)
    )


def _cmd_check_dns(args: argparse.Namespace) -> int:
    from smtpfleet.dnscheck import DnsExpectations, check_domain, exit_code, render_table

    config = _load(args.config)
    expectations = DnsExpectations(
        egress_addresses=tuple(ip for relay in config.relays for ip in relay.egress_addresses),
        dkim=tuple((key.selector, key.public_key) for key in config.dns.dkim),
        active_active=config.dns.active_active,
        max_ttl_s=config.dns.max_ttl_s,
    )
    nameserver, port = None, 53
    if args.nameserver:
        try:
            nameserver, port = parse_hostport(args.nameserver, default_port=53)
        except ValueError as exc:
            raise ConfigError(f"--nameserver {exc}") from None
    checks = asyncio.run(check_domain(args.domain, expectations, nameserver=nameserver, port=port))
    if args.json:
        print(
            json.dumps(
                [{"check": c.name, "status": c.status.value, "detail": c.detail} for c in checks]
            )
        )
    else:
        print(render_table(checks))
    return exit_code(checks)


COMMANDS = {"serve": _cmd_serve, "dev": _cmd_dev, "check-dns": _cmd_check_dns}
OPS_COMMANDS = {"status", "queue", "dead", "relay", "node"}


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
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    if args.command in OPS_COMMANDS:
        return opscli.run(args)
    if args.command == "loadtest":
        return loadtest.run(args)
    if args.command == "drill":
        return drill_cli.run(args)
    handler = _cmd_config_check if args.command == "config" else COMMANDS[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"smtpfleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED
    except (RuntimeError, OSError, TimeoutError) as exc:
        print(f"smtpfleet: {exc}", file=sys.stderr)
        return EXIT_FAILED
