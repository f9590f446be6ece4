"""`smtpfleet drill --target FILE` against a cluster the drill did not start.

The cluster (3 node processes, real Redis) and its two relays (recording relays, separate
processes) are started here, apart from the drill, as an operator's cluster would be. The
target file uses the Kubernetes preset, and a stand-in `kubectl` on PATH records each call
and acts on the local processes: the code that drills a real cluster is what runs here.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from smtpfleet.config import parse_hostport
from smtpfleet.drills.remote import RemoteSink
from smtpfleet.drills.runner import DRILL_CONFIG
from smtpfleet.testing.client import send
from smtpfleet.testing.fake_kubectl import install
from smtpfleet.testing.localcluster import LocalCluster

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow, pytest.mark.solo]


@pytest.fixture
def relays() -> Iterator[list[dict[str, str]]]:
    processes, addresses = [], []
    try:
        for i in range(2):
            process = subprocess.Popen(
                [sys.executable, "-m", "smtpfleet.testing.recording_relay", "--name", f"r{i}"],
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
async def cluster(relays: list[dict[str, str]]) -> AsyncIterator[LocalCluster]:
    smtp = [r["smtp"] for r in relays]
    async with LocalCluster(nodes=3, relays=smtp, overrides=DRILL_CONFIG) as running:
        yield running


def _target(cluster: LocalCluster, relays: list[dict[str, str]], tmp_path: Path) -> Path:
    nodes = cluster.node_processes
    target = {
        "name": "ci-local",
        "smtp": [f"127.0.0.1:{n.smtp_port}" for n in nodes],
        "redis": {"url": cluster.redis_url},
        "sinks": [f"http://{r['http']}" for r in relays],
        "metrics": [f"http://127.0.0.1:{n.http_port}/metrics" for n in nodes],
        "relay": "relay-1",
        "preset": "kubernetes",
        "kubernetes": {"namespace": "mail"},
        # The plain-command form for one fault: what an operator writes without kubectl.
        "faults": {
            "relay-down": {
                "inject": f"{sys.executable} -m smtpfleet.testing.recording_relay control "
                f"http://{relays[0]['http']} listening=0",
                "heal": f"{sys.executable} -m smtpfleet.testing.recording_relay control "
                f"http://{relays[0]['http']} listening=1",
            }
        },
    }
    path = tmp_path / "target.yaml"
    path.write_text(yaml.safe_dump(target), encoding="utf-8")
    state = {
        "log": str(tmp_path / "kubectl.log"),
        "pods": {f"smtpfleet-{n.index}": n.pid for n in nodes},
        "relays": {"smtpfleet-relay": f"http://{relays[0]['http']}"},
        "redis": {},
    }
    (tmp_path / "state.json").write_text(json.dumps(state), encoding="utf-8")
    install(tmp_path / "bin", tmp_path / "state.json")
    return path


def _drill(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", "smtpfleet", "drill", *args, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=150,
        check=False,
    )


def _report(tmp_path: Path, name: str) -> dict[str, object]:
    report: dict[str, object] = json.loads((tmp_path / "out" / f"{name}.json").read_text())
    return report


async def test_kill_node_and_relay_down_on_a_running_cluster_through_its_commands(
    cluster: LocalCluster, relays: list[dict[str, str]], tmp_path: Path
) -> None:
    target = _target(cluster, relays, tmp_path)
    done = _drill(tmp_path, "kill-node", "--target", str(target), "--short", "--rate", "30")
    assert done.returncode == 0, done.stdout + done.stderr
    # It said what it would do before doing it.
    assert done.stdout.index("drill plan for target 'ci-local'") < done.stdout.index("PASS")
    assert "--grace-period=0 --force" in done.stdout
    calls = [json.loads(line) for line in (tmp_path / "kubectl.log").read_text().splitlines()]
    assert (calls[0][:6]) == [
        "--namespace",
        "mail",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=smtpfleet",
    ]
    assert calls[1][2:4] == ["delete", "pod/smtpfleet-1"]
    assert cluster.node_processes[0].wait(5.0) is not None  # the stand-in really killed it
    report = _report(tmp_path, "kill-node")
    metrics = report["metrics"]
    assert isinstance(metrics, dict)
    assert metrics["lost"] == 0
    assert metrics["accepted"] > 100
    assert isinstance(metrics["takeovers"], int)  # read from the survivors' /metrics

    done = _drill(tmp_path, "relay-down", "--target", str(target), "--short", "--rate", "30")
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = _report(tmp_path, "relay-down")["metrics"]
    assert isinstance(metrics, dict)
    assert metrics["lost"] == 0
    assert metrics["detection_s"] is not None


def test_a_target_that_is_not_loopback_is_refused(tmp_path: Path) -> None:
    target = {
        "smtp": ["192.0.2.10:25"],
        "redis": {"url": "redis://127.0.0.1:6379/0"},
        "sinks": ["http://127.0.0.1:8025"],
        "faults": {"kill-node": {"inject": "true"}},
    }
    path = tmp_path / "far.yaml"
    path.write_text(yaml.safe_dump(target), encoding="utf-8")
    done = _drill(tmp_path, "kill-node", "--target", str(path))
    assert done.returncode == 2
    assert "192.0.2.10" in done.stderr
    assert "allow_hosts" in done.stderr
    # Named in the file, it is allowed: the plan is printed (a dry run does nothing more).
    path.write_text(yaml.safe_dump({**target, "allow_hosts": ["192.0.2.10"]}), encoding="utf-8")
    done = _drill(tmp_path, "kill-node", "--target", str(path), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "kill-node: inject  true" in done.stdout


def test_a_scenario_the_target_has_no_commands_for_is_refused_naming_the_key(
    tmp_path: Path,
) -> None:
    target = {
        "name": "k8s",
        "smtp": ["127.0.0.1:2525"],
        "redis": {"url": "redis://127.0.0.1:6379/0"},
        "sinks": ["http://127.0.0.1:8025"],
        "preset": "kubernetes",
        "kubernetes": {"namespace": "mail"},
    }
    path = tmp_path / "k8s.yaml"
    path.write_text(yaml.safe_dump(target), encoding="utf-8")
    # The preset has no partition (it cannot know the islands): refused before anything runs.
    done = _drill(tmp_path, "net-partition", "--target", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "faults.net-partition" in done.stderr
    assert "Traceback" not in done.stderr
    assert "drill plan" not in done.stdout
    # The preset's network faults: tc in the pod's namespace, by an ephemeral debug container.
    done = _drill(tmp_path, "net-redis-cut", "--target", str(path), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "kubectl --namespace mail debug --profile=netadmin" in done.stdout
    assert (
        "tc filter add dev eth0 egress pref 4915 protocol $F dst $PEER action drop" in done.stdout
    )
    assert "tc filter del dev eth0 ingress pref 4915" in done.stdout  # the heal
    # A fault entry without its inject command: the error names the key.
    path.write_text(
        yaml.safe_dump({**target, "faults": {"net-redis-cut": {"heal": "true"}}}), encoding="utf-8"
    )
    done = _drill(tmp_path, "net-redis-cut", "--target", str(path), "--dry-run")
    assert done.returncode == 2
    assert "faults.net-redis-cut.inject: missing" in done.stderr
    assert "Traceback" not in done.stderr


async def test_refreshes_that_overlap_count_every_message_once(
    relays: list[dict[str, str]],
) -> None:
    """The drill's sampler and its fault steps both refresh the relays' records; two fetches
    from the same count once appended the same page twice (duplicates) and made the next skip
    as many messages ("lost": 15 in a net-relay-cut against a target)."""
    for _ in range(3):
        assert (await send(parse_hostport(relays[0]["smtp"]))).code == 250
    sink = RemoteSink(f"http://{relays[0]['http']}", "relay-1")
    await asyncio.gather(sink.refresh(), sink.refresh(), sink.refresh())
    assert sink.count == 3
