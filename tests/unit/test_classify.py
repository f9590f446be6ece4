"""What a relay's answer means: reply codes, enhanced status codes, and exceptions."""

from __future__ import annotations

import re
import ssl

import aiosmtplib
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpfleet.delivery.classify import (
    MAX_TEXT,
    FailureKind,
    Outcome,
    Verdict,
    classify_exception,
    classify_reply,
    enhanced_status,
    limit_reached,
    unsendable,
)

STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


@pytest.mark.parametrize(
    ("code", "outcome", "kind"),
    [
        (250, Outcome.DELIVERED, FailureKind.REPLY_2XX),
        (251, Outcome.DELIVERED, FailureKind.REPLY_2XX),
        (421, Outcome.TEMPORARY, FailureKind.REPLY_4XX),
        (451, Outcome.TEMPORARY, FailureKind.REPLY_4XX),
        (452, Outcome.TEMPORARY, FailureKind.REPLY_4XX),
        (550, Outcome.PERMANENT, FailureKind.REPLY_5XX),
        (554, Outcome.PERMANENT, FailureKind.REPLY_5XX),
        # Unexpected replies are never a reason to bounce.
        (354, Outcome.TEMPORARY, FailureKind.REPLY_4XX),
        (199, Outcome.TEMPORARY, FailureKind.REPLY_4XX),
        (0, Outcome.TEMPORARY, FailureKind.REPLY_4XX),
        (600, Outcome.TEMPORARY, FailureKind.REPLY_4XX),
        (-1, Outcome.TEMPORARY, FailureKind.REPLY_4XX),
    ],
)
def test_reply_classes(code: int, outcome: Outcome, kind: FailureKind) -> None:
    verdict = classify_reply(code, "text")
    assert (verdict.outcome, verdict.kind, verdict.code) == (outcome, kind, code)


def test_reply_verdict_carries_a_one_line_diagnostic_and_the_enhanced_status() -> None:
    verdict = classify_reply(550, "5.1.1 <gone@example.net>:\nUser unknown\r\n  in table")
    assert verdict == Verdict(
        Outcome.PERMANENT,
        FailureKind.REPLY_5XX,
        550,
        "550 5.1.1 <gone@example.net>: User unknown in table",
        "5.1.1",
    )


def test_unexpected_reply_gets_a_temporary_status() -> None:
    assert classify_reply(354, "3.0.0 go ahead").status == "4.0.0"


def test_reply_text_is_capped_and_free_of_control_characters() -> None:
    verdict = classify_reply(550, "5.7.1 " + "spam\x00\x1b " * 500)
    assert len(verdict.text) == MAX_TEXT
    assert verdict.text.isprintable()


@pytest.mark.parametrize(
    ("code", "message", "status"),
    [
        (550, "5.1.1 User unknown", "5.1.1"),
        (250, "2.0.0 Ok: queued", "2.0.0"),
        (552, "5.3.4", "5.3.4"),  # nothing after the code
        (550, "  5.7.1 leading space", "5.7.1"),
        (421, "4.4.2 first line\nsecond line", "4.4.2"),
        (550, "5.123.456 three digits each", "5.123.456"),
        (550, "4.1.1 class disagrees with the reply", "5.0.0"),
        (451, "try later", "4.0.0"),
        (550, "5.1.1234 too many digits", "5.0.0"),
        (550, "5.1.1.2 four parts", "5.0.0"),
        (550, "5.1.1x glued text", "5.0.0"),
        (550, "user 5.1.1 not at the start", "5.0.0"),
        (550, "5.\u0663.1 Arabic-Indic digit", "5.0.0"),
        (354, "3.0.0 no such class", "4.0.0"),
        (199, "", "4.0.0"),
    ],
)
def test_enhanced_status(code: int, message: str, status: str) -> None:
    assert enhanced_status(code, message) == status


