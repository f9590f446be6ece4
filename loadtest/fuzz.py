"""Fuzz a local cluster for minutes with hostile SMTP sessions; replay any failure by seed.

    python loadtest/fuzz.py [--seed N] [--minutes 10] [--nodes 2] [--concurrency 20]
    python loadtest/fuzz.py --seed N --replay 1234      # one session, its replies printed

Sessions come from `smtpfleet.testing.fuzz.Generator(seed)`: session k is the same for the same
seed on any machine. Batches run against the nodes of a `LocalCluster` in MX mode (accepted
domain example.net, no relay networks) until the time is up; then it checks that everything
acknowledged arrived at the sinks, nothing refused did, no node logged an ERROR, no node keeps
a connection of an ended session open, and every node still takes a plain message. Prints one
JSON summary; exit status 1 on any violation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any

import uvloop

from smtpfleet.testing import eventually, send
from smtpfleet.testing.fuzz import Driver, Findings, Generator, open_connections, tokens_in
from smtpfleet.testing.localcluster import LocalCluster

# Every session comes from one loopback address: the per-client rate limits (tested on their
# own) would refuse most of a run's mail. Its sessions are counted, with a cap never met.
NO_CLIENT_LIMITS = {"sessions": 100_000, "messages_per_minute": 0, "recipients_per_minute": 0}
MX_MODE: dict[str, Any] = {
    "inbound": {
        "relay_networks": [],
        "accepted_domains": ["example.net"],
        "limits": NO_CLIENT_LIMITS,
    }
}
BATCH = 200


async def fuzz(args: argparse.Namespace) -> dict[str, Any]:
    generator = Generator(args.seed)
    findings = Findings()
    async with LocalCluster(nodes=args.nodes, sinks=2, overrides=MX_MODE) as cluster:
        deadline = time.monotonic() + args.minutes * 60
        number = 0
        while time.monotonic() < deadline and not findings.violations:
            node = cluster.node_processes[number // BATCH % len(cluster.node_processes)]
            batch = [generator.session(n) for n in range(number, number + BATCH)]
            findings.add(await Driver(node.smtp).run(batch, args.concurrency))
            number += BATCH
        delivered = await _settle(cluster, findings)
        ports = [n.smtp[1] for n in cluster.node_processes]
        with contextlib.suppress(TimeoutError):  # reported below
            await eventually(lambda: not any(open_connections(p) for p in ports), timeout_s=15)
        kept_open = sum(open_connections(port) for port in ports)
        plain = [(await send(n.smtp)).code for n in cluster.node_processes]
        errors = [line for n in cluster.node_processes for line in _errors(n.log_path.read_text())]
    lost = sorted(findings.acknowledged - delivered)
    leaked = sorted(findings.refused & delivered)
    return {
        "seed": args.seed,
        "sessions": findings.sessions,
        "replies": findings.replies,
        "acknowledged": len(findings.acknowledged),
        "refused": len(findings.refused),
        "unknown": len(findings.unknown),
        "violations": findings.violations[:20],
        "lost": lost[:20],
        "refused_but_delivered": leaked[:20],
        "plain_after": plain,
        "error_log_lines": errors[:20],
        "connections_kept_open": kept_open,
        "ok": not (findings.violations or lost or leaked or errors or kept_open)
        and set(plain) == {250},
    }


async def _settle(cluster: LocalCluster, findings: Findings) -> set[str]:
    def delivered() -> set[str]:
        return {t for s in cluster.sink_servers for m in s.messages for t in tokens_in(m.data)}

    with contextlib.suppress(TimeoutError):  # what is missing then is reported as lost
        await eventually(lambda: findings.acknowledged <= delivered(), timeout_s=60)
    return delivered()


def _errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if '"level":"error"' in line or "Traceback" in line]


async def replay(args: argparse.Namespace) -> dict[str, Any]:
    session = Generator(args.seed).session(args.replay)
    async with LocalCluster(nodes=1, sinks=1, overrides=MX_MODE) as cluster:
        found = await Driver(cluster.node_processes[0].smtp).one(session)
    return {"session": args.replay, "groups": [[repr(x) for x in g] for g in session.groups]} | {
        "violations": found.violations,
        "acknowledged": sorted(found.acknowledged),
        "refused": sorted(found.refused),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--replay", type=int, metavar="SESSION", help="run one session")
    args = parser.parse_args()
    runner = replay(args) if args.replay is not None else fuzz(args)
    result = uvloop.run(runner)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0 if result.get("ok", not result.get("violations")) else 1


if __name__ == "__main__":
    sys.exit(main())
