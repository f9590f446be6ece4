"""`smtpfleet drill` on inputs a hostile operator tries: a dry run without a target, `--all`
with a name, bad target files, numbers that never end, a target out of reach, and Ctrl-C
(the drill stops everything it started; against a target, it heals the fault it injected).

Each runs the real command as its own process (in a process group of its own, killed with
everything it started if it outlasts its bound) and checks its exit code, that stderr is one
line without a traceback, and which processes it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from smtpfleet.cli import drill as drill_cli
from smtpfleet.cli import main
from smtpfleet.drills.scenarios import SCENARIOS
from smtpfleet.testing.client import finish_cli, start_cli
from smtpfleet.testing.localcluster import LocalCluster
from smtpfleet.testing.redis_server import RedisServer, free_port

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.slow,
]


class Descendants:
    """Every process a command started (and they started), seen by polling /proc."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, str] = {}

    def poll(self) -> None:
        parents: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    parents.setdefault(ppid, []).append(int(entry.name))
        todo = [self.root]
        while todo:
            for child in parents.get(todo.pop(), []):
                if child not in self.seen:
                    self.seen[child] = _command_line(child)
                todo.append(child)

    def alive(self) -> dict[int, str]:
        return {pid: line for pid, line in self.seen.items() if _alive(pid)}

    async def watch(self, process: asyncio.subprocess.Process) -> None:
        while process.returncode is None:
            self.poll()
            await asyncio.sleep(0.05)


def _command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def run_drill(
    *args: str, timeout_s: float = 30.0
) -> tuple[int, str, str, dict[int, str], float]:
    """The command to its end: exit code, stdout, stderr, what it started, seconds taken."""
    started = time.monotonic()
    process = await start_cli("drill", *args)
    descendants = Descendants(process.pid)
    watcher = asyncio.create_task(descendants.watch(process))
    code, out, err = await finish_cli(process, timeout_s)
    await watcher
    return code, out, err, descendants.seen, time.monotonic() - started


def one_line_without_traceback(err: str) -> str:
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


# -- a dry run, and --all with a name -------------------------------------------------------


