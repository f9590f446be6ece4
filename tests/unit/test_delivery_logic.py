"""Pure delivery decisions: classification, backoff, DSNs, and what happens after an attempt."""

from __future__ import annotations

import email
import email.policy
import random
import re

import aiosmtplib
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpfleet.config import RetryConfig
from smtpfleet.delivery.backoff import is_expired, retry_delay_s
from smtpfleet.delivery.classify import (
    FailureKind,
    Outcome,
    classify_exception,
    classify_reply,
    enhanced_status,
    limit_reached,
)
from smtpfleet.delivery.dsn import RecipientFailure, build_dsn
from smtpfleet.delivery.outcome import PARK_MS, Attempt, plan_outcome
from smtpfleet.envelope import QueuedMessage


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (250, Outcome.DELIVERED),
        (421, Outcome.TEMPORARY),
        (451, Outcome.TEMPORARY),
        (550, Outcome.PERMANENT),
        (554, Outcome.PERMANENT),
        (354, Outcome.TEMPORARY),
        (199, Outcome.TEMPORARY),
    ],
)
def test_reply_classes(code: int, outcome: Outcome) -> None:
    assert classify_reply(code, "text").outcome is outcome


def test_enhanced_status_must_match_the_reply_class() -> None:
    assert enhanced_status(550, "5.1.1 User unknown") == "5.1.1"
    assert enhanced_status(550, "4.1.1 confused") == "5.0.0"
    assert enhanced_status(451, "try later") == "4.0.0"


def test_exceptions_are_temporary_with_a_bounded_kind() -> None:
    refused = classify_exception(aiosmtplib.SMTPRecipientRefused(550, "5.1.1 No such user", "a@b"))
    assert (refused.outcome, refused.kind, refused.status) == (
        Outcome.PERMANENT,
        FailureKind.REPLY_5XX,
        "5.1.1",
    )
    timeout = classify_exception(aiosmtplib.SMTPTimeoutError("timed out"))
    assert (timeout.outcome, timeout.kind) == (Outcome.TEMPORARY, FailureKind.TIMEOUT)
    refused_tcp = classify_exception(ConnectionRefusedError(111, "Connection refused"))
    assert (refused_tcp.outcome, refused_tcp.kind) == (Outcome.TEMPORARY, FailureKind.CONNECTION)
    weird = classify_exception(ValueError("x" * 1000 + "\n" + "y"))
    assert weird.outcome is Outcome.TEMPORARY
    assert len(weird.text) <= 220
    assert "\n" not in weird.text


@given(st.integers(min_value=1, max_value=10_000))
def test_backoff_is_monotone_and_capped_without_jitter(attempt: int) -> None:
    kwargs = {"initial_s": 300.0, "max_s": 3600.0, "multiplier": 2.0, "jitter": 0.0}
    assert retry_delay_s(attempt, **kwargs) <= retry_delay_s(attempt + 1, **kwargs) <= 3600.0


@given(st.integers(min_value=1, max_value=100), st.floats(min_value=0, max_value=1))
def test_jitter_stays_in_bounds(attempt: int, jitter: float) -> None:
    delay = retry_delay_s(
        attempt, initial_s=10, max_s=100, multiplier=3, jitter=jitter, rng=random.Random(attempt)
    )
    assert 0 <= delay <= 100 * (1 + jitter)


def test_first_retry_uses_the_initial_delay_and_expiry_is_inclusive() -> None:
    assert retry_delay_s(1, initial_s=300, max_s=3600, multiplier=2, jitter=0) == 300
    assert retry_delay_s(3, initial_s=300, max_s=3600, multiplier=2, jitter=0) == 1200
    assert is_expired(0, 1000, 1.0)
    assert not is_expired(0, 999, 1.0)


def _verdict(code: int, text: str = "text") -> Attempt:
    return Attempt(classify_reply(code, text), "relay-1")


MESSAGE = QueuedMessage("1.X", "s@example.com", ("a@x", "b@x", "c@x"), accepted_ms=0)
RETRY = RetryConfig(initial_s=60, max_s=600, jitter=0, lifetime_s=3600)


