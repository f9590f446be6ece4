"""Retry schedule: exponential backoff with jitter, bounded by the message lifetime. Pure."""

from __future__ import annotations

import random

# 2**64 overflows nothing in Python, but float math on huge exponents does: cap the exponent.
MAX_EXPONENT = 64


def retry_delay_s(
    attempt: int,
    *,
    initial_s: float,
    max_s: float,
    multiplier: float,
    jitter: float,
    rng: random.Random | None = None,
) -> float:
    """Delay before retry number `attempt` (1 is the first retry).

    Jitter spreads retries of messages that failed together (a relay outage) so they do not
    come back in one wave.
    """
    exponent = min(max(attempt, 1) - 1, MAX_EXPONENT)
    base = min(max_s, initial_s * multiplier**exponent)
    spread = base * jitter
    return max(0.0, base + (rng or random).uniform(-spread, spread))


def is_expired(accepted_ms: int, now_ms: int, lifetime_s: float) -> bool:
    """RFC 5321 4.5.4.1: give up (and bounce) once the message has queued this long."""
    return now_ms - accepted_ms >= lifetime_s * 1000
