"""What an attempt comes to for recipients our own limits held back: their expiry DSN reports
what a relay really said (RFC 3464 2.3.5-2.3.6), never our limit as if a relay had said it."""

from __future__ import annotations

from smtpfleet.config import RetryConfig
from smtpfleet.delivery.classify import classify_reply, limit_reached
from smtpfleet.delivery.outcome import Attempt, plan_outcome
from smtpfleet.envelope import QueuedMessage

RETRY = RetryConfig(initial_s=60, max_s=3600, multiplier=2, jitter=0, lifetime_s=3600)
LIFETIME_OVER_MS = 3_600_000
BUSY = "451 4.2.1 Mailbox busy"


def _message(last_errors: dict[str, str]) -> QueuedMessage:
    return QueuedMessage(
        "0.ABC", "s@example.com", tuple(last_errors), 0, attempts=3, last_errors=last_errors
    )


def test_an_expiry_our_limit_held_back_reports_the_relays_last_error() -> None:
    # The worker names the relay it asked; for our own limit it names none (worker._through).
    limited = Attempt(limit_reached(), None)
    plan = plan_outcome(
        _message({"a@x": BUSY}), {"a@x": limited}, now_ms=LIFETIME_OVER_MS, retry=RETRY
    )
    assert plan.expired
    (failure,) = plan.failed
    assert (failure.status, failure.diagnostic, failure.remote_mta) == ("4.4.7", BUSY, None)


def test_an_expiry_our_limit_held_back_names_no_relay_even_if_one_was_given() -> None:
    limited = Attempt(limit_reached(), "127.0.0.1")
    plan = plan_outcome(
        _message({"a@x": BUSY}), {"a@x": limited}, now_ms=LIFETIME_OVER_MS, retry=RETRY
    )
    assert plan.failed[0].remote_mta is None


def test_a_limited_recipient_keeps_its_real_error_beside_a_relays_4xx() -> None:
    """Backed off because another recipient got a relay's 4xx: the limited one's real error
    still reaches its expiry DSN, as it does when parked."""
    message = _message({"a@x": BUSY, "b@x": "451 4.3.0 try later"})
    attempts = {
        "a@x": Attempt(limit_reached(), None),
        "b@x": Attempt(classify_reply(452, "4.3.1 full"), "127.0.0.1"),
    }
    plan = plan_outcome(message, attempts, now_ms=1_000, retry=RETRY)
    assert plan.retry is not None
    assert plan.retry.last_errors == {"a@x": BUSY, "b@x": "452 4.3.1 full"}
