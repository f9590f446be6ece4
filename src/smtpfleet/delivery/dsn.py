"""RFC 3464 delivery status notifications, built with the stdlib `email` package. Pure.

A DSN is a multipart/report (RFC 6522) of three parts: a note for the human sender, a
message/delivery-status report for software (RFC 3464 section 2), and the header section
of the returned message as text/rfc822-headers (RFC 6522 section 4; never the body, which
may be large and is the sender's own copy anyway).

The caller queues the result with the null reverse-path (RFC 5321 section 4.5.5), so a DSN
that cannot be delivered is never bounced in turn; `is_bounce_worthy` is that rule.

Every line is CRLF-terminated and at most 998 octets (RFC 5322 section 2.1.1). The report's
fields are folded here, at whitespace and under 78 columns where a space allows, because
the stdlib's own refolding of a long field can turn it into RFC 2047 encoded words, which
DSN parsers do not expect in a Diagnostic-Code.
"""

from __future__ import annotations

import email.charset
import email.policy
import email.utils
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from typing import Final

from smtpfleet.envelope import Kind

MAX_ORIGINAL_HEADERS: Final = 64 * 1024
MAX_LINE: Final = 998  # RFC 5322 section 2.1.1: MUST, excluding the CRLF
FOLD_AT: Final = 78  # RFC 5322 section 2.1.1: SHOULD
# Longest diagnostic or address kept: one unbreakable run of this many characters plus a field
# name still fits in MAX_LINE. Real ones are far shorter (RFC 5321 section 4.5.3.1.5: a reply
# line is at most 512 octets; classify.MAX_TEXT, the longest verdict text, is this too).
MAX_DIAGNOSTIC: Final = 900
MAX_ADDRESS: Final = 512
# The generator refolds any line longer than max_line_length (see the module docstring): raise
# the limit to the hard one, since nothing we write is longer.
POLICY: Final = email.policy.SMTP.clone(max_line_length=MAX_LINE)
SUBJECT: Final = "Undelivered Mail Returned to Sender"
EXPIRED_SUBJECT: Final = f"{SUBJECT} (delivery time expired)"
NULL_SENDERS: Final = frozenset({"", "<>"})
_STATUS: Final = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_SMTP_REPLY: Final = re.compile(r"[2-5][0-9][0-9](?:[ -]|$)")
# RFC 6533 section 3, utf-8-addr-xtext: printable ASCII except "+", "=" and "\" stands as is.
# What a reverse-path we can reply to looks like: printable ASCII (a quoted local part may hold
# blanks), nothing that could end a header line or an SMTP command.
_SENDABLE: Final = re.compile(r"[\x21-\x7e][\x20-\x7e]*")
_XTEXT_SAFE: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"+", "=", "\\"}


@dataclass(frozen=True)
class RecipientFailure:
    recipient: str
    status: str  # RFC 3463, e.g. "5.1.1", or "4.4.7" when the lifetime ran out
    diagnostic: str  # e.g. "550 5.1.1 User unknown"
    remote_mta: str | None  # the relay that answered, when one did


def is_bounce_worthy(sender: str, kind: str) -> bool:
    """Whether a failure may be reported to `sender` with a DSN.

    Never bounce a bounce: mail from the null reverse-path (RFC 5321 section 4.5.5), or a
    DSN we generated ourselves (RFC 3464 section 1), goes to the dead letters instead, or two
    broken mail systems could bounce each other's bounces forever.

    A sender that no SMTP command line can carry (control characters, 8-bit) cannot be told
    either: its DSN would be undeliverable, so its failures go to the dead letters too.
    """
    return sender not in NULL_SENDERS and kind != Kind.DSN and bool(_SENDABLE.fullmatch(sender))


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
    message_id_domain: str | None = None,
) -> bytes:
    """The whole DSN as bytes with CRLF line endings, ready to queue to `original_sender`."""
    if not is_bounce_worthy(original_sender, Kind.MAIL):
        raise ValueError("a DSN is never sent to the null reverse-path (RFC 5321 4.5.5)")
    if not failures:
        raise ValueError("a DSN reports at least one recipient (RFC 3464 section 2.1)")
    report = MIMEMultipart("report", policy=POLICY, report_type="delivery-status")
    report["From"] = from_address or f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = f"<{original_sender}>"
    report["Subject"] = EXPIRED_SUBJECT if expired else SUBJECT
    report["Date"] = _date(now_ms)
    domain = message_id_domain or reporting_mta or "localhost"
    report["Message-ID"] = email.utils.make_msgid("dsn", domain=domain)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834 section 5: no auto-reply to this
    report.preamble = "This is a MIME-encapsulated message.\n"  # RFC 2046 5.1.1, for old MUAs
    explanation = _explanation(failures, reporting_mta, original_qid, expired, now_ms - arrival_ms)
    report.attach(_text_part(explanation, "plain", "Notification"))
    report.attach(_status_part(failures, reporting_mta, original_qid, arrival_ms, now_ms))
    report.attach(_headers_part(original_data))
    return report.as_bytes(policy=POLICY)


