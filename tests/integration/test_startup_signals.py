"""A node told to stop while it still waits for Redis stops then, not when its startup
timeout runs out (a rolling update or a Ctrl-C would otherwise wait that long)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest

from smtpfleet.lifecycle import EXIT_OK
from smtpfleet.testing.redis_server import free_port

pytestmark = pytest.mark.timeout(60)

STARTUP_TIMEOUT_S = 120  # far longer than the test may take


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_while_waiting_for_redis_stops_the_node_at_once(
    workers: str, signum: signal.Signals
) -> None:
    env = {
        **os.environ,
        "SMTPFLEET_CONFIG": "",
        # Nothing listens there (a port free a moment ago): the node waits for Redis to come.
        "SMTPFLEET_REDIS__URL": f"redis://127.0.0.1:{free_port()}/0",
        "SMTPFLEET_NODE__STARTUP_TIMEOUT_S": str(STARTUP_TIMEOUT_S),
        "SMTPFLEET_INBOUND__LISTEN": f'["127.0.0.1:{free_port()}"]',
        "SMTPFLEET_HTTP__LISTEN": "",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smtpfleet",
        "--log-format",
        "text",
        "serve",
        "--workers",
        workers,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stderr is not None
    said: list[bytes] = []
    try:
        # Every worker is waiting (in its first retry) before the signal comes.
        while sum(b"waiting for Redis" in line for line in said) < int(workers):
            line = await asyncio.wait_for(process.stderr.readline(), 20)
            assert line, b"".join(said).decode(errors="replace")
            said.append(line)
        signalled = time.monotonic()
        process.send_signal(signum)
        rest = await asyncio.wait_for(process.stderr.read(), 15)
        code = await process.wait()
        took_s = time.monotonic() - signalled
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    log = (b"".join(said) + rest).decode(errors="replace")
    assert code == EXIT_OK, log
    assert took_s < 10, log
    assert "stopped before it was ready" in log
    assert "Traceback" not in log
    assert "cannot start" not in log
