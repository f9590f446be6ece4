"""What a relay's answer means for one recipient (DESIGN invariant 3). Pure: no I/O. 2xx is
delivered, 4xx temporary, 5xx permanent (RFC 5321 section 4.2.1). Everything else is temporary:
connection errors and timeouts (the relay never said no), unexpected replies (1xx, 3xx,
garbage, a 2xx where another reply was due), and refusals of the session rather than of the
message (a 5xx greeting, EHLO, STARTTLS or AUTH reply is about our relay, not the recipient).
Only a clear 5xx to MAIL, RCPT or DATA is ever a reason to bounce someone's mail.

aiosmtplib is imported for its exception classes only; this module never opens a connection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import aiosmtplib

from smtpfleet.replies import CLOSING_CODE

# Verdict texts end up in logs, queue entries (last_errors, shown by the CLI) and DSNs, where
# they are the only copy of the relay's reply (RFC 3464 section 2.3.6: the actual diagnostic).
# 200 cut off the end of real replies: the URL of Gmail's 4-line "NoSuchUser" (about 300
# characters joined), or a single reply line, which may be 512 octets (RFC 5321 section
# 4.5.3.1.5). 900 keeps a whole line and a typical multi-line reply, and is what one DSN
# field carries (dsn.MAX_DIAGNOSTIC); still a bound, so a queue entry's last_errors stay
# under 1 KB a recipient whatever a relay sends.
MAX_TEXT: Final = 900
# Our own words for a failure without a reply (a timeout, a refused connection, a bug's
# exception) say what happened in a line: no DSN needs more, and an exception's message can
# be anything (a whole repr).
MAX_OWN_TEXT: Final = 200
# RFC 3463 section 2: class "." subject "." detail, subject and detail 1*3digit; RFC 2034
# section 4 puts it first in the text, followed by a space. The lookahead rejects "5.1.1234"
# and "5.1.1.2" rather than reading a prefix of them. [0-9], not \d, which matches any
# Unicode digit.
_ENHANCED: Final = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?![0-9A-Za-z]|\.[0-9])")
_REPLY_CLASSES: Final = (2, 4, 5)
# The replies to MAIL FROM, RCPT TO and DATA: the only ones that judge this message.
_MESSAGE_REPLIES: Final = (
    aiosmtplib.SMTPSenderRefused,
    aiosmtplib.SMTPRecipientRefused,
    aiosmtplib.SMTPDataError,
)
_RCPT_TOO_MANY: Final = 552
# RFC 3463 section 3.5: X.4.1 "no answer from host", X.4.2 "bad connection" (time-out).
CONNECTION_STATUS: Final = "4.4.1"
TIMEOUT_STATUS: Final = "4.4.2"
CONGESTION_STATUS: Final = "4.4.5"  # RFC 3463 X.4.5: mail system congestion


class Outcome(StrEnum):
    """What a verdict means for one recipient (DESIGN invariant 3)."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


class FailureKind(StrEnum):
    """Bounded label values for metrics and logs: never derived from remote text."""

    REPLY_2XX = "2xx"
    REPLY_4XX = "4xx"
    REPLY_5XX = "5xx"
    CONNECTION = "connection_error"
    TIMEOUT = "timeout"
    # Our own client refused to send it (an address no SMTP command line can carry): the
    # message is at fault, never the relay, and no relay would ever take it.
    UNSENDABLE = "unsendable"
    # Held back by our own cluster-wide relay limit (connections, messages per second): the
    # relay was never asked, so this says nothing about it.
    LIMITED = "limited"
    # None of the relays this recipient may use (its routing rule's) is healthy: it waits,
    # and no relay outside the rule's set is ever tried instead.
    NO_ROUTE = "no_route"


# Kinds no relay said: a DSN names no Remote-MTA for them.
_UNASKED_KINDS: Final = frozenset(
    {FailureKind.UNSENDABLE, FailureKind.LIMITED, FailureKind.NO_ROUTE}
)