def original_headers(data: bytes, limit: int = MAX_ORIGINAL_HEADERS) -> bytes:
    """The message's header section: the lines before the first empty one (RFC 5322 section
    2.1), cut at a line boundary to at most `limit` bytes. Never a byte of the body.
    """
    kept: list[bytes] = []
    size = 0
    for line in data.splitlines(keepends=True):
        if line in (b"\r\n", b"\n", b"\r") or size + len(line) > limit:
            break
        kept.append(line)
        size += len(line)
    return b"".join(kept)


# -- the human part ------------------------------------------------------------------------


def _explanation(
    failures: Sequence[RecipientFailure], mta: str, qid: str, expired: bool, age_ms: int
) -> str:
    # The attempt where the lifetime runs out may also get a 5xx for another recipient: each
    # group gets its own words, or the refused one would read as "given up after N days".
    refused = [f for f in failures if not _ran_out(f, expired)]
    gave_up = [f for f in failures if _ran_out(f, expired)]
    lines = [f"This is the mail system at {_text_line(mta, MAX_ADDRESS)}."]
    if refused:
        lines += [
            "",
            "Your message could not be delivered to the recipients below.",
            "It was refused permanently, so it will not be retried.",
            "",
            *_listed(refused),
        ]
    if gave_up:
        lines += [
            "",
            f"Your message could not be delivered for {_duration(age_ms)},",
            "so delivery has been given up. It did not reach the recipients below.",
            "",
            *_listed(gave_up),
        ]
    lines += [
        "",
        f"Queue ID: {_text_line(qid, MAX_ADDRESS)}",
        "The delivery report and the headers of your message are attached.",
    ]
    return "\n".join(lines) + "\n"


def _ran_out(failure: RecipientFailure, expired: bool) -> bool:
    """Only a temporary failure (4.4.7) runs out of time; a 5xx is a refusal in any DSN."""
    return expired and not failure.status.startswith("5")


def _listed(failures: Sequence[RecipientFailure]) -> list[str]:
    lines: list[str] = []
    for failure in failures:
        lines.append(f"<{_text_line(failure.recipient, MAX_ADDRESS)}>:")
        lines.append(_wrap(_text_line(failure.diagnostic, MAX_DIAGNOSTIC)))
    return lines


