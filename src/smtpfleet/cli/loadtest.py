"""`smtpfleet loadtest`: load a cluster, then reconcile what it accepted with what arrived.

Run the sinks here (`--sink HOST:PORT`, the relays of the cluster under test) and every
accepted message is looked for at them: lost (got 250, never delivered), duplicated,
misrouted (wrong recipient) and unexpected mail are counted, and the command fails if any
of the first three is not zero. It fails too when no message at all was accepted; the
summary then says why (the first few causes: connection refused, a name not resolved, the
server's own replies).

Ctrl-C stops sending (and waiting for deliveries), prints the summary of what was sent so far,
marked as interrupted, and exits 130; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import signal
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

from smtpfleet.config import parse_hostport
from smtpfleet.loadgen.generator import LoadResult, run_load
from smtpfleet.loadgen.reconcile import Reconciliation, settle
from smtpfleet.testing.sink import Sink

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


class UsageError(ValueError):
    pass


def _addresses(values: list[str], allow_remote: bool, what: str) -> list[tuple[str, int]]:
    out = []
    for value in values:
        try:
            host, port = parse_hostport(value)
        except ValueError as exc:
            raise UsageError(f"{what} {exc}") from None
        if not allow_remote and not _is_loopback(host):
            raise UsageError(f"{what} {value} is not loopback: pass --allow-remote to load it")
        out.append((host, port))
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        targets = _addresses(args.target, args.allow_remote, "--target")
        sinks = _addresses(args.sink, False, "--sink")
        args.tls_context = _tls_context(args.starttls, args.tls_ca)
    except UsageError as exc:
        print(f"smtpfleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run(args, targets, sinks))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run could catch it
        print("smtpfleet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


@contextlib.contextmanager
def _ctrl_c(stop: asyncio.Event) -> Iterator[None]:
    """The first SIGINT sets `stop` (the run ends and reports); a second one raises
    KeyboardInterrupt out of the event loop: out at once, without the summary."""
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _run(
    args: argparse.Namespace, targets: list[tuple[str, int]], sinks: list[tuple[str, int]]
) -> int:
    stop = asyncio.Event()
    with _ctrl_c(stop):
        return await _load(args, targets, sinks, stop)


async def _load(
    args: argparse.Namespace,
    targets: list[tuple[str, int]],
    sinks: list[tuple[str, int]],
    stop: asyncio.Event,
) -> int:
    servers = [Sink(host, port, name=f"sink-{port}", pipelining=True) for host, port in sinks]
    try:
        for server in servers:
            await server.start()
    except OSError as exc:
        print(f"smtpfleet: cannot listen for --sink: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = await run_load(
            targets,
            total=args.count,
            duration_s=args.duration,
            rate=args.rate,
            concurrency=args.concurrency,
            size=args.size,
            per_session=args.per_session,
            starttls=args.tls_context,
            on_progress=_progress if sys.stderr.isatty() and not args.json else None,
            stop=stop,
        )
        recon = None
        if servers and not stop.is_set():
            recon = await settle(result.accepted_ids, servers, args.settle, stop)
    finally:
        for server in servers:
            await server.stop()
    if stop.is_set():
        settling = bool(servers) and not result.interrupted
        print(_interrupted(result, settling=settling), file=sys.stderr)
        # Interrupted while sending or waiting for deliveries: a reconciliation now would
        # count as lost what is merely on its way.
        result.interrupted, recon = True, None
    _print(result, recon, args.json, reconciled=bool(servers))
    if result.interrupted:
        return EXIT_INTERRUPTED
    if result.sent and not result.accepted:
        # Nothing measured: the targets refused every message or could not be reached.
        print("smtpfleet: no message was accepted by --target", file=sys.stderr)
        return EXIT_MISMATCH
    return EXIT_MISMATCH if recon is not None and not recon.clean else EXIT_OK


def _interrupted(result: LoadResult, *, settling: bool) -> str:
    if settling:
        return "smtpfleet: interrupted while waiting for deliveries: reconciliation skipped"
    return (
        f"smtpfleet: interrupted after {result.elapsed_s:.1f}s of sending: the summary is "
        "of what was sent until then"
    )


def _tls_context(starttls: bool, ca_file: Path | None) -> ssl.SSLContext | None:
    if ca_file is not None and not starttls:
        raise UsageError("--tls-ca needs --starttls")
    if not starttls:
        return None
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--tls-ca {ca_file}: {exc}") from exc


def _progress(result: LoadResult) -> None:
    rate = result.accepted / max(result.elapsed_s or 0.001, 0.001) if result.elapsed_s else 0
    sys.stderr.write(f"\rsent {result.sent:>8}  accepted {result.accepted:>8}  {rate:8.0f}/s ")
    sys.stderr.flush()


def _print(
    result: LoadResult, recon: Reconciliation | None, as_json: bool, *, reconciled: bool
) -> None:
    summary = result.summary()
    if recon is not None:
        summary["reconciliation"] = recon.as_dict()
    if as_json:
        print(json.dumps(summary))
        return
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    latency = summary["latency_ms"]
    assert isinstance(latency, dict)
    print(
        f"sent {result.sent}, accepted {result.accepted} in {result.elapsed_s:.1f}s "
        f"({summary['accepted_per_s']} msg/s)" + (" (interrupted)" if result.interrupted else "")
    )
    print("replies: " + ", ".join(f"{code}: {n}" for code, n in sorted(result.codes.items())))
    if result.causes:
        print("not accepted: " + "; ".join(f"{c} ({n})" for c, n in result.causes.items()))
    print("accept latency ms: " + ", ".join(f"{k} {v}" for k, v in latency.items()))
    if reconciled and recon is None:
        print("reconciliation skipped: interrupted")
    if recon is not None:
        r = recon.as_dict()
        verdict = "OK" if recon.clean else "MISMATCH"
        print(
            f"reconciliation {verdict}: delivered {r['delivered']}, lost {r['lost']}, "
            f"duplicated {r['duplicated']}, misrouted {r['misrouted']}, "
            f"unexpected {r['unexpected']}"
        )
