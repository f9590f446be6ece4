"""STARTTLS on every connection: does smtpfleet keep its ratio to Postfix? (issue #12)

    sudo python loadtest/bench_tls.py [--messages 3000] [--sessions 50] [--runs 3]

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
each counted at `smtp-sink` until the last accepted message is delivered. The figure that
matters is the ratio to Postfix in each column: the claim is that TLS does not make it worse.
Next to it, the CPU each server spent per message (bench.CpuWatch: the node and its Redis, or
all of Postfix's processes), which does not depend on how much the load tool takes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from smtpfleet.testing.localcluster import LocalCluster
from smtpfleet.testing.tls import TlsFiles, make_tls_files

# Each mode's tls-source flags.
MODES = {"clear": ["-P"], "STARTTLS": [], "STARTTLS, resumed": ["-R"]}
# The server's own processes in bench.CpuWatch's roles: smtpfleet's node and Redis, or Postfix.
SERVER_ROLES = ("node", "redis", "postfix")
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
    sink: bench.SmtpSink,
    target: tuple[str, int],
    args: argparse.Namespace,
    mode: str,
    pids: list[int],
) -> Figure:
    """msg/s until the last accepted message is at the sink, and the CPU each role spent."""
    before = sink.count
    watch = bench.CpuWatch(pids)
    started = time.perf_counter()
    flags = [*MODES[mode], *(["-c", str(args.tls.ca_file)] if mode != "clear" else [])]
    result = await tls_source(args.tls_source, target, args, flags)
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


async def measure(
    name: str,
    sink: bench.SmtpSink,
    target: tuple[str, int],
    args: argparse.Namespace,
    tls: TlsFiles,
    pids: list[int],
) -> dict[str, Figure]:
    before = sink.count
    warm = await run_load([target], total=100, concurrency=10, starttls=tls.client_context())
    await sink.wait_for(before + warm.accepted)  # nothing of the warm-up still in flight
    figures = {}
    for mode in MODES:
        figure = await throughput(sink, target, args, mode, pids)
        print(
            f"  {name}, {mode}: {figure.rate:.0f} msg/s, server CPU {figure.server_ms:.2f} "
            f"ms/msg, load tool {figure.cpu_ms['load tools']:.2f} ms/msg, "
            f"{figure.resumed:.0%} resumed",
            flush=True,
        )
        figures[mode] = figure
    return figures


async def smtpfleet(
    sink: bench.SmtpSink, args: argparse.Namespace, tls: TlsFiles, workers: int
) -> dict[str, Figure]:
    overrides: dict[str, object] = {
        "queue": {"durability": "fsync"},
        "inbound": {
            "max_sessions": 5000,
            "tls": {"cert_file": str(tls.cert_file), "key_file": str(tls.key_file)},
        },
        "health": {"interval_s": 5.0},
    }
    cluster = LocalCluster(
        nodes=1, workers=workers, relays=[sink.address], overrides=overrides, appendfsync="always"
    )
    async with cluster:
        node = cluster.node_processes[0]
        name = "smtpfleet, 1 node" + (f" x {workers} workers" if workers > 1 else "")
        return await measure(name, sink, node.smtp, args, tls, [node.pid])


async def one_run(args: argparse.Namespace, tls: TlsFiles) -> dict[str, dict[str, Figure]]:
    sink = bench.SmtpSink()
    follower = asyncio.create_task(sink.follow())
    try:
        rows = {"smtpfleet, 1 node": await smtpfleet(sink, args, tls, 1)}
        rows["smtpfleet, 1 node x 2 workers"] = await smtpfleet(sink, args, tls, 2)
        postfix_tls = (
            f"smtpd_tls_cert_file = {tls.cert_file}",
            f"smtpd_tls_key_file = {tls.key_file}",
            "smtpd_tls_security_level = may",
            "smtpd_tls_protocols = >=TLSv1.2",
            "smtpd_tls_received_header = yes",
        )
        with bench.postfix_relay(sink, postfix_tls) as postfix:
            rows["Postfix 3.7 relay"] = await measure(
                "Postfix 3.7 relay", sink, postfix, args, tls, []
            )
        return rows
    finally:
        sink.stop()
        follower.cancel()


def report(runs: list[dict[str, dict[str, Figure]]], args: argparse.Namespace) -> None:
    def median(path: str, mode: str, value: Callable[[Figure], float]) -> float:
        return statistics.median(value(run[path][mode]) for run in runs)

    postfix = "Postfix 3.7 relay"
    print(
        f"\n{args.messages} messages of {args.size} B, a new connection per message, "
        f"{args.sessions} concurrent senders (tls-source), median of {len(runs)}\n"
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
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as directory:
        args.tls = make_tls_files(Path(directory))
        args.tls_source = build_tls_source(Path(directory))
        runs = []
        for i in range(args.runs):
            print(f"run {i + 1} of {args.runs}", flush=True)
            runs.append(await one_run(args, args.tls))
    report(runs, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3_000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=1)
    uvloop.run(main(parser.parse_args()))