@dataclass(frozen=True)
class Verdict:
    """One recipient's result from one relay attempt: outcome, bounded kind, code, text, status."""

    outcome: Outcome
    kind: FailureKind
    code: int | None  # the SMTP reply code, when the relay sent a well-formed one
    text: str  # one line, at most MAX_TEXT characters, e.g. "550 5.1.1 User unknown"
    status: str  # RFC 3463 enhanced status, e.g. "5.1.1"

    @property
    def from_relay(self) -> bool:
        """Whether a relay said this (RFC 3464 section 2.3.5: only then is it the Remote-MTA):
        not our client's refusal to send an address, nor our own limit or missing route,
        which never asked one."""
        return self.kind not in _UNASKED_KINDS


def one_line(text: str, limit: int = MAX_TEXT) -> str:
    """Collapse whitespace (multi-line replies, tracebacks) and drop control characters."""
    flat = " ".join(text.split())
    return "".join(c for c in flat if c.isprintable())[:limit]


def enhanced_status(code: int, message: str) -> str:
    """The RFC 3463 code at the start of the reply text, else the class default "X.0.0".

    RFC 2034 section 4 puts the enhanced code first in the text. One whose class disagrees
    with the basic code ("550 4.1.1") is ignored: the basic code decides the outcome, and a
    DSN must not carry a contradicting status. A code outside 2xx/4xx/5xx gets "4.0.0",
    matching the temporary outcome classify_reply gives it.
    """
    reply_class = code // 100
    if reply_class not in _REPLY_CLASSES:
        return "4.0.0"
    match = _ENHANCED.match(message.lstrip())
    if match and int(match.group(1)) == reply_class:
        return ".".join(match.groups())
    return f"{reply_class}.0.0"


def classify_reply(code: int, message: str) -> Verdict:
    """The verdict for one SMTP reply to MAIL, RCPT or DATA."""
    text = one_line(f"{code} {message}")
    status = enhanced_status(code, message)
    if 200 <= code < 300:
        return Verdict(Outcome.DELIVERED, FailureKind.REPLY_2XX, code, text, status)
    if 500 <= code < 600:
        return Verdict(Outcome.PERMANENT, FailureKind.REPLY_5XX, code, text, status)
    # 4xx, and anything unexpected (1xx, 3xx, out of range): an unexpected reply is never a
    # reason to bounce; retrying costs a little time, a wrong bounce loses the mail.
    return Verdict(Outcome.TEMPORARY, FailureKind.REPLY_4XX, code, text, status)


def positive(code: int) -> bool:
    """A yes to MAIL or RCPT: any 2xx (RFC 5321 §4.2.1), as Postfix's client reads it.
    aiosmtplib takes only 250 to MAIL and 250 or 251 to RCPT; a `252` then became a refusal
    whose code said "delivered", for a recipient the message never went to."""
    return code // 100 == 2


def _message_refused(code: int, message: str) -> Verdict:
    """MAIL, RCPT or DATA refused, by this reply. One that says 2xx (`250` to DATA instead of
    `354`: the message never went) is unexpected, so temporary: read as a reply it was
    "delivered", and the mail was lost."""
    if positive(code):
        text = one_line(f"{code} {message}")
        return Verdict(Outcome.TEMPORARY, FailureKind.REPLY_4XX, code, text, "4.0.0")
    return classify_reply(code, message)


def classify_exception(exc: BaseException) -> Verdict:
    """The verdict for an exception raised while talking to a relay (aiosmtplib or OS)."""
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused) and exc.code == _RCPT_TOO_MANY:
        return _too_many_recipients(exc.code, exc.message)
    if isinstance(exc, _MESSAGE_REPLIES) and exc.code > 0:
        return _message_refused(exc.code, exc.message)
    # TimeoutError before OSError (it is one) and before SMTPConnectError
    # (SMTPConnectTimeoutError is both).
    if isinstance(exc, TimeoutError):
        return _own_failure(FailureKind.TIMEOUT, f"timeout: {_detail(exc)}", TIMEOUT_STATUS)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _session_refused(exc)
    if isinstance(exc, aiosmtplib.SMTPException | OSError):  # OSError covers ConnectionError
        return _own_failure(FailureKind.CONNECTION, f"connection: {_detail(exc)}")
    # A bug or a library surprise: still temporary (invariant 2, nothing disappears), and
    # named by class so the log says what happened without echoing an unbounded message.
    text = f"{exc.__class__.__name__}: {_detail(exc)}"
    return _own_failure(FailureKind.CONNECTION, f"unexpected error: {text}")


