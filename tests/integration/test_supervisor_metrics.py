"""`serve --workers` serves every worker's /metrics on one port, merged with a `worker` label.
A worker that dies while it answers leaves half a text behind: that worker is left out of the
scrape, not the scrape failed (a traceback in the supervisor's log, nothing for Prometheus)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from smtpfleet.config import Config
from smtpfleet.supervisor import Supervisor

pytestmark = pytest.mark.timeout(30)

WHOLE = b'# TYPE smtpfleet_x counter\nsmtpfleet_x_total{result="ok"} 3.0\n'
CUT = b'# TYPE smtpfleet_x counter\nsmtpfleet_x_total{result="o'  # and then the worker died


Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _answering(body: bytes) -> Answer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()).strip():
            pass  # the request and its headers
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    return answer


async def test_a_worker_cut_short_is_left_out_of_the_merged_metrics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    workers = Supervisor(Config(), None, 3)
    first, second, _ = workers._pool  # the third never answers: no socket at all
    servers = [
        await asyncio.start_unix_server(_answering(body), worker.socket_path)
        for worker, body in ((first, WHOLE), (second, CUT))
    ]
    try:
        with caplog.at_level(logging.WARNING, logger="smtpfleet.supervisor"):
            text = (await workers.metrics_text()).decode()
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
        workers._tmp.cleanup()  # run() would, at its end
    assert 'smtpfleet_x_total{result="ok",worker="1"} 3.0' in text
    assert 'worker="2"' not in text
    assert 'worker="3"' not in text
    assert "smtpfleet_workers_live" in text  # the supervisor's own series are there too
    assert [r.getMessage() for r in caplog.records if "unreadable /metrics" in r.getMessage()]
