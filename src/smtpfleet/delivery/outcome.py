"""What becomes of a message after one delivery attempt: pure bookkeeping, no I/O.

Per recipient (DESIGN invariant 3): 2xx is done; 5xx bounces; 4xx, connection errors and
timeouts (already tried on every relay in order) wait in the retry set until the lifetime
runs out, and then bounce with 4.4.7 (RFC 3463: delivery time expired).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from smtpfleet.config import RetryConfig
from smtpfleet.delivery.backoff import is_expired, next_due_ms, retry_delay_s
from smtpfleet.delivery.classify import Outcome, Verdict
from smtpfleet.delivery.dsn import RecipientFailure
from smtpfleet.envelope import QueuedMessage

EXPIRED_STATUS = "4.4.7"


@dataclass(frozen=True)
class Attempt:
    """The last answer for one recipient, and the relay host that gave it (None: none did).

    The host, not the relay's configured name: it becomes the DSN's Remote-MTA (RFC 3464).
    """

    verdict: Verdict
    relay: str | None


@dataclass(frozen=True)
class Plan:
    delivered: tuple[str, ...]
    failed: tuple[RecipientFailure, ...]
    retry: QueuedMessage | None
    retry_due_ms: int
    expired: bool


def plan_outcome(
    message: QueuedMessage,
    attempts: dict[str, Attempt],
    *,
    now_ms: int,
    retry: RetryConfig,
    rng: random.Random | None = None,
) -> Plan:
    delivered = tuple(r for r, a in attempts.items() if a.verdict.outcome is Outcome.DELIVERED)
    failed = [_failure(r, a) for r, a in attempts.items() if a.verdict.outcome is Outcome.PERMANENT]
    waiting = {r: a for r, a in attempts.items() if a.verdict.outcome is Outcome.TEMPORARY}
    if not waiting:
        return Plan(delivered, tuple(failed), None, 0, expired=False)
    if is_expired(message.accepted_ms, now_ms, retry.lifetime_s):
        failed.extend(_failure(r, a, status=EXPIRED_STATUS) for r, a in waiting.items())
        return Plan(delivered, tuple(failed), None, 0, expired=True)
    errors = {r: a.verdict.text for r, a in waiting.items()}
    again = message.retry_of(tuple(waiting), errors)
    delay_s = retry_delay_s(
        again.attempts,
        initial_s=retry.initial_s,
        max_s=retry.max_s,
        multiplier=retry.multiplier,
        jitter=retry.jitter,
        rng=rng,
    )
    due_ms = next_due_ms(
        now_ms, delay_s, accepted_ms=message.accepted_ms, lifetime_s=retry.lifetime_s
    )
    return Plan(delivered, tuple(failed), again, due_ms, expired=False)


def _failure(recipient: str, attempt: Attempt, status: str | None = None) -> RecipientFailure:
    return RecipientFailure(
        recipient=recipient,
        status=status or attempt.verdict.status,
        diagnostic=attempt.verdict.text,
        remote_mta=attempt.relay,
    )
