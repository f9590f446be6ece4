"""What becomes of a message after one delivery attempt: pure bookkeeping, no I/O.

Per recipient (DESIGN invariant 3): 2xx is done; 5xx bounces; 4xx, connection errors and
timeouts (already tried on every relay in order) wait in the retry set until the lifetime
runs out, and then bounce with 4.4.7 (RFC 3463: delivery time expired). Failed recipients
get a DSN when their sender may be told (`is_bounce_worthy`), else they go to the dead
letters. The result is a `Finish`: what the queue records, in one transaction, when it
acknowledges the entry. The worker carries it out; it decides nothing again.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from smtpfleet.config import RetryConfig
from smtpfleet.delivery.backoff import is_expired, next_due_ms, retry_delay_s
from smtpfleet.delivery.classify import FailureKind, Outcome, Verdict
from smtpfleet.delivery.dsn import RecipientFailure, is_bounce_worthy
from smtpfleet.envelope import QueuedMessage

EXPIRED_STATUS = "4.4.7"
# No relay could be tried: the entry waits this long, without counting an attempt.
PARK_MS = 2000
MAX_PARK_MS = 30_000
# Verdicts given without asking any relay: they say nothing about the message or a relay.
UNASKED = frozenset({FailureKind.LIMITED, FailureKind.NO_ROUTE})
# The dead-letter reason is a summary for the operator, not a transcript.
MAX_REASON = 500


@dataclass(frozen=True)
class Finish:
    """What to record when an entry is acknowledged, in one transaction.

    The entry always leaves the stream. What is left of the message, if anything, goes to the
    retry set (`retry`, due at `retry_due_ms`) and/or the dead letters (`dead`, with a reason).
    With neither, the message is done and its body is deleted.
    """

    retry: QueuedMessage | None = None  # recipients still to try
    retry_due_ms: int = 0
    dead: QueuedMessage | None = None  # recipients that go to the dead-letter stream
    dead_reason: str = ""

    @property
    def done(self) -> bool:
        """Nothing refers to the body any more."""
        return self.retry is None and self.dead is None


DONE = Finish()


@dataclass(frozen=True)
class Attempt:
    """The last answer for one recipient, and the relay host that gave it (None: none did).

    The host, not the relay's configured name: it becomes the DSN's Remote-MTA (RFC 3464).
    """

    verdict: Verdict
    relay: str | None


@dataclass(frozen=True)
class Plan:
    """The outcome of one attempt: who is done, who failed for good, who waits, and how it ends."""

    delivered: tuple[str, ...]
    failed: tuple[RecipientFailure, ...]
    retry: QueuedMessage | None
    retry_due_ms: int
    expired: bool
    bounce: bool = False  # the failed recipients get a DSN to the sender (queued before `finish`)
    finish: Finish = DONE


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
        return _planned(message, delivered, tuple(failed), None, 0, expired=False)
    if is_expired(message.accepted_ms, now_ms, retry.lifetime_s):
        failed.extend(_expired(message, r, a) for r, a in waiting.items())
        return _planned(message, delivered, tuple(failed), None, 0, expired=True)
    if all(a.verdict.kind in UNASKED for a in waiting.values()):
        # Only our own cluster-wide limits, or a routing rule none of whose relays is healthy,
        # held them back: no relay was asked, so no attempt is counted and no backoff taken;
        # they come back as soon as parked mail does (a "451" of our own once sent such mail
        # to the 5-minute retry with a healthy relay).
        errors = {**message.last_errors, **_why_waiting(waiting)}
        again = replace(message, recipients=tuple(waiting), last_errors=errors)
        limited = any(a.verdict.kind is FailureKind.LIMITED for a in waiting.values())
        # A full relay frees up in seconds; a rule whose relays are all down may stay so.
        delay_ms = PARK_MS if limited else park_delay_ms(message, now_ms)
        return _planned(message, delivered, tuple(failed), again, now_ms + delay_ms, expired=False)
    errors = {r: _kept_error(message, r, a) for r, a in waiting.items()}
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
    return _planned(message, delivered, tuple(failed), again, due_ms, expired=False)


def _why_waiting(waiting: dict[str, Attempt]) -> dict[str, str]:
    """Keep the reason a recipient waits for a route (for `queue show` and `status`); a
    recipient held back by our own limits keeps its last real error (for the expiry DSN)."""
    return {r: a.verdict.text for r, a in waiting.items() if a.verdict.kind is FailureKind.NO_ROUTE}


def _kept_error(message: QueuedMessage, recipient: str, attempt: Attempt) -> str:
    """The error a waiting recipient carries to its next attempt. Our own limit says nothing
    about the recipient, so one it held back keeps what a relay last said (if one did), as
    in the parked path (`_why_waiting`), for `queue show` and the expiry DSN."""
    if attempt.verdict.kind is FailureKind.LIMITED:
        return message.last_errors.get(recipient) or attempt.verdict.text
    return attempt.verdict.text


def _planned(
    message: QueuedMessage,
    delivered: tuple[str, ...],
    failed: tuple[RecipientFailure, ...],
    again: QueuedMessage | None,
    due_ms: int,
    *,
    expired: bool,
) -> Plan:
    """Bounce or dead letter for the failed recipients; the Finish that records it all."""
    bounce = bool(failed) and is_bounce_worthy(message.sender, message.kind)
    finish = Finish(retry=again, retry_due_ms=due_ms)
    if failed and not bounce:
        dead = message.retry_of(tuple(f.recipient for f in failed), {})
        reason = "; ".join(f"{f.recipient}: {f.diagnostic}" for f in failed)[:MAX_REASON]
        finish = Finish(again, due_ms, dead=dead, dead_reason=reason)
    return Plan(delivered, failed, again, due_ms, expired, bounce, finish)


def park(message: QueuedMessage, *, now_ms: int) -> Finish:
    """No relay could be tried (none healthy): wait a moment in the retry set.

    No attempt is counted and nothing bounces: the message did nothing wrong. DESIGN: parked
    mail costs Redis nothing until it is due, unlike a per-message retry storm.
    """
    return Finish(retry=message, retry_due_ms=now_ms + park_delay_ms(message, now_ms))


def park_delay_ms(message: QueuedMessage, now_ms: int) -> int:
    """How long parked mail waits before it is read again: 2 s while its wait is young, a
    tenth of its age after that, at most MAX_PARK_MS. Every read costs Redis work, and a long
    outage of a rule's relays re-read each waiting message every 2 s (issue #14); mail parked
    for an hour is now read twice a minute, and a short outage still ends in seconds."""
    return min(MAX_PARK_MS, max(PARK_MS, (now_ms - message.accepted_ms) // 10))


def set_aside(message: QueuedMessage, error: str, *, now_ms: int, retry: RetryConfig) -> Finish:
    """A delivery that failed unexpectedly (a bug, not an answer): retry it later, with backoff.

    Re-reading it at once would turn a deterministic bug into a hot loop against Redis. The
    attempt counts, so the delay grows; the error is kept for the operator (`queue show`).
    Never bounced for it: the mail did nothing wrong, and the lifetime check of a later
    attempt decides its end. The delay never drops below `initial_s`, even past the lifetime.
    """
    again = message.retry_of(message.recipients, dict.fromkeys(message.recipients, error))
    delay_s = retry_delay_s(
        again.attempts,
        initial_s=retry.initial_s,
        max_s=retry.max_s,
        multiplier=retry.multiplier,
        jitter=0.0,
    )
    due_ms = now_ms + math.ceil(max(delay_s, retry.initial_s) * 1000)
    return Finish(retry=again, retry_due_ms=due_ms)


def _expired(message: QueuedMessage, recipient: str, attempt: Attempt) -> RecipientFailure:
    """A recipient whose lifetime ran out (4.4.7). When no relay was asked this time (our own
    limit, no route), the DSN reports the last real error it got (RFC 3464 section 2.3.6: the
    actual diagnostic) and no Remote-MTA: the entry keeps no record of which relay said that
    (section 2.3.5: the MTA that reported the status), and none said this attempt's."""
    if attempt.verdict.kind not in UNASKED:
        return _failure(recipient, attempt, status=EXPIRED_STATUS)
    diagnostic = message.last_errors.get(recipient) or attempt.verdict.text
    return RecipientFailure(recipient, EXPIRED_STATUS, diagnostic, remote_mta=None)


def _failure(recipient: str, attempt: Attempt, status: str | None = None) -> RecipientFailure:
    return RecipientFailure(
        recipient=recipient,
        status=status or attempt.verdict.status,
        diagnostic=attempt.verdict.text,
        remote_mta=attempt.relay,
    )
