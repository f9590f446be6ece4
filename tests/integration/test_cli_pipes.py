"""SIGPIPE and broken pipes: a long-running command never dies of a gone peer, a printing one
stops quietly when its reader goes away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from smtpfleet.testing import LocalCluster, send

pytestmark = pytest.mark.timeout(60)


def _ignored_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigIgn line")


async def test_a_node_ignores_sigpipe_so_a_gone_peer_cannot_kill_it() -> None:
    async with LocalCluster(nodes=1, sinks=1) as cluster:
        node = cluster.node_processes[0]
        assert _ignored_signals(node.pid) & (1 << (signal.SIGPIPE - 1))
        assert (await send(node.smtp)).code == 250


@pytest.mark.parametrize(
    "args",
    [["drill", "--list"], ["dead", "list"]],
    ids=["local", "cluster"],
)
def test_output_into_a_closed_pipe_ends_quietly_with_the_sigpipe_status(
    args: list[str], redis_url: str
) -> None:
    """Not blamed on Redis either, for the commands that talk to it."""
    if args != ["drill", "--list"]:
        args = [*args, "--redis", redis_url]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before we print a word, as with `| head -0`
    try:
        done = subprocess.run(
            [sys.executable, "-m", "smtpfleet", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 128 + signal.SIGPIPE
    assert b"Traceback" not in done.stderr
    assert done.stderr == b""