@pytest.mark.parametrize(
    ("exc", "outcome", "kind", "code", "status"),
    [
        (
            aiosmtplib.SMTPRecipientRefused(550, "5.1.1 No such user", "a@b"),
            Outcome.PERMANENT,
            FailureKind.REPLY_5XX,
            550,
            "5.1.1",
        ),
        (
            aiosmtplib.SMTPSenderRefused(553, "5.1.8 Bad sender domain", "s@x"),
            Outcome.PERMANENT,
            FailureKind.REPLY_5XX,
            553,
            "5.1.8",
        ),
        (
            aiosmtplib.SMTPDataError(554, "5.6.0 Message rejected"),
            Outcome.PERMANENT,
            FailureKind.REPLY_5XX,
            554,
            "5.6.0",
        ),
        (
            aiosmtplib.SMTPRecipientRefused(421, "4.3.2 Closing", "a@b"),
            Outcome.TEMPORARY,
            FailureKind.REPLY_4XX,
            421,
            "4.3.2",
        ),
        (
            aiosmtplib.SMTPDataError(451, "4.3.0 Try again"),
            Outcome.TEMPORARY,
            FailureKind.REPLY_4XX,
            451,
            "4.3.0",
        ),
    ],
)
def test_message_replies_are_classified_by_their_code(
    exc: aiosmtplib.SMTPResponseException,
    outcome: Outcome,
    kind: FailureKind,
    code: int,
    status: str,
) -> None:
    verdict = classify_exception(exc)
    assert (verdict.outcome, verdict.kind, verdict.code, verdict.status) == (
        outcome,
        kind,
        code,
        status,
    )
    assert verdict.text == f"{exc.code} {exc.message}"


def test_rcpt_552_is_the_legacy_too_many_recipients_and_temporary() -> None:
    # RFC 5321 section 4.5.3.1.10; the same code to DATA is a real permanent failure.
    rcpt = classify_exception(aiosmtplib.SMTPRecipientRefused(552, "5.5.3 Too many", "a@b"))
    assert (rcpt.outcome, rcpt.kind, rcpt.code, rcpt.status) == (
        Outcome.TEMPORARY,
        FailureKind.REPLY_4XX,
        552,
        "4.5.3",
    )
    data = classify_exception(aiosmtplib.SMTPDataError(552, "5.3.4 Message too big"))
    assert (data.outcome, data.status) == (Outcome.PERMANENT, "5.3.4")


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPAuthenticationError(535, "5.7.8 Authentication credentials invalid"),
        aiosmtplib.SMTPHeloError(550, "5.7.1 You are not welcome"),
        aiosmtplib.SMTPConnectResponseError(554, "No SMTP service here"),
        aiosmtplib.SMTPConnectResponseError(421, "4.3.2 Too busy"),
        aiosmtplib.SMTPResponseException(530, "5.7.0 Must issue a STARTTLS command first"),
    ],
    ids=["auth", "helo", "greeting-5xx", "greeting-421", "starttls"],
)
def test_a_refused_session_is_relay_trouble_not_a_bounce(
    exc: aiosmtplib.SMTPResponseException,
) -> None:
    verdict = classify_exception(exc)
    assert (verdict.outcome, verdict.kind, verdict.code, verdict.status) == (
        Outcome.TEMPORARY,
        FailureKind.CONNECTION,
        exc.code,
        "4.4.1",
    )
    assert verdict.text == f"{exc.code} {exc.message}"


