"""The load generator's accept latency is what the issue's targets mean by it: from the
message's final dot written to its reply read, not the whole MAIL-RCPT-DATA transaction."""

from __future__ import annotations

import time

import pytest

from smtpfleet.loadgen import run_load
from smtpfleet.testing.sink import Faults, Sink

pytestmark = [pytest.mark.timeout(30), pytest.mark.solo]

REPLY_DELAY_S = 0.15  # before every reply but the greeting: MAIL, RCPT, DATA and the dot


async def test_accept_latency_is_the_final_dot_to_its_reply() -> None:
    async with Sink(name="slow", faults=Faults(delay_s=REPLY_DELAY_S)) as sink:
        host, port = sink.address.rsplit(":", 1)
        started = time.perf_counter()
        result = await run_load([(host, int(port))], total=4, concurrency=2, per_session=2)
        elapsed = time.perf_counter() - started
    assert result.codes == {250: 4}
    assert sink.accepted == 4
    # Each sender's two messages took MAIL, RCPT, DATA and the dot: four delayed replies each.
    assert elapsed >= 2 * 4 * REPLY_DELAY_S
    assert len(result.latencies_s) == 4
    assert all(REPLY_DELAY_S <= latency < 2 * REPLY_DELAY_S for latency in result.latencies_s)
