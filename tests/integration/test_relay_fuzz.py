"""The delivery side under a relay whose faults change at random (`testing/relay_fuzz.py`): a
few seconds of it per seed. `loadtest/relay_fuzz.py` runs it for minutes; a failure there
replays here with its seed."""

from __future__ import annotations

import os

import pytest

from smtpfleet.testing.relay_fuzz import run

pytestmark = pytest.mark.timeout(60)

SEEDS = [int(s) for s in os.environ.get("SMTPFLEET_RELAY_FUZZ_SEEDS", "18001,18002").split(",")]


@pytest.mark.parametrize("seed", SEEDS)
async def test_verdicts_match_what_the_relay_stored_whatever_it_does(seed: int) -> None:
    report = await run(seed, seconds=4.0, senders=8)
    assert report.violations == []
    # The run exercised what it is for: chained messages, and every kind of verdict.
    assert report.chained > 0
    assert {"delivered", "permanent", "temporary"} <= set(report.outcomes)
    assert report.sessions > 1  # sessions were dropped and replaced
    assert report.dropped > 0  # some instead of a reply, a stored message's among them
    assert report.stored > 0


async def test_verdicts_match_on_a_relay_without_pipelining() -> None:
    """The step-by-step path: every command waits for its reply, nothing chains."""
    report = await run(19001, seconds=4.0, senders=8, pipelining=False)
    assert report.violations == []
    assert report.chained == 0
    assert {"delivered", "permanent", "temporary"} <= set(report.outcomes)
    assert report.sessions > 1
    assert report.dropped > 0
    assert report.stored > 0
