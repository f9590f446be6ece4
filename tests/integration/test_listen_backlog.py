"""A burst of new connections waits in the kernel's accept queue, not in SYN retries.

asyncio's default listen backlog is 100: the 101st client of a burst had its SYN dropped and
waited for the retry (1 s, then 3 s, 7 s ...). `loadtest/sessions.py` opened 822 of 1,000
sessions in 62 s that way, and all 1,000 in 0.4 s with the larger backlog.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from smtpfleet.inbound.server import LISTEN_BACKLOG
from smtpfleet.testing.inbound import inbound_front
from smtpfleet.testing.tools import need_program

pytestmark = pytest.mark.timeout(30)


async def listen_queue_limit(port: int) -> int:
    """The accept-queue limit the kernel applies to the socket listening on `port`.

    For a listening socket `ss` shows that limit in its Send-Q column.
    """
    ss = need_program("ss", "apt-get install iproute2")
    proc = await asyncio.create_subprocess_exec(
        ss, "-ltnH", f"sport = :{port}", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    (line,) = out.decode().splitlines()
    return int(line.split()[2])


async def test_listener_accept_queue_holds_a_burst() -> None:
    kernel_cap = int(Path("/proc/sys/net/core/somaxconn").read_text())  # noqa: ASYNC240
    async with inbound_front({"listen": ["127.0.0.1:0"]}) as front:
        limit = await listen_queue_limit(front.address()[1])
    assert limit == min(LISTEN_BACKLOG, kernel_cap)
    assert limit > 100  # asyncio's default, which a burst of MX connections overflows
