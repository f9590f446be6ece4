"""The delivery side under a relay whose faults change at random (`testing/relay_fuzz.py`): a
few seconds of it per seed, on uvloop as a node runs it. `loadtest/relay_fuzz.py` runs it for
minutes; a failure there replays here with its seed."""

from __future__ import annotations

import os

import pytest
import uvloop

from smtpfleet.testing.relay_fuzz import Report, run

pytestmark = pytest.mark.timeout(60)

SEEDS = [int(s) for s in os.environ.get("SMTPFLEET_RELAY_FUZZ_SEEDS", "18001,18002").split(",")]


def exercised(report: Report) -> None:
    """The run did what it is for: every kind of verdict, and sessions broken every way."""
    assert {"delivered", "permanent", "temporary"} <= set(report.outcomes)
    assert report.sessions > 1  # sessions were dropped and replaced
    assert report.dropped > 0  # some instead of a reply, a stored message's among them
    assert report.closed > 0  # some with a 421 instead of a reply
    assert report.stored > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_verdicts_match_what_the_relay_stored_whatever_it_does(seed: int) -> None:
    report = uvloop.run(run(seed, seconds=4.0, senders=8))
    assert report.violations == []
    assert report.chained > 0
    exercised(report)


def test_verdicts_match_on_a_relay_without_pipelining() -> None:
    """The step-by-step path: every command waits for its reply, nothing chains."""
    report = uvloop.run(run(19001, seconds=4.0, senders=8, pipelining=False))
    assert report.violations == []
    assert report.chained == 0
    exercised(report)