def unsendable(address: str, *, sender: bool) -> Verdict:
    """Permanent for this message: our client will not put the address on a command line.

    RFC 3463: X.1.7 bad sender address syntax, X.1.3 bad destination address syntax. No reply
    code, because no relay was asked; passive health checks never count it.
    """
    status = "5.1.7" if sender else "5.1.3"
    role = "sender" if sender else "recipient"
    text = f"{status} {role} address {address!r} cannot be sent in an SMTP command"
    return Verdict(Outcome.PERMANENT, FailureKind.UNSENDABLE, None, one_line(text), status)


def relay_paused() -> Verdict:
    """Temporary: an operator paused the relay while this send waited for its turn there (a
    connection slot, the per-second budget). It goes to the next relay, or waits like mail
    held back by a limit: no relay was asked, so nothing counts against the message or it."""
    text = "4.3.2 relay paused by an operator"
    return _failure(FailureKind.LIMITED, None, text, "4.3.2")


def limit_reached() -> Verdict:
    """Temporary: the relay's cluster-wide connection or rate limit is spent right now.

    RFC 3463 X.4.5 (mail system congestion). No reply code: no relay said anything, so passive
    health checks do not count it against the relay.
    """
    text = "4.4.5 relay connection or rate limit reached"
    return _failure(FailureKind.LIMITED, None, text, CONGESTION_STATUS)


def no_session() -> Verdict:
    """Temporary: no session to the relay could be opened (every try found it closed).

    Relay trouble, like a refused connection (RFC 3463 X.4.1: no answer from host).
    """
    return _failure(FailureKind.CONNECTION, None, "no session to the relay could be opened")


def is_relay_trouble(verdict: Verdict) -> bool:
    """What passive health checks count: the relay failed to talk (connection error, timeout,
    a refused session) or is closing (421), not an answer about a recipient, an address our
    client refused, or our own limit."""
    return (
        verdict.kind in (FailureKind.CONNECTION, FailureKind.TIMEOUT)
        or verdict.code == CLOSING_CODE
    )


def _too_many_recipients(code: int, message: str) -> Verdict:
    """RFC 5321 section 4.5.3.1.10: a 552 to RCPT is the legacy "too many recipients" reply;
    clients SHOULD treat it as temporary (452), so those recipients go in a later transaction.
    """
    verdict = classify_reply(code, message)
    status = "4" + verdict.status[1:]
    return Verdict(Outcome.TEMPORARY, FailureKind.REPLY_4XX, code, verdict.text, status)


def _session_refused(exc: aiosmtplib.SMTPResponseException) -> Verdict:
    """A reply outside MAIL/RCPT/DATA (greeting, EHLO, STARTTLS, AUTH, RSET) or a malformed one.

    It says our relay would not give us a session, not that the recipient is bad: a 535 to
    AUTH means our credentials are wrong, and bouncing every queued message for that would be
    a disaster (Postfix soft-bounces these too: smtp_sasl_auth_soft_bounce,
    smtp_skip_5xx_greeting). Counted as relay trouble by the passive health checks.
    """
    if exc.code >= 100:
        return _failure(FailureKind.CONNECTION, exc.code, f"{exc.code} {exc.message}")
    # aiosmtplib reports an unparsable or oversized reply with code -1.
    return _failure(FailureKind.CONNECTION, None, f"invalid reply: {exc.message}")


def _failure(
    kind: FailureKind, code: int | None, text: str, status: str = CONNECTION_STATUS
) -> Verdict:
    return Verdict(Outcome.TEMPORARY, kind, code, one_line(text) or kind.value, status)


def _own_failure(kind: FailureKind, text: str, status: str = CONNECTION_STATUS) -> Verdict:
    return _failure(kind, None, one_line(text, MAX_OWN_TEXT), status)


def _detail(exc: BaseException) -> str:
    # str() of a ConnectionRefusedError is "[Errno 111] Connect call failed ...": useful.
    # Cap before joining so a huge message is never copied around.
    return one_line(str(exc)[: MAX_OWN_TEXT * 4]) or exc.__class__.__name__
