"""`smtpfleet dev`: a local cluster in one command, until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence

from smtpfleet.config import parse_hostport
from smtpfleet.errors import ConfigError
from smtpfleet.testing.localcluster import LocalCluster
from smtpfleet.testing.redis_server import INSTALL_HINT, NoServerBinary, find_server_binary

EXIT_USAGE = 2
# The demo relays count every message but keep only the last ones: a dev cluster left
# running under a load test must not grow without bound (it reached 554 MB in a fuzz run).
DEMO_SINK_KEEP = 1000


def run(args: argparse.Namespace) -> int:
    if args.nodes < 1 or args.sinks < 0:
        raise ConfigError("--nodes must be at least 1 and --sinks at least 0")
    for relay in args.relay:
        try:
            parse_hostport(relay)
        except ValueError as exc:
            raise ConfigError(f"--relay {exc}") from None
    if not args.relay and args.sinks < 1:
        raise ConfigError("no relays: give --relay HOST:PORT or at least one --sinks")
    try:
        find_server_binary()  # before anything starts: a plain install has none
    except NoServerBinary:
        print(f"smtpfleet: dev needs a Redis server: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(
        run_dev(nodes=args.nodes, sinks=args.sinks, relays=args.relay, as_json=args.json)
    )


async def run_dev(*, nodes: int, sinks: int, relays: Sequence[str], as_json: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    cluster = LocalCluster(
        nodes=nodes, sinks=sinks, relays=relays, log_messages=True, sink_keep=DEMO_SINK_KEEP
    )
    async with cluster:
        info = cluster.info()
        if as_json:
            print(json.dumps(info, separators=(",", ":")), flush=True)
        else:
            print(_summary(info, cluster), flush=True)
        await stop.wait()
        if not as_json:
            print("stopping: draining nodes, then relays and Redis", file=sys.stderr)
    return 0


def _summary(info: dict[str, object], cluster: LocalCluster) -> str:
    smtp = info["smtp"]
    assert isinstance(smtp, list)
    lines = [
        f"smtpfleet dev cluster ready: {len(smtp)} nodes",
        *(
            f"  node-{i + 1}  smtp {addr}  pid {pid}"
            for i, (addr, pid) in enumerate(
                zip(smtp, info["pids"], strict=True)  # type: ignore[call-overload]
            )
        ),
        f"  redis   {info['redis']}",
        *(
            f"  relay   {addr}" + ("  (demo sink)" if cluster.sink_servers else "")
            for addr in cluster.relay_addresses()
        ),
        f"  logs    {info['logs']}",
        f"  tls CA  {info['tls_ca']}   (a throwaway CA: the nodes offer STARTTLS)",
        "",
        "Send a message (nodes relay for loopback clients):",
        f"  swaks --server {smtp[0]} --to someone@example.net   (or any SMTP client)",
        f"  swaks --server {smtp[0]} --to someone@example.net --tls --tls-ca-path {info['tls_ca']}",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)
