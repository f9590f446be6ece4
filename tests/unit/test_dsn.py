"""RFC 3464 DSNs: parsed back with the stdlib, field by field, and checked byte by byte."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage, Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpfleet.delivery.dsn import (
    MAX_ORIGINAL_HEADERS,
    RecipientFailure,
    build_dsn,
    is_bounce_worthy,
    original_headers,
)
from smtpfleet.envelope import Kind

ARRIVAL_MS = 1_700_000_000_000
NOW_MS = ARRIVAL_MS + 2 * 3_600_000
GONE = RecipientFailure("gone@example.net", "5.1.1", "550 5.1.1 User unknown", "relay-1")
ORIGINAL = (
    b"Received: from client.example.com\r\n"
    b"From: Sender <s@example.com>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <abc@example.com>\r\n"
    b"\r\n"
    b"secret body\r\n"
    b"X-Not-A-Header: still the body\r\n"
)
BARE_LINE_ENDING = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def make_dsn(
    *,
    failures: Sequence[RecipientFailure] = (GONE,),
    original_data: bytes = ORIGINAL,
    arrival_ms: int = ARRIVAL_MS,
    now_ms: int = NOW_MS,
    from_address: str = "",
    expired: bool = False,
    message_id_domain: str | None = None,
) -> bytes:
    return build_dsn(
        original_sender="s@example.com",
        original_qid="3.018BCFE5D800A1B2C3D4",
        failures=failures,
        reporting_mta="mx1.example.org",
        original_data=original_data,
        arrival_ms=arrival_ms,
        now_ms=now_ms,
        from_address=from_address,
        expired=expired,
        message_id_domain=message_id_domain,
    )


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(data: bytes) -> tuple[EmailMessage, EmailMessage, EmailMessage]:
    human, status, headers = parse(data).iter_parts()
    assert isinstance(human, EmailMessage)
    assert isinstance(status, EmailMessage)
    assert isinstance(headers, EmailMessage)
    return human, status, headers


def text_of(part: EmailMessage) -> str:
    """Decoded text with the wire's CRLF line endings as plain newlines."""
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def status_blocks(data: bytes) -> list[Message]:
    blocks = parts(data)[1].get_payload()
    assert isinstance(blocks, list)
    return blocks


def status_section(data: bytes) -> bytes:
    """The raw bytes of the message/delivery-status part."""
    return data.split(b"Content-Type: message/delivery-status")[1].split(b"\r\n--")[0]


