"""`smtpfleet dev --json`: one JSON line once ready, mail flows, SIGINT stops everything."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import pytest

from smtpfleet.testing import send

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
