"""`smtpfleet drill net-redis-cut --target FILE`: a network fault made by the target file's
own commands, on a cluster the drill did not start.

The cluster (Redis and three nodes, each in a network namespace) and its two recording relays
are started here, apart from the drill, as an operator's cluster would be. The target file's
inject and heal are shell commands that cut node-1 off from Redis in the fabric's hub
(`python -m smtpfleet.testing.netcut`), as `tc` in a pod would in Kubernetes; the drill judges
the objectives from what it sees from outside: its load's replies, a message to every
endpoint, Redis, the relays and the nodes' /metrics. Needs root and iproute2 (skipped
elsewhere, saying why).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from smtpfleet.drills.runner import DRILL_CONFIG
from smtpfleet.testing.ipcmd import run
from smtpfleet.testing.netcut import bridge_ports
from smtpfleet.testing.netns import Fabric
from smtpfleet.testing.netns_cluster import NetnsCluster, hostport

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow, pytest.mark.solo]

RELAY_PORT = 2525
RELAY_REPLY_S = 0.15  # a delivery's four replies: 0.6 s, about six in flight on node-1


@pytest.fixture
def fabric() -> Iterator[Fabric]:
    with Fabric() as started:
        yield started


@pytest.fixture
def relays(fabric: Fabric) -> Iterator[list[dict[str, str]]]:
    """Two recording relays on addresses of the fabric (their HTTP record on loopback)."""
    processes, addresses = [], []
    try:
        for i in range(2):
            smtp = hostport(fabric.add_host_address(), RELAY_PORT)
            argv = ["--smtp", smtp, "--name", f"relay-{i + 1}"]
            process = subprocess.Popen(
                [sys.executable, "-m", "smtpfleet.testing.recording_relay", *argv],
                stdout=subprocess.PIPE,
            )
            processes.append(process)
            assert process.stdout is not None
            addresses.append(json.loads(process.stdout.readline()))
        yield addresses
    finally:
        for process in processes:
            process.kill()
            process.wait()
            if process.stdout is not None:
                process.stdout.close()


@pytest.fixture
async def cluster(fabric: Fabric, relays: list[dict[str, str]]) -> AsyncIterator[NetnsCluster]:
    smtp = [r["smtp"] for r in relays]
    async with NetnsCluster(
        nodes=3, sinks=0, relays=smtp, overrides=DRILL_CONFIG, fabric=fabric
    ) as running:
        yield running


def _target(cluster: NetnsCluster, relays: list[dict[str, str]], tmp_path: Path) -> Path:
    fabric = cluster.fabric
    assert cluster.redis_member is not None
    pair = f"{fabric.hub} {cluster.node_member(1).address} {cluster.redis_member.address}"
    netcut = f"{sys.executable} -m smtpfleet.testing.netcut"
    info = cluster.info()
    target = {
        "name": "ci-netns",
        "smtp": info["smtp"],
        "redis": {"url": cluster.redis_url},
        "sinks": [f"http://{r['http']}" for r in relays],
        "metrics": info["metrics"],
        "relay": "relay-1",
        # Not loopback: the fabric's addresses, each named, or the drill refuses to start.
        "allow_hosts": [m.address for m in fabric.members.values()],
        "faults": {
            "net-redis-cut": {"inject": f"{netcut} cut {pair}", "heal": f"{netcut} heal {pair}"}
        },
    }
    path = tmp_path / "target.yaml"
    path.write_text(yaml.safe_dump(target), encoding="utf-8")
    return path


def _filters(fabric: Fabric) -> str:
    return "".join(
        run("tc", "-n", fabric.hub, "filter", "show", "dev", port, "ingress")
        for port in bridge_ports(fabric.hub)
    )


def _drill(target: Path, out: Path) -> subprocess.CompletedProcess[str]:
    argv = ["drill", "net-redis-cut", "--target", str(target), "--short", "--rate", "30"]
    return subprocess.run(
        [sys.executable, "-m", "smtpfleet", *argv, "--out", str(out)],
        capture_output=True,
        text=True,
        env=dict(os.environ),  # PYTHONPATH too: the commands' python must import this code
        timeout=100,
        check=False,
    )


def _answer_after(relays: list[dict[str, str]], delay_s: float) -> None:
    """Each relay reply this late, as a real relay's are: node-1 then holds deliveries when
    it is cut off, work for the survivors to take over (relays that answer at once left it
    none at times, and the takeovers floor failed with nothing to take over)."""
    for relay in relays:
        url = f"http://{relay['http']}/control?delay_s={delay_s}"
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert json.loads(answer.read())["delay_s"] == delay_s


async def test_net_redis_cut_through_a_target_files_commands(
    cluster: NetnsCluster, relays: list[dict[str, str]], tmp_path: Path
) -> None:
    target = _target(cluster, relays, tmp_path)
    _answer_after(relays, RELAY_REPLY_S)
    done = _drill(target, tmp_path / "out")
    assert done.returncode == 0, done.stdout + done.stderr
    # It said what it would do before doing it.
    assert done.stdout.index("net-redis-cut: inject") < done.stdout.index("PASS")
    report = json.loads((tmp_path / "out" / "net-redis-cut.json").read_text())
    metrics = report["metrics"]
    assert metrics["accepted"] > 100
    assert metrics["lost"] == 0
    assert metrics["client_errors"] == 0
    assert metrics["cut_node_reply"] == 451  # one endpoint, the cut-off node, refused on the wire
    assert metrics["takeovers"] >= 1  # the survivors claimed its work (their /metrics)
    assert metrics["detection_s"] is not None  # node-1 left the members: its heartbeat stopped
    assert metrics["detection_s"] <= 5
    commands = report["settings"]["commands"]
    assert [c["command"].split()[3] for c in commands] == ["cut", "heal"]
    assert all(c["exit"] == 0 for c in commands), commands
    assert _filters(cluster.fabric) == ""  # the heal command removed every filter it added