def assert_wire_safe(data: bytes) -> None:
    """CRLF only (RFC 5322 section 2.3), 998 octets a line at most (2.1.1), 7-bit clean."""
    assert BARE_LINE_ENDING.search(data) is None
    assert data.endswith(b"\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert data.isascii()


def test_top_level_headers() -> None:
    data = make_dsn()
    message = parse(data)
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx1.example.org>"
    assert [a.addr_spec for a in message["To"].addresses] == ["s@example.com"]
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Date"].datetime == datetime.fromtimestamp(NOW_MS / 1000, tz=UTC)
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message.get_boundary()
    assert re.fullmatch(r"<[^<>@\s]+@mx1\.example\.org>", message["Message-ID"])
    assert_wire_safe(data)


def test_every_dsn_gets_a_fresh_message_id_in_the_chosen_domain() -> None:
    first = parse(make_dsn())["Message-ID"]
    second = parse(make_dsn())["Message-ID"]
    assert first != second
    assert parse(make_dsn(message_id_domain="bounces.example.org"))["Message-ID"].endswith(
        "@bounces.example.org>"
    )


def test_the_configured_from_address_replaces_mailer_daemon() -> None:
    message = parse(make_dsn(from_address="Bounces <postmaster@example.org>"))
    assert message["From"].addresses[0].addr_spec == "postmaster@example.org"
    assert "MAILER-DAEMON" not in message["From"]


def test_three_parts_in_rfc_6522_order() -> None:
    human, status, headers = parts(make_dsn())
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"


def test_the_human_part_lists_each_recipient_and_its_diagnostic() -> None:
    busy = RecipientFailure("busy@example.net", "5.2.2", "552 5.2.2 Mailbox full", None)
    text = text_of(parts(make_dsn(failures=[GONE, busy]))[0])
    assert "<gone@example.net>:\n    550 5.1.1 User unknown" in text
    assert "<busy@example.net>:\n    552 5.2.2 Mailbox full" in text
    assert "will not be retried" in text
    assert "3.018BCFE5D800A1B2C3D4" in text


def test_per_message_fields() -> None:
    per_message = status_blocks(make_dsn())[0]
    assert per_message["Reporting-MTA"] == "dns; mx1.example.org"
    assert per_message["X-Smtpfleet-Queue-ID"] == "3.018BCFE5D800A1B2C3D4"
    arrival = email.utils.parsedate_to_datetime(per_message["Arrival-Date"])
    assert arrival == datetime.fromtimestamp(ARRIVAL_MS / 1000, tz=UTC)
    assert "Final-Recipient" not in per_message


def test_per_recipient_fields() -> None:
    busy = RecipientFailure("busy@example.net", "5.2.2", "552 5.2.2 Mailbox full", None)
    _, gone, full = status_blocks(make_dsn(failures=[GONE, busy]))
    assert gone["Final-Recipient"] == "rfc822; gone@example.net"
    assert gone["Action"] == "failed"
    assert gone["Status"] == "5.1.1"
    assert gone["Remote-MTA"] == "dns; relay-1"
    assert gone["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    last = email.utils.parsedate_to_datetime(gone["Last-Attempt-Date"])
    assert last == datetime.fromtimestamp(NOW_MS / 1000, tz=UTC)
    assert full["Final-Recipient"] == "rfc822; busy@example.net"
    assert full["Status"] == "5.2.2"
    assert "Remote-MTA" not in full  # unknown, so absent rather than empty


def test_the_report_is_written_verbatim_not_refolded_or_encoded() -> None:
    section = status_section(make_dsn())
    assert b"\r\nFinal-Recipient: rfc822; gone@example.net\r\n" in section
    assert b"\r\nDiagnostic-Code: smtp; 550 5.1.1 User unknown\r\n" in section
    # RFC 3464 section 2.1: per-message fields, a blank line, then the recipient's fields.
    assert b"Arrival-Date: " in section.split(b"\r\n\r\nFinal-Recipient")[0]
    assert b"=?" not in section


def test_our_own_diagnostics_are_not_labelled_smtp() -> None:
    refused = RecipientFailure("a@example.net", "4.4.7", "connection: Connection refused", None)
    block = status_blocks(make_dsn(failures=[refused], expired=True))[1]
    assert block["Diagnostic-Code"] == "X-Smtpfleet; connection: Connection refused"


def test_a_malformed_status_falls_back_to_a_valid_one() -> None:
    odd = RecipientFailure("a@example.net", "five.one.one", "550 no", None)
    assert status_blocks(make_dsn(failures=[odd]))[1]["Status"] == "5.0.0"


def test_expired_dsn() -> None:
    slow = RecipientFailure("slow@example.net", "4.4.7", "451 4.2.1 Mailbox busy", "relay-2")
    data = make_dsn(failures=[slow], expired=True, now_ms=ARRIVAL_MS + 5 * 86_400_000 + 4_000)
    message = parse(data)
    assert message["Subject"] == "Undelivered Mail Returned to Sender (delivery time expired)"
    text = text_of(parts(data)[0])
    assert "could not be delivered for 5 days," in text
    assert "given up" in text
    assert "451 4.2.1 Mailbox busy" in text
    block = status_blocks(data)[1]
    assert block["Status"] == "4.4.7"
    assert block["Action"] == "failed"
    assert block["Diagnostic-Code"] == "smtp; 451 4.2.1 Mailbox busy"
    assert_wire_safe(data)


@pytest.mark.parametrize(
    ("age_ms", "phrase"),
    [
        (36 * 3_600_000, "1 day 12 hours"),
        (3_600_000, "1 hour"),
        (2 * 3_600_000 + 30 * 60_000 + 9_000, "2 hours 30 minutes"),
        (1_500, "1 second"),
    ],
)
def test_expired_dsn_says_how_long_delivery_was_tried(age_ms: int, phrase: str) -> None:
    failure = RecipientFailure("slow@example.net", "4.4.7", "451 busy", None)
    data = make_dsn(failures=[failure], expired=True, now_ms=ARRIVAL_MS + age_ms)
    assert f"could not be delivered for {phrase}," in text_of(parts(data)[0])


def test_only_the_original_header_section_is_returned() -> None:
    data = make_dsn()
    headers = text_of(parts(data)[2])
    assert headers == (
        "Received: from client.example.com\n"
        "From: Sender <s@example.com>\n"
        "Subject: quarterly numbers\n"
        "Message-ID: <abc@example.com>\n"
    )
    assert b"secret body" not in data
    assert b"X-Not-A-Header" not in data


def test_a_message_with_an_empty_header_section_returns_no_body() -> None:
    data = make_dsn(original_data=b"\r\nsecret body\r\n\r\nmore body\r\n")
    assert text_of(parts(data)[2]) == ""
    assert b"secret body" not in data
    assert b"more body" not in data


def test_a_message_without_a_body_returns_all_its_headers() -> None:
    data = make_dsn(original_data=b"Subject: hi\r\nFrom: s@example.com")
    assert text_of(parts(data)[2]) == "Subject: hi\nFrom: s@example.com\n"


def test_returned_headers_are_capped_at_a_line_boundary() -> None:
    line = b"X-Filler: " + b"f" * 88 + b"\r\n"  # 100 octets
    original = line * 2_000 + b"\r\nbody\r\n"
    data = make_dsn(original_data=original)
    returned = text_of(parts(data)[2]).splitlines()
    assert 0 < len(returned) * 100 <= MAX_ORIGINAL_HEADERS
    assert len(returned) == MAX_ORIGINAL_HEADERS // 100
    assert set(returned) == {line.decode().rstrip("\r\n")}
    assert_wire_safe(data)


def test_non_ascii_original_headers_survive_quoted_printable() -> None:
    original = "Subject: héllo wörld ✓\r\nFrom: Jörg <s@example.com>\r\n\r\nbody\r\n".encode()
    data = make_dsn(original_data=original)
    headers = parts(data)[2]
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_of(headers) == "Subject: héllo wörld ✓\nFrom: Jörg <s@example.com>\n"
    assert_wire_safe(data)


def test_invalid_utf8_in_original_headers_does_not_crash() -> None:
    data = make_dsn(original_data=b"Subject: \xff\xfe latin-1 \xe9t\xe9\r\n\r\nbody\r\n")
    assert text_of(parts(data)[2]) == "Subject: \ufffd\ufffd latin-1 \ufffdt\ufffd\n"
    assert_wire_safe(data)


def test_a_long_diagnostic_is_folded_and_reads_back_unchanged() -> None:
    diagnostic = "451 4.2.1 " + "busy " * 150
    failure = RecipientFailure("slow@example.net", "4.4.7", diagnostic, None)
    data = make_dsn(failures=[failure], expired=True)
    section = status_section(data)
    assert max(len(line) for line in section.split(b"\r\n")) <= 78
    assert status_blocks(data)[1]["Diagnostic-Code"] == "smtp; " + diagnostic.strip()
    assert_wire_safe(data)


def test_an_unbreakable_diagnostic_is_truncated_below_the_line_limit() -> None:
    failure = RecipientFailure("a@example.net", "5.0.0", "550 " + "x" * 5_000, None)
    data = make_dsn(failures=[failure])
    code = status_blocks(data)[1]["Diagnostic-Code"]
    assert code.startswith("smtp; 550 xxxx")
    assert 500 < len(code) < 998
    assert b"=?" not in status_section(data)  # never RFC 2047 encoded words
    assert_wire_safe(data)


def test_a_diagnostic_cannot_inject_report_fields() -> None:
    evil = RecipientFailure("a@example.net", "5.1.1", "550 no\r\nAction: delivered\nX: y", None)
    block = status_blocks(make_dsn(failures=[evil]))[1]
    assert block.get_all("Action") == ["failed"]
    assert "X" not in block
    assert block["Diagnostic-Code"] == "smtp; 550 no Action: delivered X: y"


def test_non_ascii_diagnostics_and_recipients_stay_7bit_in_the_report() -> None:
    failure = RecipientFailure("jörg+tag@example.de", "5.1.1", "550 5.1.1 Unbekannt: jörg", None)
    data = make_dsn(failures=[failure])
    block = status_blocks(data)[1]
    # RFC 6533 section 3: utf-8-addr-xtext, "+" escaped as well.
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg\\x{2B}tag@example.de"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Unbekannt: j\\xf6rg"
    # The human part keeps the real characters.
    assert "550 5.1.1 Unbekannt: jörg" in text_of(parts(data)[0])
    assert_wire_safe(data)


@settings(max_examples=50, deadline=None)
@given(
    recipient=st.text(min_size=1, max_size=300),
    diagnostic=st.text(max_size=2_000),
    headers=st.binary(max_size=3_000),
)
def test_any_input_gives_a_parsable_wire_safe_report(
    recipient: str, diagnostic: str, headers: bytes
) -> None:
    failure = RecipientFailure(recipient, "5.1.1", diagnostic, "relay-1")
    data = make_dsn(failures=[failure], original_data=headers)
    assert_wire_safe(data)
    blocks = status_blocks(data)
    assert len(blocks) == 2
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.1.1"
    assert blocks[1]["Diagnostic-Code"].split(";")[0] in {"smtp", "X-Smtpfleet"}


def test_a_dsn_is_never_addressed_to_the_null_sender() -> None:
    with pytest.raises(ValueError, match="null reverse-path"):
        build_dsn(
            original_sender="",
            original_qid="1.A",
            failures=[GONE],
            reporting_mta="mx1.example.org",
            original_data=ORIGINAL,
            arrival_ms=ARRIVAL_MS,
            now_ms=NOW_MS,
        )


def test_a_dsn_needs_a_failure_to_report() -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        make_dsn(failures=[])


@pytest.mark.parametrize(
    ("sender", "kind", "worthy"),
    [
        ("s@example.com", Kind.MAIL, True),
        ("s@example.com", "mail", True),
        ("", Kind.MAIL, False),
        ("<>", Kind.MAIL, False),
        ("  ", Kind.MAIL, False),
        ("s@example.com", Kind.DSN, False),
        ("s@example.com", "dsn", False),
        # A sender no command line can carry cannot be told (and its DSN header would break).
        ("\x0bpoison@fuzz.example", Kind.MAIL, False),
        ("s@example.com\r\nBcc: x@y", Kind.MAIL, False),
        ("s\x1f@example.com", Kind.MAIL, False),
        ('"John Smith"@example.com', Kind.MAIL, True),
    ],
)
def test_never_bounce_a_bounce(sender: str, kind: str, worthy: bool) -> None:
    assert is_bounce_worthy(sender, kind) is worthy


def test_original_headers_stops_at_the_first_empty_line() -> None:
    assert original_headers(b"A: 1\r\n B: folded\r\n\r\nbody\r\n") == b"A: 1\r\n B: folded\r\n"
    assert original_headers(b"A: 1\r\nB: 2\r\n", limit=7) == b"A: 1\r\n"
    assert original_headers(b"") == b""


def test_a_nul_in_the_original_headers_is_never_sent_as_7bit() -> None:
    """RFC 2045 2.7: 7bit data has no NUL. A client can put one in a header field."""
    data = make_dsn(original_data=b"Subject: hi\r\nX-Nul: a\x00b\r\n\r\nbody\r\n")
    headers = parts(data)[2]
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert b"X-Nul: a=00b\r\n" in data
    assert b"\x00" not in data
    assert text_of(headers) == "Subject: hi\nX-Nul: a\x00b\n"  # returned as it was
    assert_wire_safe(data)


def test_an_expired_dsn_says_refused_for_a_5xx_of_the_same_attempt() -> None:
    gone = RecipientFailure("gone@example.net", "5.1.1", "550 5.1.1 User unknown", "relay-1")
    slow = RecipientFailure("slow@example.net", "4.4.7", "451 4.2.1 Mailbox busy", "relay-1")
    text = text_of(parts(make_dsn(failures=[gone, slow], expired=True))[0])
    refused, _, given_up = text.partition("could not be delivered for 2 hours,")
    assert "It was refused permanently" in refused
    assert "<gone@example.net>:\n    550 5.1.1 User unknown" in refused
    assert "slow@example.net" not in refused
    assert "<slow@example.net>:\n    451 4.2.1 Mailbox busy" in given_up
    assert "gone@example.net" not in given_up