def test_a_malformed_reply_is_a_connection_error_without_a_code() -> None:
    exc = aiosmtplib.SMTPResponseException(-1, "Malformed SMTP response line: HTTP/1.1 400")
    verdict = classify_exception(exc)
    assert (verdict.outcome, verdict.kind, verdict.code) == (
        Outcome.TEMPORARY,
        FailureKind.CONNECTION,
        None,
    )
    assert verdict.text == "invalid reply: Malformed SMTP response line: HTTP/1.1 400"


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPTimeoutError("Timed out"),
        aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"),
        aiosmtplib.SMTPConnectTimeoutError("Timed out connecting to relay"),
        TimeoutError(),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_timeouts_are_temporary(exc: BaseException) -> None:
    verdict = classify_exception(exc)
    assert (verdict.outcome, verdict.kind, verdict.code, verdict.status) == (
        Outcome.TEMPORARY,
        FailureKind.TIMEOUT,
        None,
        "4.4.2",
    )
    assert verdict.text.startswith("timeout: ")


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPConnectError("Error connecting to 192.0.2.1 on port 25"),
        aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"),
        aiosmtplib.SMTPNotSupported("STARTTLS extension not supported by server"),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        OSError(113, "No route to host"),
        ssl.SSLError(1, "certificate verify failed"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_connection_errors_are_temporary(exc: BaseException) -> None:
    verdict = classify_exception(exc)
    assert (verdict.outcome, verdict.kind, verdict.code, verdict.status) == (
        Outcome.TEMPORARY,
        FailureKind.CONNECTION,
        None,
        "4.4.1",
    )
    assert verdict.text.startswith("connection: ")


def test_connection_refused_says_so() -> None:
    verdict = classify_exception(ConnectionRefusedError(111, "Connection refused"))
    assert "Connection refused" in verdict.text


def test_an_unknown_exception_is_temporary_named_and_bounded() -> None:
    verdict = classify_exception(ValueError("x" * 100_000 + "\n" + "y"))
    assert (verdict.outcome, verdict.kind, verdict.code) == (
        Outcome.TEMPORARY,
        FailureKind.CONNECTION,
        None,
    )
    assert "ValueError" in verdict.text
    assert len(verdict.text) <= MAX_TEXT
    assert verdict.text.isprintable()


def test_an_exception_without_a_message_is_named_by_its_class() -> None:
    assert "RuntimeError" in classify_exception(RuntimeError()).text
    assert "ConnectionResetError" in classify_exception(ConnectionResetError()).text


@given(code=st.integers(min_value=-1000, max_value=1000), message=st.text())
def test_any_reply_gives_a_bounded_one_line_verdict(code: int, message: str) -> None:
    verdict = classify_reply(code, message)
    assert len(verdict.text) <= MAX_TEXT
    assert verdict.text.isprintable()
    assert STATUS.fullmatch(verdict.status)
    # Only a 5xx bounces; the status class never contradicts the outcome.
    assert (verdict.outcome is Outcome.PERMANENT) == (500 <= code < 600)
    expected_class = {Outcome.DELIVERED: "2", Outcome.TEMPORARY: "4", Outcome.PERMANENT: "5"}
    assert verdict.status[0] == expected_class[verdict.outcome]


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPDataError(250, "go ahead"),  # to DATA, instead of 354: nothing went
        aiosmtplib.SMTPSenderRefused(251, "odd", "s@example.com"),
        aiosmtplib.SMTPRecipientRefused(252, "odd", "r@example.net"),
    ],
)
def test_a_refusal_that_says_2xx_is_temporary_never_delivered(
    exc: aiosmtplib.SMTPResponseException,
) -> None:
    verdict = classify_exception(exc)
    assert (verdict.outcome, verdict.status, verdict.code) == (
        Outcome.TEMPORARY,
        "4.0.0",
        exc.code,
    )


# Gmail's usual reply to an unknown recipient, as aiosmtplib joins a multi-line reply.
GMAIL_NO_SUCH_USER = (
    "5.1.1 The email account that you tried to reach does not exist. Please try\n"
    "5.1.1 double-checking the recipient's email address for typos or\n"
    "5.1.1 unnecessary spaces. For more information, go to\n"
    "5.1.1  https://support.google.com/mail/?p=NoSuchUser d2e1a72fcca58-7a1b2c3d4e5si1234 - gsmtp"
)


def test_a_multi_line_reply_reaches_the_verdict_whole() -> None:
    """RFC 3464 2.3.6: the verdict text is the DSN's only copy of the relay's diagnostic."""
    verdict = classify_reply(550, GMAIL_NO_SUCH_USER)
    assert verdict.text.startswith("550 5.1.1 The email account that you tried to reach")
    assert verdict.text.endswith("?p=NoSuchUser d2e1a72fcca58-7a1b2c3d4e5si1234 - gsmtp")


def test_a_reply_line_of_512_octets_is_kept_whole() -> None:
    # RFC 5321 4.5.3.1.5: 512 octets a reply line, the code and the CRLF included.
    message = "5.7.1 Rejected by policy: " + "x" * (512 - 2 - 4 - 26 - 4) + " END"
    assert len(f"550 {message}\r\n") == 512
    assert classify_reply(550, message).text == f"550 {message}"


def test_only_a_verdict_a_relay_gave_names_it() -> None:
    """RFC 3464 2.3.5: the Remote-MTA is the MTA that reported the status; our own limit and
    our client's refusal to send an address asked no relay."""
    assert classify_reply(451, "4.2.1 busy").from_relay
    assert classify_exception(ConnectionRefusedError(111, "refused")).from_relay
    assert not limit_reached().from_relay
    assert not unsendable("a\x00b@example.net", sender=False).from_relay
