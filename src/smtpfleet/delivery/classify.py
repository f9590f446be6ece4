"""What a relay's answer means for one recipient (DESIGN invariant 3). Pure.

2xx delivered, 4xx temporary, 5xx permanent. Connection errors and timeouts are temporary:
the relay never said no. An unexpected reply (1xx, 3xx, garbage) is temporary too: nothing but
a clear 5xx is ever a reason to bounce someone's mail.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from enum import StrEnum

import aiosmtplib

MAX_TEXT = 200
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


class Outcome(StrEnum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


class FailureKind(StrEnum):
    """Bounded label values for metrics and logs."""

    REPLY_2XX = "2xx"
    REPLY_4XX = "4xx"
    REPLY_5XX = "5xx"
    CONNECTION = "connection_error"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    kind: FailureKind
    code: int | None
    text: str  # one line, e.g. "550 5.1.1 User unknown"
    status: str  # RFC 3463, e.g. "5.1.1"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_TEXT]


def enhanced_status(code: int, message: str) -> str:
    """The RFC 3463 code at the start of the text if its class matches the reply, else X.0.0."""
    match = _ENHANCED.match(message.strip())
    if match and match.group(1) == str(code // 100):
        return ".".join(match.groups())
    return f"{code // 100}.0.0" if code // 100 in (2, 4, 5) else "4.0.0"


def classify_reply(code: int, message: str) -> Verdict:
    text = _one_line(f"{code} {message}")
    status = enhanced_status(code, message)
    if 200 <= code < 300:
        return Verdict(Outcome.DELIVERED, FailureKind.REPLY_2XX, code, text, status)
    if 500 <= code < 600:
        return Verdict(Outcome.PERMANENT, FailureKind.REPLY_5XX, code, text, status)
    return Verdict(Outcome.TEMPORARY, FailureKind.REPLY_4XX, code, text, status)


def classify_exception(exc: BaseException) -> Verdict:
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code > 0:
        return classify_reply(exc.code, exc.message)
    detail = _one_line(str(exc)) or exc.__class__.__name__
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError | asyncio.TimeoutError):
        return Verdict(Outcome.TEMPORARY, FailureKind.TIMEOUT, None, f"timeout: {detail}", "4.4.2")
    return Verdict(
        Outcome.TEMPORARY, FailureKind.CONNECTION, None, f"connection: {detail}", "4.4.1"
    )