def test_a_dry_run_without_a_target_prints_the_plan_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def started(*_: object, **__: object) -> None:
        raise AssertionError("a dry run started a drill")

    # Before: `--dry-run` was honoured on the --target path only; this ran a real drill.
    monkeypatch.setattr(drill_cli, "run_drill", started)
    monkeypatch.setattr(LocalCluster, "start", started)
    monkeypatch.setattr(RedisServer, "start", started)
    out_dir = tmp_path / "reports"
    code = main(["drill", "kill-node", "--dry-run", "--out", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("drill plan for a local cluster (--dry-run: nothing is started):")
    assert "kill-node: SIGKILL of a node mid-delivery" in out
    assert "on 3 nodes, 2 sink relays and one Redis server, durability fsync" in out
    assert not out_dir.exists()
    code = main(["drill", "--all", "--dry-run", "--short", "--rate", "30", "--nodes", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert all(f"  {name}: " in out for name in SCENARIOS)
    assert "redis-failover: " in out
    assert "a Sentinel set (a primary, 2 replicas, 3 Sentinels)" in out


async def test_a_dry_run_as_a_command_exits_at_once_and_starts_no_process(
    tmp_path: Path,
) -> None:
    code, out, err, started, took_s = await run_drill(
        "relay-down", "--dry-run", "--out", str(tmp_path / "out")
    )
    assert (code, err) == (0, "")
    assert "relay-down: a relay's listener goes away" in out
    assert started == {}
    assert took_s < 15


@pytest.mark.parametrize("name", ["kill-node", "no-such-scenario"])
async def test_all_with_a_scenario_name_is_a_usage_error(tmp_path: Path, name: str) -> None:
    # Before: the name was ignored, even an unknown one, and every drill ran.
    code, out, err, started, _ = await run_drill(
        "--all", name, "--dry-run", "--out", str(tmp_path / "out")
    )
    assert (code, out, started) == (2, "", {})
    assert one_line_without_traceback(err) == (
        f"smtpfleet: --all runs every scenario: drop {name!r} or drop --all"
    )


@pytest.mark.parametrize(
    "bad", [("--rate", "inf"), ("--duration", "inf"), ("--size", "100000000000000")]
)
async def test_a_number_that_never_ends_is_a_usage_error(
    tmp_path: Path, bad: tuple[str, str]
) -> None:
    code, out, err, started, _ = await run_drill("relay-down", *bad, "--out", str(tmp_path))
    assert (code, out, started) == (2, "", {})
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"smtpfleet drill: error: argument {bad[0]}: ")


# -- target files ---------------------------------------------------------------------------

REACHABLE = {
    "smtp": ["127.0.0.1:2525"],
    "redis": {"url": "redis://127.0.0.1:6379/0"},
    "sinks": ["http://127.0.0.1:8025"],
    "faults": {"relay-down": {"inject": "true", "heal": "true"}},
}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("a: [1, 2\n", "not valid YAML at line 2, column 1"),
        (bytes([0xF0, 0x28, 0x8C, 0xBC]) * 75, "not UTF-8 text (byte 0xf0 at offset 0)"),
        ({**REACHABLE, "smtp": [2525]}, "smtp[0]: expected HOST:PORT (a string), not 2525"),
        ({**REACHABLE, "redis": {"url": 5}}, "redis.url: expected a redis:// URL"),
        (
            {**REACHABLE, "redis": {"url": "redis://127.0.0.1:1/0", "sentinels": ["nope"]}},
            "redis.sentinels: 'nope': expected HOST:PORT",
        ),
        (
            {**REACHABLE, "preset": "kubernetes", "kubernetes": {"relay_replicas": "two"}},
            "kubernetes.relay_replicas: expected a whole number from 1 to 10000, not 'two'",
        ),
    ],
    ids=["yaml", "bytes", "smtp-int", "redis-url-int", "sentinel", "k8s-replicas"],
)
async def test_a_bad_target_file_is_one_line_naming_file_key_and_expectation(
    tmp_path: Path, content: bytes | str | dict[str, object], expected: str
) -> None:
    path = tmp_path / "target.yaml"
    if isinstance(content, dict):
        path.write_text(yaml.safe_dump(content))
    else:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    code, out, err, started, _ = await run_drill(
        "relay-down", "--target", str(path), "--out", str(tmp_path / "out")
    )
    assert (code, out, started) == (2, "", {})
    line = one_line_without_traceback(err)
    assert line.startswith(f"smtpfleet: {path}: "), line
    assert expected in line


async def test_a_target_out_of_reach_stops_the_drill_in_one_line(tmp_path: Path) -> None:
    closed = [free_port() for _ in range(3)]  # bound, then closed: nothing listens there
    target = {
        "smtp": [f"127.0.0.1:{closed[0]}"],
        "redis": {"url": f"redis://127.0.0.1:{closed[1]}/0"},
        "sinks": [f"http://127.0.0.1:{closed[2]}"],
        "faults": {"kill-node": {"inject": "true"}},
    }
    path = tmp_path / "far.yaml"
    path.write_text(yaml.safe_dump(target))
    args = ("kill-node", "--target", str(path), "--rate", "5", "--duration", "3")
    code, out, err, _, took_s = await run_drill(*args, "--out", str(tmp_path / "out"))
    assert code == 1
    assert "drill plan for target 'far'" in out
    line = one_line_without_traceback(err)
    assert line.startswith(
        f"smtpfleet: kill-node stopped: the target's Redis (redis://127.0.0.1:{closed[1]}/0) "
        "does not answer: "
    ), line
    assert line.endswith("; its fault was not injected"), line
    assert took_s < 15  # checked before the load starts, not found by the first probe


# -- Ctrl-C ---------------------------------------------------------------------------------


async def _interrupt_when(
    process: asyncio.subprocess.Process, descendants: Descendants, ready: Callable[[], object]
) -> float:
    """SIGINT once `ready()` holds (polling the process tree meanwhile); when it was sent."""
    deadline = time.monotonic() + 40
    while not ready():
        assert process.returncode is None, "the drill ended before it could be interrupted"
        assert time.monotonic() < deadline, "the drill never got there"
        descendants.poll()
        await asyncio.sleep(0.05)
    descendants.poll()
    process.send_signal(signal.SIGINT)
    return time.monotonic()


async def test_ctrl_c_stops_a_local_drill_and_every_process_it_started(tmp_path: Path) -> None:
    args = ("relay-down", "--rate", "5", "--duration", "6", "--nodes", "1")
    process = await start_cli("drill", *args, "--out", str(tmp_path))
    descendants = Descendants(process.pid)
    node_up: list[float] = []

    def load_running() -> bool:
        # The node process is up (Valkey was started before it): give it time to be ready
        # and the load time to start, so the interrupt lands mid-drill.
        if not node_up and any(" serve " in line for line in descendants.seen.values()):
            node_up.append(time.monotonic())
        return bool(node_up) and time.monotonic() - node_up[0] > 3

    interrupted = await _interrupt_when(process, descendants, load_running)
    code, _, err = await finish_cli(process, timeout_s=40)
    assert code == 130
    assert time.monotonic() - interrupted < 20
    assert one_line_without_traceback(err) == (
        "smtpfleet: interrupted: relay-down stopped, and every process it started with it"
    )
    assert any("valkey" in line or "redis" in line for line in descendants.seen.values())
    assert descendants.alive() == {}


@pytest.fixture
def relay() -> Iterator[dict[str, str]]:
    """A recording relay (SMTP + HTTP record), a process of its own as a target's would be."""
    process = subprocess.Popen(
        [sys.executable, "-m", "smtpfleet.testing.recording_relay"], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        yield json.loads(process.stdout.readline())
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


async def test_ctrl_c_against_a_target_heals_the_fault_it_injected(
    tmp_path: Path, redis_url: str, relay: dict[str, str]
) -> None:
    injected, healed = tmp_path / "inject.pid", tmp_path / "healed"
    target = {
        "name": "ci",
        "smtp": [relay["smtp"]],  # the load goes straight to the recording relay
        "redis": {"url": redis_url},
        "sinks": [f"http://{relay['http']}"],
        # A fault that lasts until it is healed: the inject command runs for a minute.
        "faults": {
            "relay-down": {
                "inject": f"echo $$ > {injected}; exec sleep 60",
                "heal": f"touch {healed}",
            }
        },
    }
    path = tmp_path / "ci.yaml"
    path.write_text(yaml.safe_dump(target))
    args = ("relay-down", "--target", str(path), "--rate", "5", "--duration", "8")
    process = await start_cli("drill", *args, "--out", str(tmp_path / "out"))
    descendants = Descendants(process.pid)
    try:
        interrupted = await _interrupt_when(
            process, descendants, lambda: injected.exists() and injected.read_text().strip()
        )
        code, _, err = await finish_cli(process, timeout_s=40)
        assert code == 130
        assert time.monotonic() - interrupted < 20
        assert one_line_without_traceback(err) == (
            "smtpfleet: interrupted: relay-down stopped; its fault was injected, and its heal "
            "command has run (exit 0)"
        )
        assert healed.exists()
        assert not _alive(int(injected.read_text()))  # the inject command was stopped too
        assert descendants.alive() == {}
    finally:  # without the fix the inject command outlived the drill
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(injected.read_text()), signal.SIGKILL)
