"""Retry schedule: exponential growth, the cap, jitter, lifetime and the next due time."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpfleet.delivery.backoff import is_expired, next_due_ms, retry_delay_s

POSTFIX_LIKE = {"initial_s": 300.0, "max_s": 3600.0, "multiplier": 2.0}


def test_first_retry_waits_initial_then_doubles_up_to_the_cap() -> None:
    delays = [retry_delay_s(a, jitter=0.0, **POSTFIX_LIKE) for a in range(1, 8)]
    assert delays == [300, 600, 1200, 2400, 3600, 3600, 3600]


@given(
    attempt=st.integers(min_value=1, max_value=10**9),
    initial_s=st.floats(min_value=0, max_value=1e6),
    max_s=st.floats(min_value=0, max_value=1e7),
    multiplier=st.floats(min_value=1, max_value=1e6),
)
def test_without_jitter_delays_never_shrink_and_stay_capped(
    attempt: int, initial_s: float, max_s: float, multiplier: float
) -> None:
    params = {"initial_s": initial_s, "max_s": max_s, "multiplier": multiplier, "jitter": 0.0}
    delay = retry_delay_s(attempt, **params)
    following = retry_delay_s(attempt + 1, **params)
    assert 0 <= delay <= following <= max_s


@given(
    attempt=st.integers(min_value=1, max_value=10**6),
    jitter=st.floats(min_value=0, max_value=1),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_jittered_delays_stay_within_their_band(attempt: int, jitter: float, seed: int) -> None:
    rng = random.Random(seed)
    delay = retry_delay_s(attempt, jitter=jitter, rng=rng, **POSTFIX_LIKE)
    base = retry_delay_s(attempt, jitter=0.0, **POSTFIX_LIKE)
    assert 0 <= delay <= 3600 * (1 + jitter)
    assert base * (1 - jitter) - 1e-6 <= delay <= base * (1 + jitter) + 1e-6


def test_jitter_spreads_messages_that_failed_together() -> None:
    delays = {
        retry_delay_s(1, jitter=0.2, rng=random.Random(seed), **POSTFIX_LIKE) for seed in range(50)
    }
    assert len(delays) == 50
    assert min(delays) < 280
    assert max(delays) > 320
    assert all(240 <= d <= 360 for d in delays)


def test_the_same_rng_seed_gives_the_same_delay() -> None:
    first = retry_delay_s(3, jitter=0.5, rng=random.Random(7), **POSTFIX_LIKE)
    again = retry_delay_s(3, jitter=0.5, rng=random.Random(7), **POSTFIX_LIKE)
    assert first == again


@pytest.mark.parametrize(
    ("attempt", "multiplier"),
    [(10**12, 2), (10**12, 2.0), (3, 1e300), (10**6, 1.01)],
)
def test_huge_attempts_and_multipliers_reach_the_cap_without_overflow(
    attempt: int, multiplier: float
) -> None:
    delay = retry_delay_s(attempt, initial_s=300, max_s=3600, multiplier=multiplier, jitter=0)
    assert delay == 3600


def test_a_multiplier_of_one_keeps_the_initial_delay() -> None:
    assert retry_delay_s(10**9, initial_s=60, max_s=3600, multiplier=1, jitter=0) == 60


def test_a_zero_initial_delay_stays_zero_even_when_the_power_overflows() -> None:
    assert retry_delay_s(10**6, initial_s=0, max_s=3600, multiplier=1e300, jitter=0) == 0


@pytest.mark.parametrize(
    "params",
    [
        {"attempt": 0},
        {"attempt": -3},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"jitter": -0.1},
        {"initial_s": -1.0},
        {"max_s": -1.0},
    ],
)
def test_nonsense_arguments_are_refused(params: dict[str, float]) -> None:
    arguments: dict[str, float] = {"attempt": 1, "jitter": 0.2, **POSTFIX_LIKE, **params}
    attempt = int(arguments.pop("attempt"))
    with pytest.raises(ValueError, match=r"must|need"):
        retry_delay_s(attempt, **arguments)


def test_expiry_is_inclusive_and_ignores_clock_skew_into_the_future() -> None:
    assert is_expired(0, 1000, 1.0)
    assert not is_expired(0, 999, 1.0)
    assert is_expired(1_000, 1_000 + 5 * 86_400_000, 5 * 86_400.0)
    # Accepted "later" than now (another node's clock is ahead): not expired.
    assert not is_expired(10_000, 0, 1.0)


def test_next_due_is_now_plus_the_delay_rounded_up_to_the_millisecond() -> None:
    assert next_due_ms(1_000, 60.0, accepted_ms=0, lifetime_s=3600) == 61_000
    assert next_due_ms(1_000, 0.0004, accepted_ms=0, lifetime_s=3600) == 1_001


def test_next_due_never_passes_the_expiry_so_the_last_attempt_is_on_time() -> None:
    assert next_due_ms(3_000_000, 3600.0, accepted_ms=0, lifetime_s=3600) == 3_600_000


def test_next_due_is_now_when_the_lifetime_has_already_run_out() -> None:
    assert next_due_ms(5_000_000, 300.0, accepted_ms=0, lifetime_s=3600) == 5_000_000
