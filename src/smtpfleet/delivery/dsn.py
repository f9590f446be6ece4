"""RFC 3464 delivery status notifications, built with the stdlib `email` package. Pure.

The caller queues the result with the null reverse-path (RFC 5321 4.5.5), so a DSN that
cannot be delivered is never bounced again.
"""

from __future__ import annotations

import email.policy
import email.utils
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

MAX_ORIGINAL_HEADERS = 64 * 1024
MAX_DIAGNOSTIC = 900  # RFC 5322 2.1.1: 998 octets a line, with room for the field name
# Fold nothing below the RFC 5322 line limit: the stdlib would otherwise fold long DSN fields
# into RFC 2047 encoded words, which report parsers do not expect in Diagnostic-Code.
POLICY = email.policy.SMTP.clone(max_line_length=998)


@dataclass(frozen=True)
class RecipientFailure:
    recipient: str
    status: str  # RFC 3463, e.g. "5.1.1", or "4.4.7" when the lifetime ran out
    diagnostic: str  # e.g. "550 5.1.1 User unknown"
    remote_mta: str | None  # the relay that answered, when one did


def _date(ms: int) -> str:
    return email.utils.formatdate(ms / 1000, localtime=False)


def _clean(text: str, limit: int = MAX_DIAGNOSTIC) -> str:
    """One printable line: diagnostics come from remote servers and may carry anything."""
    return "".join(c if c.isprintable() else " " for c in " ".join(text.split()))[:limit]


def original_headers(data: bytes) -> bytes:
    head = data.split(b"\r\n\r\n", 1)[0]
    return head[:MAX_ORIGINAL_HEADERS] + b"\r\n"


def _human_part(failures: Sequence[RecipientFailure], expired: bool, age_ms: int) -> MIMEText:
    if expired:
        hours = max(1, round(age_ms / 3_600_000))
        intro = (
            f"Your message could not be delivered to the recipients below for {hours} hour(s); "
            "delivery has been given up."
        )
    else:
        intro = "Your message could not be delivered to the recipients below."
    lines = [intro, ""]
    lines += [f"  <{f.recipient}>: {_clean(f.diagnostic)}" for f in failures]
    lines += ["", "The delivery report and the original message's headers are attached."]
    return _text("\n".join(lines) + "\n", "plain")


def _fields(pairs: Sequence[tuple[str, str]]) -> Message:
    block = Message()
    for name, value in pairs:
        block[name] = value
    return block


def _status_part(
    failures: Sequence[RecipientFailure], reporting_mta: str, qid: str, arrival_ms: int, now_ms: int
) -> MIMEBase:
    per_message = _fields(
        [
            ("Reporting-MTA", f"dns; {reporting_mta}"),
            ("X-Smtpfleet-Queue-ID", qid),
            ("Arrival-Date", _date(arrival_ms)),
        ]
    )
    per_recipient = []
    for failure in failures:
        pairs = [
            ("Final-Recipient", f"rfc822; {_clean(failure.recipient, 500)}"),
            ("Action", "failed"),
            ("Status", failure.status),
        ]
        if failure.remote_mta:
            pairs.append(("Remote-MTA", f"dns; {failure.remote_mta}"))
        pairs.append(("Diagnostic-Code", f"smtp; {_clean(failure.diagnostic)}"))
        pairs.append(("Last-Attempt-Date", _date(now_ms)))
        per_recipient.append(_fields(pairs))
    part = MIMEBase("message", "delivery-status")
    part.set_payload([per_message, *per_recipient])
    return part


def _headers_part(original_data: bytes) -> MIMEText:
    text = original_headers(original_data).decode("utf-8", "replace").replace("\r\n", "\n")
    return _text(text, "rfc822-headers")


def _text(text: str, subtype: str) -> MIMEText:
    # Plain ASCII stays readable (7bit); anything else travels safely encoded.
    return MIMEText(text, subtype, "us-ascii" if text.isascii() else "utf-8")


def build_dsn(
    *,
    original_sender: str,
    original_qid: str,
    failures: Sequence[RecipientFailure],
    reporting_mta: str,
    original_data: bytes,
    arrival_ms: int,
    now_ms: int,
    from_address: str = "",
    expired: bool = False,
) -> bytes:
    """The whole DSN, CRLF line endings, ready to queue to `original_sender`."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = from_address or f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = f"<{original_sender}>"
    subject = "Undelivered Mail Returned to Sender"
    report["Subject"] = subject + (" (delivery time expired)" if expired else "")
    report["Date"] = _date(now_ms)
    report["Message-ID"] = email.utils.make_msgid("dsn", domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: no auto-reply to this, please
    report.attach(_human_part(failures, expired, now_ms - arrival_ms))
    report.attach(_status_part(failures, reporting_mta, original_qid, arrival_ms, now_ms))
    report.attach(_headers_part(original_data))
    return report.as_bytes(policy=POLICY)
