"""The availability measures of the Redis HA drills, on plain values."""

from __future__ import annotations

from smtpfleet.config import Durability
from smtpfleet.drills import measures
from smtpfleet.drills.scenarios import SCENARIOS
from smtpfleet.drills.verdict import Sample
from smtpfleet.loadgen.paced import Sent

START = 500.0


def sent(at_s: float, done_s: float, code: int) -> Sent:
    return Sent(f"m{at_s}", START + at_s, code, 0.001, 1, START + done_s)


def test_accept_rto_is_inject_to_the_first_250_after_the_last_refusal() -> None:
    load = [
        sent(2.0, 2.1, 250),  # before the inject
        sent(3.1, 3.2, 451),
        sent(3.5, 4.9, 451),  # the last refusal ends at 4.9
        sent(4.0, 4.5, 250),  # a 250 between refusals does not count as "back"
        sent(4.95, 5.2, 250),
        sent(5.1, 5.15, 250),  # the first 250 after 4.9 (by completion)
    ]
    assert measures.accept_rto_s(load, START, 3.0) == 2.15
    assert measures.refusal_window_s(load, START, 3.0) == 1.8  # 3.1 → 4.9


def test_no_refusal_means_no_outage_and_never_back_means_not_measured() -> None:
    assert measures.accept_rto_s([sent(4.0, 4.1, 250)], START, 3.0) == 0.0
    assert measures.refusal_window_s([sent(4.0, 4.1, 250)], START, 3.0) == 0.0
    assert measures.accept_rto_s([sent(4.0, 4.1, 451)], START, 3.0) is None


def test_in_flight_is_the_largest_backlog_inside_the_window() -> None:
    samples = [Sample(1.0, 10, 30), Sample(3.5, 20, 27), Sample(4.0, 20, 26), Sample(9, 0, 99)]
    assert measures.in_flight_max(samples, 3.0, 5.0) == 7
    assert measures.in_flight_max([], 3.0, 5.0) == 0


def test_takeovers_and_live_nodes_declared_dead_come_from_what_nodes_report() -> None:
    page = b"# HELP x\nsmtpfleet_takeovers_total 3.0\nsmtpfleet_takeovers_created 1.7e9\n"
    assert measures.takeovers_in(page) == 3
    assert measures.takeovers_in(b"") == 0
    lines = [
        '{"msg":"removed dead node node-2 (nothing left pending)"}',
        '{"msg":"took over 4 deliveries of dead node node-1"}',
        '{"msg":"delivered"}',
    ]
    assert measures.declared_dead(lines, alive={"node-2", "node-3"}) == 1


def test_lost_is_an_objective_of_the_failover_drills_only_in_replicated_mode() -> None:
    failover = SCENARIOS["redis-failover"]
    assert failover.objectives_for(Durability.REPLICATED)["lost"] == 0
    assert "lost" not in failover.objectives_for(Durability.SERVER)
    assert "lost" not in failover.objectives_for(Durability.FSYNC)
    assert SCENARIOS["kill-node"].objectives_for(Durability.SERVER)["lost"] == 0
