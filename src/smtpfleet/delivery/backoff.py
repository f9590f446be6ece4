"""Retry schedule: exponential backoff with jitter, bounded by the message lifetime. Pure.

RFC 5321 section 4.5.4.1: the retry interval SHOULD be at least 30 minutes and the sender
SHOULD keep trying for 4-5 days; the defaults (RetryConfig) follow Postfix, which starts
sooner and backs off to an hour. DESIGN invariant 3: only mail that no healthy relay took
waits here.
"""

from __future__ import annotations

import math
import random


def retry_delay_s(
    attempt: int,
    *,
    initial_s: float,
    max_s: float,
    multiplier: float,
    jitter: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number `attempt` (1 is the first retry).

    The delay grows as initial_s * multiplier**(attempt - 1) up to max_s, then moves by up to
    ±jitter of itself, so messages that failed together (a relay outage) do not all come back
    in the same second. The result is in [0, max_s * (1 + jitter)].
    """
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more, not {attempt}")
    if initial_s < 0 or max_s < 0 or multiplier < 1 or not 0 <= jitter <= 1:
        raise ValueError("need initial_s >= 0, max_s >= 0, multiplier >= 1, 0 <= jitter <= 1")
    base = min(max_s, _grown(initial_s, multiplier, attempt - 1))
    spread = base * jitter
    delay = (rng or random).uniform(base - spread, base + spread)
    # uniform() may round just past either end; the bounds are part of the contract.
    return min(max(0.0, delay), max_s * (1 + jitter))


def _grown(initial_s: float, multiplier: float, exponent: int) -> float:
    # float(): an int multiplier would make ** build an exact integer with as many digits as
    # the attempt count asks for. A float power that overflows raises; it means "past max_s".
    try:
        return initial_s * float(multiplier) ** exponent
    except OverflowError:
        return math.inf if initial_s > 0 else 0.0  # 0 * inf would be NaN


def is_expired(accepted_ms: int, now_ms: int, lifetime_s: float) -> bool:
    """RFC 5321 section 4.5.4.1: give up (and bounce) once the message has queued this long."""
    return now_ms - accepted_ms >= lifetime_s * 1000


def next_due_ms(now_ms: int, delay_s: float, *, accepted_ms: int, lifetime_s: float) -> int:
    """When to try again: after the delay, but no later than the moment the lifetime runs out.

    Without the cap a message could sit up to max_s past its lifetime before anyone noticed
    it had expired; with it the last attempt happens on time and, if it fails, bounces.
    """
    expires_ms = accepted_ms + math.ceil(lifetime_s * 1000)
    return max(now_ms, min(now_ms + math.ceil(delay_s * 1000), expires_ms))
