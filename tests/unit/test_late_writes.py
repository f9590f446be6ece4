"""Redis's clock as accepts show it: a deadline translated into it is never early."""

from __future__ import annotations

import pytest

from smtpfleet.queue.late_writes import RECENT, SLACK_MS, RedisClock

pytestmark = pytest.mark.timeout(10)


def test_no_deadline_before_redis_was_seen() -> None:
    assert RedisClock().deadline(1_000) is None


def test_the_tightest_recent_bound_wins() -> None:
    clock = RedisClock()
    clock.observe(began_ms=1_000, redis_ms=6_040)  # an accept that waited: a loose bound
    clock.observe(began_ms=2_000, redis_ms=7_003)  # Redis's clock is 5 s ahead, 3 ms of trip
    assert clock.deadline(10_000) == 10_000 + 5_003 + SLACK_MS


def test_old_bounds_are_forgotten() -> None:
    clock = RedisClock()
    clock.observe(began_ms=0, redis_ms=10)
    for i in range(RECENT):
        clock.observe(began_ms=i, redis_ms=i + 50)
    assert clock.deadline(0) == 50 + SLACK_MS


def test_a_late_refusal_starts_again_from_redis_time() -> None:
    """Redis's clock jumped ahead: the bounds kept would translate deadlines too early."""
    clock = RedisClock()
    clock.observe(began_ms=1_000, redis_ms=1_001)
    clock.restart(began_ms=2_000, redis_ms=62_000)
    assert clock.deadline(3_000) == 3_000 + 60_000 + SLACK_MS
