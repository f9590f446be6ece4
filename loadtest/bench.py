"""End-to-end throughput and accept latency: smtpfleet against Postfix, in one run.

    python loadtest/bench.py [--messages 6000] [--sessions 50] [--runs 3] [--no-latency]

Both load shapes, each counted at the sink until the last accepted message is delivered:
  - a new connection per message (`smtp-source` without -d): how MX traffic arrives, the
    headline row;
  - sessions that reuse their connection (`smtp-source -d`).
Paths, measured on this machine:
  (a) smtp-source straight to smtp-sink: the ceiling of the machine and the tools;
  (b) through smtpfleet: 1 node, 1 worker; 1 node with `serve --workers` one per core (Redis
      `appendfsync always` and `queue.durability: fsync`: fsynced before every 250, like
      Postfix); 1 node in the default configuration (`queue.durability: server`, Redis
      `appendfsync everysec`: not Postfix's durability, there for the accept latency target);
      `--all` adds 1 node with `delivery.concurrency: 16` and 3 nodes;
  (c) through Postfix configured as a relay to the same sink (installed from Debian's
      packages when missing; its configuration is restored afterwards).
For each smtpfleet path it reports the CPU the node processes used per message (user +
system, from /proc) and the tail: how long after the last 250 the last message arrived, so a
straggler waiting for a retry cannot hide. For throughput every path is up at once and
the paths are measured in turn within each shape (the two figures of a ratio minutes apart at
most). Accept latency is measured afterwards with each path alone, with smtpfleet's
generator at half of the path's measured peak rate, in the shape measured: from the final
dot written to the reply read, over 50 senders. Prints the ratios smtpfleet/Postfix and
smtpfleet/ceiling per shape. Every server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from smtpfleet.loadgen import run_load
from smtpfleet.testing.localcluster import LocalCluster
from smtpfleet.testing.redis_server import free_port
from smtpfleet.testing.tls import TlsFiles

_MESG = re.compile(rb"mesg=(\d+)\r")
# The Python generator tops out near 1.5k msg/s: a longer latency run only measures itself.
LATENCY_MESSAGES_MAX = 3000
POSTFIX_FILES = ("/etc/postfix/main.cf", "/etc/postfix/master.cf")


SHAPES = ("new connection per message", "reused sessions")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Figure:
    path: str
    shape: str
    msg_per_s: float
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_ms_per_msg: float = 0.0  # node processes only; 0 where not measured
    tail_s: float = 0.0  # from the end of the load to the last delivery
    # Cores each role used while the load ran (CpuWatch), and the machine's busy cores.
    cores: dict[str, float] = field(default_factory=dict)


# Which process does what, by its name in /proc (Postfix's daemons as Debian runs them).
ROLES = {
    "smtp-source": "load tools",
    "smtp-sink": "sink",
    "valkey-server": "redis",
    "redis-server": "redis",
    **dict.fromkeys(
        ("master", "smtpd", "cleanup", "qmgr", "smtp", "trivial-rewrite", "tlsmgr", "anvil"),
        "postfix",
    ),
}
# Roles whose processes are reaped by a process counted with its children's time (Postfix's
# master, this script): see CpuWatch.stop.
REAPED_INTO_COUNTED = ("postfix", "load tools")
# "stolen": the cores the hypervisor ran something else on while this VM wanted them (steal
# time); they are not in "machine busy", and a run with much of it is slower for every path.
CORE_ROLES = ("machine busy", "stolen", "node", "redis", "load tools", "sink", "postfix", "other")


class CpuWatch:
    """Cores used per role between start and stop: every process on the machine, so the
    table shows where two cores went (why two workers do not make twice one worker).

    A process that exits is counted in its parent once reaped: smtp-source in this script
    (counted as "load tools"), Postfix's smtpd in its master.
    """

    def __init__(self, node_pids: list[int], redis_pids: list[int]) -> None:
        """`redis_pids`: the Redis processes that count as "redis"; others are "other", as
        another path's idle Redis is while this one is measured."""
        self._node_pids = node_pids
        self._redis_pids = redis_pids
        self._started = time.perf_counter()
        self._machine = _machine_jiffies()
        self._procs = _process_seconds()

    def stop(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self._started
        busy, stolen, total = (
            b - a for a, b in zip(self._machine, _machine_jiffies(), strict=True)
        )
        cores = dict.fromkeys(CORE_ROLES, 0.0)
        cores["machine busy"] = busy / max(total, 1) * (os.cpu_count() or 1)
        cores["stolen"] = stolen / max(total, 1) * (os.cpu_count() or 1)
        nodes = set(_with_children(self._node_pids))
        now = _process_seconds()
        for pid, (name, seconds) in now.items():
            used = seconds - self._procs.get(pid, (name, 0.0))[1]
            role = "node" if pid in nodes else ROLES.get(name, "other")
            if role == "redis" and pid not in self._redis_pids:
                role = "other"
            if pid == os.getpid():
                role = "load tools"  # its reaped smtp-source children, and its own sink reader
            cores[role] += used / elapsed
        for pid, (name, seconds) in self._procs.items():
            # A process that ended in the window was counted in its parent when reaped, with
            # its whole life: Postfix's smtpd in master (one lives for 100 connections, so
            # across the modes of bench_tls.py), smtp-source in this script. What it had
            # used before the window was not this window's.
            if pid not in now and ROLES.get(name) in REAPED_INTO_COUNTED:
                cores[ROLES[name]] -= seconds / elapsed
        return cores


def _machine_jiffies() -> tuple[int, int, int]:
    """(busy, stolen, total) jiffies of all cores since boot, from /proc/stat: user, nice,
    system, idle, iowait, irq, softirq, steal (guest time is counted in user already)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle, steal = values[3] + values[4], values[7]  # idle + iowait; steal
    return sum(values) - idle - steal, steal, sum(values)


def _process_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds) for every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            text = (entry / "stat").read_text()
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()
            # Reaped children count only where they are the role's own (smtp-source in this
            # script, smtpd in Postfix's master): any other process reaping a long-lived child
            # in the window would add that child's whole life to "other".
            pid = int(entry.name)
            own = fields[11:15] if pid == os.getpid() or name == "master" else fields[11:13]
            found[pid] = (name, sum(int(x) for x in own) / CLK_TCK)
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and their reaped children (the worker processes
    of `serve --workers` are children of the supervisor and counted while alive)."""
    total = 0.0
    for pid in _with_children(pids):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / CLK_TCK
    return total


def _with_children(pids: list[int]) -> list[int]:
    found = list(pids)
    for pid in pids:
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            found += _with_children([int(c) for c in children])
    return found


SERVER_ROLES = ("node", "redis", "postfix")


def pin_servers(node_pids: list[int], core: int) -> None:
    """Move the server under test to `core`: the node's processes, the Redis this script
    started, and every Postfix daemon (those Postfix's master forks later inherit it).

    Every thread of each process, as Linux keeps an affinity per thread. The load tools stay on
    this script's own cores (`os.sched_setaffinity(0, ...)` before anything starts), so what
    they spend cannot cap the server.
    """
    nodes = set(_with_children(node_pids))
    ours = set(_with_children([os.getpid()]))
    for pid, (name, _) in _process_seconds().items():
        role = "node" if pid in nodes else ROLES.get(name)
        if role not in SERVER_ROLES or (role == "redis" and pid not in ours):
            continue  # a Redis of somebody else's (Debian's service on 6379) is not ours to move
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                os.sched_setaffinity(int(task.name), {core})


def ensure_postfix_tools() -> None:
    if shutil.which("smtp-source") and shutil.which("smtp-sink") and shutil.which("postfix"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit(
            "bench: needs Debian's postfix package (smtp-source, smtp-sink); install it as root"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], check=True, env=env)


class SmtpSink:
    """Postfix's smtp-sink with a running counter (-c), on a loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["smtp-sink", "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "1024"],
            stdout=subprocess.PIPE,
        )
        self.count = 0
        self._buffer = b""
        _wait_port(self.port, "smtp-sink")  # or the first path's load finds nobody listening

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def follow(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.proc.stdout is not None
        while chunk := await loop.run_in_executor(None, self.proc.stdout.read1, 4096):  # type: ignore[attr-defined]
            self._buffer = (self._buffer + chunk)[-128:]
            # Each status line reads "sess=N quit=N mesg=N\r"; the last complete one counts.
            if found := _MESG.findall(self._buffer):
                self.count = int(found[-1])

    async def wait_for(self, count: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"smtp-sink counted {self.count} of {count} in {timeout_s}s")
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def source(
    targets: list[tuple[str, int]], messages: int, sessions: int, size: int, reuse: bool
) -> None:
    """smtp-source, one process per target, splitting messages and sessions between them."""
    procs = []
    for i, (host, port) in enumerate(targets):
        share = messages // len(targets) + (1 if i < messages % len(targets) else 0)
        procs.append(
            await asyncio.create_subprocess_exec(
                "smtp-source",
                *(["-d"] if reuse else []),
                "-s",
                str(max(1, sessions // len(targets))),
                "-m",
                str(share),
                "-l",
                str(size),
                "-M",
                "localhost",
                "-f",
                "sender@example.com",
                "-t",
                "rcpt@example.net",
                f"{host}:{port}",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        )
    await asyncio.gather(*(p.wait() for p in procs))


async def throughput(
    sink: SmtpSink, targets: list[tuple[str, int]], args: argparse.Namespace, reuse: bool
) -> tuple[float, float]:
    """Messages per second until the last one is delivered, and the tail after the load."""
    before = sink.count
    started = time.perf_counter()
    await source(targets, args.messages, args.sessions, args.size, reuse)
    loaded = time.perf_counter()
    await sink.wait_for(before + args.messages)
    finished = time.perf_counter()
    return (sink.count - before) / (finished - started), finished - loaded


async def latency(
    targets: list[tuple[str, int]], rate: float, args: argparse.Namespace, reuse: bool
) -> tuple[float, float]:
    """Accept latency at `rate`, in the shape measured: a session per message, or reused."""
    result = await run_load(
        targets,
        total=min(LATENCY_MESSAGES_MAX, max(200, int(rate * 5))),
        rate=rate,
        concurrency=args.sessions,
        size=args.size,
        per_session=100 if reuse else 1,
    )
    return result.percentile_ms(0.5), result.percentile_ms(0.99)


@dataclass
class Server:
    """One path under test: where the load goes, and its processes for the CPU figures."""

    name: str
    targets: list[tuple[str, int]]
    node_pids: list[int] = field(default_factory=list)
    redis_pids: list[int] = field(default_factory=list)


def in_turn(servers: list[Server], run: int, step: int) -> list[Server]:
    """The order to measure the paths in at this step (shape or mode) of this run: it
    alternates, so that no path is always measured first (or just after another)."""
    return servers if (run + step) % 2 == 0 else servers[::-1]


async def warm_up(sink: SmtpSink, server: Server) -> None:
    before = sink.count
    warm = await run_load(server.targets, total=200, concurrency=10)
    await sink.wait_for(before + warm.accepted)  # nothing in flight when the clock starts


async def measure(sink: SmtpSink, server: Server, args: argparse.Namespace, shape: str) -> Figure:
    """One path in one load shape: throughput, and the CPU it took."""
    cpu_before = cpu_seconds(server.node_pids)
    watch = CpuWatch(server.node_pids, server.redis_pids)
    rate, tail_s = await throughput(sink, server.targets, args, reuse=shape == SHAPES[1])
    cores = watch.stop()
    cpu_ms = (cpu_seconds(server.node_pids) - cpu_before) * 1000 / args.messages
    print(
        f"  {server.name}, {shape}: {rate:.0f} msg/s, tail {tail_s:.2f} s"
        + (f", node CPU {cpu_ms:.2f} ms/msg" if server.node_pids else ""),
        flush=True,
    )
    return Figure(server.name, shape, rate, cpu_ms_per_msg=cpu_ms, tail_s=tail_s, cores=cores)


async def measure_latency(server: Server, args: argparse.Namespace, figure: Figure) -> None:
    """Accept latency at half of the peak `figure` measured, in its shape, into `figure`."""
    reuse = figure.shape == SHAPES[1]
    figure.p50_ms, figure.p99_ms = await latency(
        server.targets, figure.msg_per_s / 2, args, reuse=reuse
    )
    print(
        f"  {server.name}, {figure.shape}: accept p50 {figure.p50_ms:.1f} ms, "
        f"p99 {figure.p99_ms:.1f} ms at {figure.msg_per_s / 2:.0f} msg/s (half peak)",
        flush=True,
    )


async def smtpfleet(
    stack: contextlib.AsyncExitStack,
    nodes: int,
    sink: SmtpSink,
    workers: int = 1,
    delivery_concurrency: int | None = None,
    default_config: bool = False,
    tls: TlsFiles | None = None,
) -> Server:
    """A cluster for the whole run (closed with `stack`); with `tls`, its certificate."""
    overrides: dict[str, Any] = {
        "queue": {"durability": "fsync"},
        "inbound": {"max_sessions": 5000},
        "health": {"interval_s": 5.0},
    }
    if tls is not None:
        overrides["inbound"]["tls"] = {
            "cert_file": str(tls.cert_file),
            "key_file": str(tls.key_file),
        }
    if delivery_concurrency is not None:
        overrides["delivery"] = {"concurrency": delivery_concurrency}
    cluster = LocalCluster(
        nodes=nodes,
        workers=workers,
        relays=[sink.address],
        # The default configuration: `queue.durability: server` on a Redis that fsyncs its AOF
        # every second (as `smtpfleet dev` runs it), for the accept latency target.
        overrides={} if default_config else overrides,
        appendfsync="everysec" if default_config else "always",
    )
    name = f"smtpfleet, {nodes} node{'s' if nodes > 1 else ''}"
    if workers > 1:
        name += f" x {workers} workers"
    if delivery_concurrency is not None:
        name += f", delivery.concurrency {delivery_concurrency}"
    if default_config:
        name += ", default configuration"
    await stack.enter_async_context(cluster)
    assert cluster.redis is not None
    return Server(
        name,
        [n.smtp for n in cluster.node_processes],
        [n.pid for n in cluster.node_processes],
        [cluster.redis.pid] if cluster.redis.pid is not None else [],
    )


@contextlib.contextmanager
def postfix_relay(sink: SmtpSink, extra: tuple[str, ...] = ()) -> Iterator[tuple[str, int]]:
    """Postfix as a pure relay to the sink (PEERS.md's setup); its config is restored after.
    `extra`: more main.cf settings (bench_tls.py adds its certificate)."""
    saved = {path: Path(path).read_bytes() for path in POSTFIX_FILES}
    port = free_port()
    settings = [
        "mydestination =",
        "inet_interfaces = loopback-only",
        "inet_protocols = ipv4",
        "mynetworks = 127.0.0.0/8",
        f"relayhost = [127.0.0.1]:{sink.port}",
        "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
        *extra,
    ]
    run = ["postconf", "-e", *settings]
    try:
        subprocess.run(run, check=True)
        subprocess.run(["postconf", "-M#", "smtp/inet"], check=True)
        service = f"127.0.0.1:{port}/inet=127.0.0.1:{port} inet n - n - - smtpd"
        subprocess.run(["postconf", "-M", service], check=True)
        subprocess.run(["postconf", "-F", "*/*/chroot = n"], check=True)
        subprocess.run(["postfix", "check"], check=True)
        subprocess.run(["postfix", "start"], check=True, capture_output=True)
        _wait_port(port)
        yield ("127.0.0.1", port)
    finally:
        subprocess.run(["postfix", "stop"], capture_output=True)
        for path, data in saved.items():
            Path(path).write_bytes(data)


def _wait_port(port: int, what: str = "postfix") -> None:
    import socket

    for _ in range(100):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port}")


Start = Callable[[contextlib.AsyncExitStack], Awaitable[Server]]


def paths(sink: SmtpSink, args: argparse.Namespace) -> list[Start]:
    """How to start each path (into a stack that stops it), the ceiling first, Postfix last."""

    async def ceiling(stack: contextlib.AsyncExitStack) -> Server:
        return Server("smtp-source -> smtp-sink (ceiling)", [("127.0.0.1", sink.port)])

    async def postfix(stack: contextlib.AsyncExitStack) -> Server:
        return Server("Postfix 3.7 relay", [stack.enter_context(postfix_relay(sink))])

    starts: list[Start] = [
        ceiling,
        lambda stack: smtpfleet(stack, 1, sink),
        lambda stack: smtpfleet(stack, 1, sink, workers=os.cpu_count() or 1),
        lambda stack: smtpfleet(stack, 1, sink, default_config=True),
    ]
    if args.all:
        # Fewer deliveries in flight: the accept latency side of the trade.
        starts.append(lambda stack: smtpfleet(stack, 1, sink, delivery_concurrency=16))
        starts.append(lambda stack: smtpfleet(stack, 3, sink))
    return [*starts, postfix]


async def one_run(args: argparse.Namespace, number: int) -> list[Figure]:
    """Throughput: every path is up at once and measured in turn within each shape, so that
    smtpfleet and Postfix in one shape are measured minutes apart at most, not a whole run
    (the VM's drift between the two figures of a ratio is what it would otherwise carry); the
    order of the paths alternates from one shape (and run) to the next.

    Accept latency: each path again, alone, at half of its peak: the idle paths' own work
    (heartbeats fsynced by their Redis) showed in the others' tail when they ran beside them.

    The figures come back path by path, each path's shapes in SHAPES order."""
    sink = SmtpSink()
    follower = asyncio.create_task(sink.follow())
    try:
        starts = paths(sink, args)
        figures: dict[tuple[str, str], Figure] = {}
        async with contextlib.AsyncExitStack() as stack:
            servers = [await start(stack) for start in starts]
            for server in servers:
                await warm_up(sink, server)
            for i, shape in enumerate(SHAPES):
                for server in in_turn(servers, number, i):
                    figures[server.name, shape] = await measure(sink, server, args, shape)
        if args.latency:
            for start in starts:
                async with contextlib.AsyncExitStack() as stack:
                    server = await start(stack)
                    await warm_up(sink, server)
                    for shape in SHAPES:
                        await measure_latency(server, args, figures[server.name, shape])
        return [figures[server.name, shape] for server in servers for shape in SHAPES]
    finally:
        sink.stop()
        follower.cancel()


def _median(runs: list[list[Figure]], i: int) -> Figure:
    first = runs[0][i]
    values = [
        statistics.median(getattr(r[i], key) for r in runs)
        for key in ("msg_per_s", "p50_ms", "p99_ms", "cpu_ms_per_msg", "tail_s")
    ]
    cores = {
        role: statistics.median(r[i].cores.get(role, 0.0) for r in runs) for role in CORE_ROLES
    }
    return Figure(first.path, first.shape, *values, cores=cores)


def run_by_run(ratios: list[float]) -> str:
    """Each run's own ratio to Postfix, and their median: a run compares both under the same
    conditions, where the ratio of the medians may pair figures of different runs (Postfix
    alone moves by a third between runs on this machine). bench_tls.py prints them too."""
    each = ", ".join(f"{x:.2f}" for x in ratios)
    return f"{each} ({statistics.median(ratios):.2f}x)"


def report(runs: list[list[Figure]], args: argparse.Namespace) -> None:
    medians = [_median(runs, i) for i in range(len(runs[0]))]
    print(
        f"\n{args.messages} messages of {args.size} B, {args.sessions} concurrent sessions, "
        f"median of {len(runs)} run(s)"
    )
    for shape in SHAPES:
        indexes = [i for i, f in enumerate(medians) if f.shape == shape]
        rows = [medians[i] for i in indexes]
        ceiling, postfix = rows[0].msg_per_s or 1.0, rows[-1].msg_per_s or 1.0
        print(f"\n{shape}\n")
        print(
            "| path | msg/s | vs Postfix | vs Postfix, run by run (median) | vs ceiling "
            "| node CPU ms/msg | tail s | p50/p99 ms |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for i, f in zip(indexes, rows, strict=True):
            cpu = f"{f.cpu_ms_per_msg:.2f}" if f.cpu_ms_per_msg else "-"
            lat = f"{f.p50_ms:.1f} / {f.p99_ms:.1f}" if f.p99_ms else "-"
            ratios = [r[i].msg_per_s / (r[indexes[-1]].msg_per_s or 1.0) for r in runs]
            print(
                f"| {f.path} | {f.msg_per_s:,.0f} | {f.msg_per_s / postfix:.2f}x "
                f"| {run_by_run(ratios)} "
                f"| {f.msg_per_s / ceiling:.2f}x | {cpu} | {f.tail_s:.2f} | {lat} |"
            )
        print(f"\nwhere the {os.cpu_count()} cores went during the load (cores used)\n")
        print("| path | " + " | ".join(CORE_ROLES) + " |")
        print("|---|" + "---|" * len(CORE_ROLES))
        for f in rows:
            print(f"| {f.path} | " + " | ".join(f"{f.cores[r]:.2f}" for r in CORE_ROLES) + " |")


async def main(args: argparse.Namespace) -> None:
    ensure_postfix_tools()
    runs = []
    for i in range(args.runs):
        print(f"run {i + 1} of {args.runs}", flush=True)
        runs.append(await one_run(args, i))
    report(runs, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=6_000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--all", action="store_true", help="also concurrency 16 and 3 nodes")
    parser.add_argument(
        "--no-latency", dest="latency", action="store_false", help="throughput only"
    )
    uvloop.run(main(parser.parse_args()))