def _wrap(text: str) -> str:
    # Never break a word: a diagnostic often holds a URL or an id someone will paste.
    return textwrap.fill(
        text or "(no diagnostic)",
        width=FOLD_AT,
        initial_indent="    ",
        subsequent_indent="    ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _duration(ms: int) -> str:
    """Two units at most: "5 days", "1 day 12 hours", "2 hours 30 minutes", "40 seconds"."""
    seconds = max(0, ms // 1000)
    units = [
        (seconds // 86_400, "day"),
        (seconds % 86_400 // 3_600, "hour"),
        (seconds % 3_600 // 60, "minute"),
        (seconds % 60, "second"),
    ]
    first = next((i for i, (n, _) in enumerate(units) if n), len(units) - 1)
    shown = [f"{n} {name}{'' if n == 1 else 's'}" for n, name in units[first : first + 2] if n]
    return " ".join(shown) or "0 seconds"


def _headers_part(original_data: bytes) -> MIMEBase:
    # Header fields are ASCII or, from SMTPUTF8 clients, UTF-8 (RFC 6532); anything else is
    # damaged already, and a replacement character is the honest way to show it.
    text = original_headers(original_data).decode("utf-8", "replace")
    if text and not text.endswith(("\n", "\r")):
        text += "\n"  # a message with no body may end without a line break
    return _text_part(text, "rfc822-headers", "Undelivered Message Headers")


def _text_part(text: str, subtype: str, description: str) -> MIMEBase:
    # Plain ASCII with legal line lengths travels as is (7bit) and stays greppable; anything
    # else (UTF-8 from the original headers, a remote server's reply) is quoted-printable,
    # which is 7-bit safe, keeps lines short, and stays mostly readable. A NUL (a client can
    # put one in a header field) is ASCII but never 7bit data (RFC 2045 section 2.7): as
    # "=00" the returned headers still show it, where dropping it would change them.
    plain = (
        text.isascii()
        and "\0" not in text
        and all(len(line) <= MAX_LINE for line in text.splitlines())
    )
    charset = email.charset.Charset("us-ascii" if plain else "utf-8")
    if not plain:
        charset.body_encoding = email.charset.QP  # this instance only; utf-8 defaults to base64
    part = MIMENonMultipart("text", subtype, policy=POLICY)
    part.set_payload(text, charset)
    return _subpart(part, description)


# -- the machine-readable part (RFC 3464 section 2) ----------------------------------------


def _status_part(
    failures: Sequence[RecipientFailure], mta: str, qid: str, arrival_ms: int, now_ms: int
) -> MIMEBase:
    per_message = _fields(
        [
            ("Reporting-MTA", f"dns; {_ascii(mta, MAX_ADDRESS)}"),
            # RFC 3464 section 2.4 extension field, as Postfix's X-Postfix-Queue-ID: lets the
            # operator find the original in the logs and the dead letters.
            ("X-Smtpfleet-Queue-ID", _ascii(qid, MAX_ADDRESS)),
            ("Arrival-Date", _date(arrival_ms)),
        ]
    )
    part = MIMEBase("message", "delivery-status", policy=POLICY)
    part.set_payload([per_message, *(_recipient_fields(f, now_ms) for f in failures)])
    return _subpart(part, "Delivery report")


def _recipient_fields(failure: RecipientFailure, now_ms: int) -> Message:
    pairs = [
        ("Final-Recipient", _address_field(failure.recipient)),
        ("Action", "failed"),
        ("Status", failure.status if _STATUS.fullmatch(failure.status) else "5.0.0"),
    ]
    if failure.remote_mta:
        pairs.append(("Remote-MTA", f"dns; {_ascii(failure.remote_mta, MAX_ADDRESS)}"))
    pairs.append(("Diagnostic-Code", _diagnostic_field(failure.diagnostic)))
    pairs.append(("Last-Attempt-Date", _date(now_ms)))
    return _fields(pairs)


def _fields(pairs: Iterable[tuple[str, str]]) -> Message:
    # A compat32 Message stores our pre-folded values verbatim; the generator (POLICY) then
    # writes them without refolding, as every line is within MAX_LINE.
    block = Message()
    for name, value in pairs:
        block[name] = _fold(name, value)
    return block


def _address_field(address: str) -> str:
    """RFC 3464 section 2.3.2 for an ASCII address; RFC 6533 section 3 ("utf-8" type with
    utf-8-addr-xtext) for an internationalized one, as message/delivery-status is 7-bit.
    """
    flat = _text_line(address, MAX_ADDRESS)
    if flat.isascii():
        return f"rfc822; {flat}"
    return "utf-8; " + "".join(c if c in _XTEXT_SAFE else f"\\x{{{ord(c):02X}}}" for c in flat)


def _diagnostic_field(diagnostic: str) -> str:
    """RFC 3464 section 2.3.6: type "smtp" only for a reply an SMTP server sent. Our own text
    (a refused connection, a timeout) gets an X- type, as Postfix's "X-Postfix".
    """
    text = _ascii(diagnostic, MAX_DIAGNOSTIC)
    kind = "smtp" if _SMTP_REPLY.match(text) else "X-Smtpfleet"
    return f"{kind}; {text}"


def _fold(name: str, value: str) -> str:
    """Fold at spaces (RFC 5322 section 2.2.3) so lines stay within FOLD_AT where possible.

    A fold is a line break before a space; unfolding removes only the break, so the value
    reads back unchanged. A run with no space stays whole (bounded by MAX_DIAGNOSTIC).
    """
    lines: list[str] = []
    line = ""
    room = FOLD_AT - len(name) - 2  # "Name: " on the first line
    for word in value.split(" "):
        if line and len(line) + 1 + len(word) > room:
            lines.append(line)
            line, room = word, FOLD_AT - 1  # a continuation line starts with the space
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n ".join(lines)


# -- small helpers -------------------------------------------------------------------------


def _subpart(part: MIMEBase, description: str) -> MIMEBase:
    del part["MIME-Version"]  # RFC 2045 section 4: required at the top level only
    part["Content-Description"] = description
    return part


def _date(ms: int) -> str:
    """RFC 5322 section 3.3 date-time in UTC ("+0000"; "GMT" is obsolete syntax)."""
    return email.utils.format_datetime(datetime.fromtimestamp(ms / 1000, tz=UTC))


def _text_line(text: str, limit: int) -> str:
    """One line of printable text: diagnostics come from remote servers and may carry anything."""
    flat = " ".join(text.split())
    return "".join(c for c in flat if c.isprintable())[:limit]


def _ascii(text: str, limit: int) -> str:
    """As _text_line, for the 7-bit report: non-ASCII becomes a visible \\x.. escape."""
    escaped = _text_line(text, limit).encode("ascii", "backslashreplace").decode("ascii")
    return escaped[:limit]
