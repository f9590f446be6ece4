"""The drill's pure measurements: the fault window's latencies and the drill loop's own lag."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import pytest

from smtpfleet.drills.context import Scenario
from smtpfleet.drills.measures import accept_rto_s, duplicates
from smtpfleet.drills.runner import _until_accepting_again
from smtpfleet.drills.scenarios import SCENARIOS
from smtpfleet.drills.timing import SAMPLE_S
from smtpfleet.drills.verdict import (
    Sample,
    _judge,
    fault_delivery_max_s,
    fault_latencies,
    loop_lag_s,
)
from smtpfleet.loadgen.paced import PacedLoad, Sent

START = 1000.0  # monotonic time the drill started


def sent(at_s: float, latency_s: float, code: int = 250) -> Sent:
    return Sent(tag=f"m{at_s}", at=START + at_s, code=code, latency_s=latency_s, attempts=1)


def test_fault_latencies_are_those_sent_inside_the_window_measured_from_the_start() -> None:
    messages = [
        sent(2.9, 0.001),  # before the fault
        sent(3.0, 0.5),
        sent(4.5, 0.2),
        sent(6.0, 0.3),
        sent(6.1, 0.004),  # after the heal
        sent(4.0, 9.9, code=451),  # refused: no accept latency to speak of
    ]
    assert fault_latencies(messages, START, 3.0, 6.0) == [0.5, 0.2, 0.3]


def test_loop_lag_is_the_longest_oversleep_of_the_sampler() -> None:
    times = [0.0, SAMPLE_S, 2 * SAMPLE_S, 2 * SAMPLE_S + 1.3, 3 * SAMPLE_S + 1.3]
    timeline = [Sample(t, delivered=0, accepted=0) for t in times]
    assert loop_lag_s(timeline) == pytest.approx(1.3 - SAMPLE_S)


def test_an_on_time_or_empty_timeline_has_no_lag() -> None:
    assert loop_lag_s([]) == 0.0
    assert loop_lag_s([Sample(i * SAMPLE_S, 0, 0) for i in range(10)]) == pytest.approx(0.0)


def test_fault_delivery_is_the_slowest_send_to_first_arrival_inside_the_window() -> None:
    messages = [sent(2.0, 0.01), sent(3.0, 0.01), sent(4.0, 0.01), sent(5.0, 0.01, code=451)]
    arrivals = {"m2.0": START + 9.0, "m3.0": START + 3.2, "m4.0": START + 6.5}
    assert fault_delivery_max_s(messages, arrivals, START, 3.0, 6.0) == pytest.approx(2.5)
    assert fault_delivery_max_s(messages, {}, START, 3.0, 6.0) is None


def test_a_floor_not_reached_fails_the_drill() -> None:
    tempfail = SCENARIOS["relay-tempfail"]
    assert tempfail.floors == {"relay_refusals": 1}
    met = dict.fromkeys(tempfail.objectives, 0) | {"relay_refusals": 3}
    assert _judge(tempfail, tempfail.objectives, met) == []
    assert _judge(tempfail, tempfail.objectives, met | {"relay_refusals": 0}) == [
        "relay_refusals = 0 < 1: the fault was not exercised"
    ]


def test_duplicates_are_counted_only_for_this_drills_messages() -> None:
    # A running cluster's relays keep earlier drills' mail, and their duplicates with it.
    deliveries = {"earlier-1": 3, "earlier-2": 2, "this-1": 1, "this-2": 2, "this-3": 4}
    assert duplicates(deliveries, ["this-1", "this-2", "this-3", "this-4"]) == 4
    assert duplicates(deliveries, []) == 0


async def _noop(_: object) -> None:
    return None


class _Load:
    """What `_until_accepting_again` reads of a PacedLoad: the attempts recorded so far."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []


async def test_the_load_runs_on_while_senders_are_refused_until_one_is_accepted() -> None:
    # A drill's recovery window ended with senders still refused: within its accept RTO
    # objective the load goes on, so a fleet that comes back late is measured, not "never".
    scenario = Scenario("late", "comes back late", _noop, objectives={"accept_rto_s": 10})
    start = time.monotonic()
    load = _Load()
    load.sent.append(Sent("r", start + 0.1, 451, 0.01, 1))

    async def accepted_later() -> None:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        load.sent.append(Sent("a", now, 250, 0.0, 1, done=now))

    later = asyncio.create_task(accepted_later())
    await _until_accepting_again(scenario, cast(PacedLoad, load), start, inject_s=0.0)
    waited = time.monotonic() - start
    await later
    assert 1.0 <= waited < 5.0
    assert accept_rto_s(load.sent, start, 0.0) is not None


async def test_the_load_stops_at_the_objective_when_senders_stay_refused() -> None:
    scenario = Scenario("never", "never back", _noop, objectives={"accept_rto_s": 1})
    start = time.monotonic()
    load = _Load()
    load.sent.append(Sent("r", start + 0.1, 451, 0.01, 1))
    await _until_accepting_again(scenario, cast(PacedLoad, load), start, inject_s=0.0)
    assert 2.0 <= time.monotonic() - start < 4.0  # the objective and a second of grace


async def test_without_an_accept_rto_objective_the_load_stops_on_time() -> None:
    scenario = Scenario("plain", "no rto", _noop)
    load = _Load()
    load.sent.append(Sent("r", time.monotonic(), 451, 0.01, 1))
    started = time.monotonic()
    await _until_accepting_again(scenario, cast(PacedLoad, load), started, inject_s=0.0)
    assert time.monotonic() - started < 0.1
