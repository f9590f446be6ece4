"""STARTTLS on every connection: does smtpfleet keep its ratio to Postfix? (issue #12)

    sudo python loadtest/bench_tls.py [--messages 3000] [--sessions 50] [--runs 3] [--pin]

`smtp-source` speaks no TLS, so the load here is `tls_source.c` (beside this script, built
with the system's C compiler and OpenSSL when it runs): smtp-source's job in C, one message
per connection from `--sessions` threads, in three modes against each path:
  - clear (no STARTTLS);
  - STARTTLS with a full handshake on every connection;
  - STARTTLS resuming each sender's last TLS session, as a sending MTA's session cache does.
The paths are bench.py's headline rows:
  - smtpfleet, 1 node (1 worker, then one worker per core), Redis `appendfsync always` and
    `queue.durability: fsync`;
  - Postfix 3.7 as a relay with `smtpd_tls_security_level = may`;
both with the same throwaway certificate (trustme's ECDSA P-256 key) and TLS 1.2 or newer,
each counted at `smtp-sink` until the last accepted message is delivered. All paths run for
the whole run and are measured one after the other within each mode, so the two figures of a
ratio are seconds apart. The figure that matters is the ratio to Postfix in each column: the
claim is that TLS does not make it worse.

On two cores the load tool's own TLS (1.8-2.3 ms of CPU per connection, OpenSSL 3.0's client
handshake) shares the machine with the server and caps every TLS row near the same rate.
`--pin` puts the server under test on core 0 and this script with its load on core 1, so each
server's figure is what it does with one core of its own (one worker; no two-worker row).
Next to it, the CPU each server spent per message (bench.CpuWatch: the node and its Redis, or
all of Postfix's processes), which does not depend on how much the load tool takes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).parent))
import bench  # the sibling script: its sink, Postfix set-up and CPU accounting

from smtpfleet.loadgen import run_load
from smtpfleet.testing.tls import TlsFiles, make_tls_files

# Each mode's tls-source flags.
MODES = {"clear": ["-P"], "STARTTLS": [], "STARTTLS, resumed": ["-R"]}
# The server's own processes in bench.CpuWatch's roles: smtpfleet's node and Redis, or Postfix.
SERVER_ROLES = bench.SERVER_ROLES
# With --pin: the server under test on one core, this script and its load tool on the other.
SERVER_CORE, LOAD_CORE = 0, 1
SOURCE = Path(__file__).with_name("tls_source.c")


@dataclass
class Figure:
    """One path in one mode: msg/s, the CPU ms per message of each role (bench.CpuWatch),
    and the share of handshakes that resumed a session."""

    rate: float
    cpu_ms: dict[str, float]
    resumed: float = 0.0

    @property
    def server_ms(self) -> float:
        """What the server under test spent: the node and its Redis, or all of Postfix."""
        return sum(self.cpu_ms[role] for role in SERVER_ROLES)


def build_tls_source(directory: Path) -> Path:
    """tls_source.c compiled into `directory` (Debian's gcc and libssl-dev, installed as root
    when missing)."""
    if not shutil.which("cc") or not Path("/usr/include/openssl/ssl.h").exists():
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        subprocess.run(["apt-get", "install", "-y", "-q", "gcc", "libssl-dev"], check=True, env=env)
    binary = directory / "tls-source"
    subprocess.run(
        ["cc", "-O2", "-o", str(binary), str(SOURCE), "-lssl", "-lcrypto", "-lpthread"],
        check=True,
    )
    return binary


async def tls_source(
    binary: Path, target: tuple[str, int], args: argparse.Namespace, flags: list[str]
) -> dict[str, object]:
    """One run of the load tool; its JSON summary."""
    host, port = target
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        *("-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.size)),
        *flags,
        host,
        str(port),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"tls-source exited with {proc.returncode}")
    summary: dict[str, object] = json.loads(out)
    return summary


async def throughput(
    sink: bench.SmtpSink, path: bench.Server, args: argparse.Namespace, mode: str
) -> Figure:
    """msg/s until the last accepted message is at the sink, and the CPU each role spent."""
    before = sink.count
    watch = bench.CpuWatch(path.node_pids, path.redis_pids)
    started = time.perf_counter()
    flags = [*MODES[mode], *(["-c", str(args.tls.ca_file)] if mode != "clear" else [])]
    result = await tls_source(args.tls_source, path.targets[0], args, flags)
    accepted = int(str(result["accepted"]))
    if accepted < args.messages:
        raise RuntimeError(f"only {accepted} of {args.messages} accepted: {result['codes']}")
    await sink.wait_for(before + accepted)
    elapsed = time.perf_counter() - started
    cores = watch.stop()
    per_message = {role: used * elapsed * 1000 / accepted for role, used in cores.items()}
    handshakes = int(str(result["handshakes"]))
    resumed = int(str(result["resumed"])) / handshakes if handshakes else 0.0
    return Figure(accepted / elapsed, per_message, resumed)


async def warm_up(sink: bench.SmtpSink, path: bench.Server, tls: TlsFiles) -> None:
    before = sink.count
    warm = await run_load(path.targets, total=100, concurrency=10, starttls=tls.client_context())
    await sink.wait_for(before + warm.accepted)  # nothing of the warm-up still in flight


async def one_run(
    args: argparse.Namespace, tls: TlsFiles, number: int
) -> dict[str, dict[str, Figure]]:
    """Every path is up for the whole run and measured in turn within each mode, so a pair
    (smtpfleet and Postfix in one mode) is a few seconds apart, not minutes: the VM's drift
    between two such measurements is what the ratio would otherwise carry. The order of the
    paths alternates from one mode (and run) to the next."""
    sink = bench.SmtpSink()
    follower = asyncio.create_task(sink.follow())
    postfix_tls = (
        f"smtpd_tls_cert_file = {tls.cert_file}",
        f"smtpd_tls_key_file = {tls.key_file}",
        "smtpd_tls_security_level = may",
        "smtpd_tls_protocols = >=TLSv1.2",
        "smtpd_tls_received_header = yes",
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            paths = [await bench.smtpfleet(stack, 1, sink, tls=tls)]
            if not args.pin:  # one core for the server: a second worker would only share it
                paths.append(await bench.smtpfleet(stack, 1, sink, workers=2, tls=tls))
            postfix = stack.enter_context(bench.postfix_relay(sink, postfix_tls))
            paths.append(bench.Server("Postfix 3.7 relay", [postfix]))
            if args.pin:
                bench.pin_servers([pid for path in paths for pid in path.node_pids], SERVER_CORE)
            for path in paths:
                await warm_up(sink, path, tls)
            rows: dict[str, dict[str, Figure]] = {path.name: {} for path in paths}
            for i, mode in enumerate(MODES):
                for path in bench.in_turn(paths, number, i):
                    figure = await throughput(sink, path, args, mode)
                    print(
                        f"  {path.name}, {mode}: {figure.rate:.0f} msg/s, server CPU "
                        f"{figure.server_ms:.2f} ms/msg, load tool "
                        f"{figure.cpu_ms['load tools']:.2f} ms/msg, {figure.resumed:.0%} resumed",
                        flush=True,
                    )
                    rows[path.name][mode] = figure
            return rows
    finally:
        sink.stop()
        follower.cancel()


def report(runs: list[dict[str, dict[str, Figure]]], args: argparse.Namespace) -> None:
    def median(path: str, mode: str, value: Callable[[Figure], float]) -> float:
        return statistics.median(value(run[path][mode]) for run in runs)

    postfix = "Postfix 3.7 relay"
    pinned = (
        f", the server on core {SERVER_CORE} and the load on core {LOAD_CORE}" if args.pin else ""
    )
    print(
        f"\n{args.messages} messages of {args.size} B, a new connection per message, "
        f"{args.sessions} concurrent senders (tls-source){pinned}, median of {len(runs)}\n"
    )
    print("| path | " + " | ".join(f"{mode} msg/s | vs Postfix" for mode in MODES) + " |")
    print("|---|" + "---|---|" * len(MODES))
    for path in runs[0]:
        cells = []
        for mode in MODES:
            msg_s = median(path, mode, lambda f: f.rate)
            cells += [f"{msg_s:,.0f}", f"{msg_s / median(postfix, mode, lambda f: f.rate):.2f}x"]
        print(f"| {path} | {' | '.join(cells)} |")
    print("\nEach run's own ratio to Postfix (the same run's Postfix), and their median\n")
    print("| path | " + " | ".join(MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for path in runs[0]:
        cells = [
            bench.run_by_run([run[path][mode].rate / run[postfix][mode].rate for run in runs])
            for mode in MODES
        ]
        print(f"| {path} | {' | '.join(cells)} |")
    print(
        "\nServer CPU per message (the node and its Redis, or all of Postfix), and Postfix's "
        "CPU per message divided by this path's\n"
    )
    print(
        "| path | "
        + " | ".join(f"{mode} ms/msg | Postfix / this" for mode in MODES)
        + " | resumed |"
    )
    print("|---|" + "---|---|" * len(MODES) + "---|")
    for path in runs[0]:
        cells = []
        for mode in MODES:
            cpu = median(path, mode, lambda f: f.server_ms)
            cells += [f"{cpu:.2f}", f"{median(postfix, mode, lambda f: f.server_ms) / cpu:.2f}x"]
        resumed = median(path, "STARTTLS, resumed", lambda f: f.resumed)
        print(f"| {path} | {' | '.join(cells)} | {resumed:.0%} |")
    load = ", ".join(
        f"{mode} {median(postfix, mode, lambda f: f.cpu_ms['load tools']):.2f}" for mode in MODES
    )
    print(f"\nThe load tool's own CPU, ms/msg (Postfix rows): {load}")


async def main(args: argparse.Namespace) -> None:
    bench.ensure_postfix_tools()
    if args.pin:
        if len(os.sched_getaffinity(0)) < 2 or LOAD_CORE not in os.sched_getaffinity(0):
            sys.exit("bench_tls: --pin needs cores 0 and 1")
        # Before anything starts: every process this script starts is on the load core until
        # pin_servers moves the server's own.
        os.sched_setaffinity(0, {LOAD_CORE})
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as directory:
        args.tls = make_tls_files(Path(directory))
        args.tls_source = build_tls_source(Path(directory))
        runs = []
        for i in range(args.runs):
            print(f"run {i + 1} of {args.runs}", flush=True)
            runs.append(await one_run(args, args.tls, i))
    report(runs, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3_000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the server under test on core 0, the load tool on core 1 (one worker only): "
        "what each server does with one core, not capped by what the load tool takes",
    )
    uvloop.run(main(parser.parse_args()))