def test_plan_splits_recipients_by_outcome() -> None:
    plan = plan_outcome(
        MESSAGE,
        {
            "a@x": _verdict(250),
            "b@x": _verdict(550, "5.1.1 gone"),
            "c@x": _verdict(451, "4.2.0 busy"),
        },
        now_ms=1000,
        retry=RETRY,
    )
    assert plan.delivered == ("a@x",)
    assert [f.recipient for f in plan.failed] == ["b@x"]
    assert plan.failed[0].status == "5.1.1"
    assert plan.retry is not None
    assert plan.retry.recipients == ("c@x",)
    assert plan.retry.attempts == 1
    assert plan.retry_due_ms == 1000 + 60_000
    assert not plan.expired


def test_our_own_limit_parks_without_counting_an_attempt_or_backing_off() -> None:
    """FINDINGS.md: a cluster-wide connection limit once sent mail to the 5-minute retry."""
    limited = Attempt(limit_reached(), None)
    plan = plan_outcome(MESSAGE, {"a@x": limited, "b@x": limited}, now_ms=1000, retry=RETRY)
    assert plan.retry is not None
    assert plan.retry.recipients == ("a@x", "b@x")
    assert plan.retry.attempts == MESSAGE.attempts  # no relay was asked
    assert plan.retry_due_ms == 1000 + PARK_MS
    assert plan.finish.retry_due_ms == 1000 + PARK_MS
    # A relay's own 4xx alongside still takes the backoff.
    mixed = plan_outcome(
        MESSAGE, {"a@x": limited, "b@x": _verdict(451, "4.2.0 busy")}, now_ms=1000, retry=RETRY
    )
    assert mixed.retry is not None
    assert mixed.retry.attempts == 1
    assert mixed.retry_due_ms == 1000 + 60_000


def test_plan_expires_temporary_failures_past_the_lifetime() -> None:
    plan = plan_outcome(
        MESSAGE, {"a@x": _verdict(451, "4.2.0 busy")}, now_ms=3_600_000, retry=RETRY
    )
    assert plan.retry is None
    assert plan.expired
    assert plan.failed[0].status == "4.4.7"
    assert "451 4.2.0 busy" in plan.failed[0].diagnostic


def _dsn(**overrides: object) -> bytes:
    arguments: dict[str, object] = {
        "original_sender": "s@example.com",
        "original_qid": "1.ABC",
        "failures": [RecipientFailure("gone@x", "5.1.1", "550 5.1.1 User unknown", "relay-1")],
        "reporting_mta": "mx.test",
        "original_data": "Subject: héllo\r\nFrom: s@example.com\r\n\r\nsecret body\r\n".encode(),
        "arrival_ms": 0,
        "now_ms": 7_200_000,
    }
    arguments.update(overrides)
    return build_dsn(**arguments)  # type: ignore[arg-type]


def test_dsn_is_an_rfc3464_report_with_crlf_lines() -> None:
    data = _dsn()
    assert not re.search(rb"[^\r]\n", data)
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["To"].addresses[0].addr_spec == "s@example.com"
    assert "MAILER-DAEMON@mx.test" in parsed["From"]
    human, status, headers = parsed.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    blocks = status.get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; mx.test"
    assert blocks[1]["Final-Recipient"] == "rfc822; gone@x"
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.1.1"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert "héllo" in headers.get_content()
    assert b"secret body" not in data  # headers only


def test_expired_dsn_says_so_and_long_diagnostics_stay_on_one_line() -> None:
    failure = RecipientFailure("slow@x", "4.4.7", "451 " + "busy " * 400, None)
    data = _dsn(failures=[failure], expired=True)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert "expired" in parsed["Subject"]
    assert b"Status: 4.4.7" in data
    assert b"Remote-MTA" not in data
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_the_last_retry_is_due_when_the_lifetime_ends_not_after() -> None:
    # 10 s before expiry with a 60 s backoff: try once more at expiry, then bounce on failure.
    now = 3_590_000
    plan = plan_outcome(
        MESSAGE, {r: _verdict(451) for r in MESSAGE.recipients}, now_ms=now, retry=RETRY
    )
    assert plan.retry is not None
    assert plan.retry_due_ms == 3_600_000
