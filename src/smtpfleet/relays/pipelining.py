"""Outbound PIPELINING (RFC 2920) on an aiosmtplib session: the envelope in one write.

MAIL, every RCPT and DATA go out in one write and their replies are read in order; after the
354 the message goes out in a second write. Two round trips per message instead of three plus
one per recipient. Built on aiosmtplib's own connection rather than a second client: its
protocol's command lock (no other command interleaves), its write and reply parser, and its
address quoting and body encoding, so the bytes are those its step-by-step commands send.

Every reply is read, even after a refusal. RFC 2920 §3.1: the server answers each command of
the group, so a refused MAIL is followed by refused RCPTs and DATA, and a DATA with no accepted
recipient is answered 503/554 (§3.1: "the server ... must reject the DATA"). Consuming them all
keeps the next command's reply paired with its command.

MAIL carries BODY=8BITMIME and SIZE as the session's relay offers them (relays/mail_params.py):
an envelope keeps its MAIL line bare and the facts of its message, and takes the parameters
of the session it is written on, which for a carried envelope is the carrier's.

Across messages: the body may carry the next message's envelope (RFC 2920 §3.1: "the actual
transfer of message content is explicitly allowed to be the first 'command' in a group").
The transaction that wrote it reads those replies too, right after its own final reply: a
reply arriving while nobody waits for one is dropped by aiosmtplib's protocol, so they must be
read before the session changes hands.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)

from smtpfleet import deadlines
from smtpfleet.delivery.classify import (
    Verdict,
    classify_exception,
    classify_reply,
    positive,
    unsendable,
)
from smtpfleet.inbound.syntax import PLAIN_MAILBOX
from smtpfleet.relays import mail_params
from smtpfleet.relays.mail_params import NO_EXTENSIONS, Extensions

START_INPUT = 354  # RFC 5321 §4.2: "Start mail input"
BAD_SEQUENCE = 503  # RFC 5321 §4.2: "Bad sequence of commands" (RCPT after a refused MAIL)
CRLF = b"\r\n"


def can_pipeline(smtp: object) -> bool:
    """True for an aiosmtplib session whose relay advertised PIPELINING in its EHLO reply."""
    return isinstance(smtp, aiosmtplib.SMTP) and smtp.supports_extension("pipelining")


class PossiblyStored(Exception):
    """No reply came to a message's final dot, which went out: the relay may have stored it
    (RFC 1047's duplicate), and a retry may deliver it twice."""


class ReplyLost(aiosmtplib.SMTPServerDisconnected, PossiblyStored):
    """The session broke after the final dot went out. A temporary failure, as any lost
    session, but one that must not be sent again at once on a fresh session."""


class ReplyTimedOut(aiosmtplib.SMTPReadTimeoutError, PossiblyStored):
    """No reply to the final dot within the command timeout: a timeout, as any other."""


@dataclass(frozen=True)
class Envelope:
    """The command lines of one transaction; addresses our client refuses are left out.
    `mail` has neither parameters nor line end: those depend on the session (`wire`)."""

    mail: bytes
    rcpts: list[tuple[str, bytes]]
    unsendable: dict[str, Verdict]
    content: mail_params.Content


def envelope(sender: str, recipients: Sequence[str], data: bytes = b"") -> Envelope:
    """`data`: the message, whose size and 8-bit bytes MAIL declares to a relay that asks.
    Raises ValueError for a sender our client will not put on a command line (as MAIL does)."""
    mail = _line(b"MAIL FROM:", sender, end=b"")
    rcpts: list[tuple[str, bytes]] = []
    refused: dict[str, Verdict] = {}
    for recipient in recipients:
        try:
            rcpts.append((recipient, _line(b"RCPT TO:", recipient)))
        except ValueError:
            refused[recipient] = unsendable(recipient, sender=False)
    return Envelope(mail, rcpts, refused, mail_params.content(data))


def _line(verb: bytes, address: str, end: bytes = CRLF) -> bytes:
    # What aiosmtplib's mail()/rcpt() send: the quoted address, ASCII, no control characters
    # (UnicodeEncodeError is a ValueError, as there).
    # A plain `local@domain`, what almost every address is, comes back from aiosmtplib's
    # quoting unchanged; its parser (the `email` package's) costs 19 µs an address.
    if PLAIN_MAILBOX.fullmatch(address):
        return b"%s<%s>%s" % (verb, address.encode("ascii"), end)
    argument = quote_address(address).encode("ascii")
    if COMMAND_INJECTION_REGEX.search(argument):
        raise ValueError("address contains a prohibited control character")
    return verb + argument + end


@dataclass(frozen=True)
class EnvelopeReplies:
    """The relay's replies to one envelope: MAIL, each RCPT in order, DATA."""

    mail: aiosmtplib.SMTPResponse
    rcpts: list[aiosmtplib.SMTPResponse]
    go_ahead: aiosmtplib.SMTPResponse


@dataclass(frozen=True)
class Exchange:
    """What one transaction came to. `sent`: a message went out (else the session must be
    RSET). `successor`: the next message's envelope, written with this one's body, and the
    relay's replies to it, read here; None in `replies` when they could not be read (the
    session is then out of step)."""

    verdicts: dict[str, Verdict]
    sent: bool
    successor: Envelope | None = None
    replies: EnvelopeReplies | None = None


# Asked once, just before a message's body goes: the envelope of a message waiting for this
# session, to go in the same write (RFC 2920 §3.1: the message content may be the first
# "command" of a group), or None.
Successor = Callable[[], "Envelope | None"]


def wire(env: Envelope, relay: Extensions = NO_EXTENSIONS) -> bytes:
    """The envelope's group as written on a session whose relay offered `relay`."""
    mail = env.mail + mail_params.params(relay, env.content) + CRLF
    return b"".join([mail, *(line for _, line in env.rcpts), b"DATA\r\n"])


async def transaction(
    smtp: aiosmtplib.SMTP,
    env: Envelope,
    data: bytes,
    timeout_s: float,
    *,
    replies: EnvelopeReplies | None = None,
    successor: Successor | None = None,
    extensions: Extensions = NO_EXTENSIONS,
) -> Exchange:
    """One message. `replies`: its envelope already went, with the previous message's body,
    and these are the relay's answers. `extensions`: what the session's relay offered, for
    the MAIL parameters of this envelope and of a successor's. Connection trouble raises, as
    aiosmtplib's commands do, unless it comes after this message's final reply (then
    `Exchange.replies` is None)."""
    protocol = smtp.protocol
    lock = protocol._command_lock if protocol is not None else None
    if protocol is None or lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    try:
        async with lock:
            exchange = await _exchange(
                protocol, env, data, timeout_s, replies, successor, extensions
            )
    except (aiosmtplib.SMTPServerDisconnected, TimeoutError):
        # A lost reply leaves the session out of step: close it, as aiosmtplib does.
        smtp.close()
        raise
    if exchange.successor is not None and exchange.replies is None:
        smtp.close()
    return exchange


async def _exchange(
    protocol: SMTPProtocol,
    env: Envelope,
    data: bytes,
    timeout_s: float,
    replies: EnvelopeReplies | None,
    successor: Successor | None,
    extensions: Extensions,
) -> Exchange:
    if replies is None:
        _write(protocol, wire(env, extensions))
        replies = await read_replies(protocol, env, timeout_s)
    verdicts, accepted = judge(env, replies)
    if replies.go_ahead.code != START_INPUT:
        # DATA refused: with recipients accepted, that is their verdict; without, it is the
        # expected 503/554 (consumed above) and the caller resets the transaction.
        exc = aiosmtplib.SMTPDataError(replies.go_ahead.code, replies.go_ahead.message)
        verdicts.update(dict.fromkeys(accepted, classify_exception(exc)))
        return Exchange(verdicts, False)
    # 354 with no recipient accepted (a server that ignores §3.1): end the message at once.
    body = _body(data) if accepted else b".\r\n"
    following = successor() if accepted and successor is not None else None
    _write(protocol, body + wire(following, extensions) if following is not None else body)
    try:
        final = await _reply(protocol, timeout_s)
    except aiosmtplib.SMTPServerDisconnected as lost:
        raise ReplyLost(f"lost before the reply to the final dot: {lost}") from lost
    except TimeoutError as late:
        raise ReplyTimedOut(f"no reply to the final dot: {late}") from late
    if final.code == 250:
        verdicts.update(dict.fromkeys(accepted, classify_reply(final.code, final.message)))
    else:
        exc = aiosmtplib.SMTPDataError(final.code, final.message)
        verdicts.update(dict.fromkeys(accepted, classify_exception(exc)))
    if following is None:
        return Exchange(verdicts, bool(accepted))
    # The next message's replies follow ours: read them now, while nothing else can (a reply
    # arriving with no reader armed is dropped by aiosmtplib's protocol), and hand them on.
    try:
        next_replies: EnvelopeReplies | None = await read_replies(protocol, following, timeout_s)
    except (aiosmtplib.SMTPException, TimeoutError):
        next_replies = None  # ours stands; the next message goes on another session
    if next_replies is not None and not in_order(next_replies):
        next_replies = None  # not its replies: the next message goes on another session
    return Exchange(verdicts, True, following, next_replies)


async def read_replies(protocol: SMTPProtocol, env: Envelope, timeout_s: float) -> EnvelopeReplies:
    mail = await _reply(protocol, timeout_s)
    rcpts = [await _reply(protocol, timeout_s) for _ in env.rcpts]
    return EnvelopeReplies(mail, rcpts, await _reply(protocol, timeout_s))


def out_of_step(replies: EnvelopeReplies) -> bool:
    """Replies no relay gives to one envelope (RFC 5321 §4.1.1.3, §4.2): a recipient refused
    as out of sequence (503) after an accepted MAIL, a recipient accepted after a refused one,
    or DATA answered 2xx. What a reply read one off looks like: MAIL gets a stray, each RCPT
    the reply before its own, DATA the last RCPT's."""
    mail = positive(replies.mail.code)
    if mail and any(reply.code == BAD_SEQUENCE for reply in replies.rcpts):
        return True
    if not mail and any(positive(reply.code) for reply in replies.rcpts):
        return True
    return positive(replies.go_ahead.code)


def in_order(replies: EnvelopeReplies) -> bool:
    """Replies that can be a carried envelope's: not `out_of_step`, and after a refused
    MAIL, every RCPT and the DATA refused as out of sequence (503); after an accepted one, DATA
    answered 354 or refused with no recipient accepted. Its replies are read right behind the
    carrier's, where a stray second reply to the carrier's final dot lands: read as they came,
    a stray `550` would bounce a message the relay accepted. The price: a relay that refuses
    DATA after accepting a recipient, or answers RCPTs after a refused MAIL other than 503
    (both legal, both rare), sends the carried message to another session."""
    go_ahead = replies.go_ahead.code
    if out_of_step(replies):
        return False
    if not positive(replies.mail.code):
        out_of_sequence = (reply.code == BAD_SEQUENCE for reply in replies.rcpts)
        return go_ahead >= 400 and all(out_of_sequence)  # RFC 5321 §4.2.1: 4yz, 5yz refuse
    if go_ahead == START_INPUT:
        return True
    return go_ahead >= 400 and not any(positive(reply.code) for reply in replies.rcpts)


def judge(env: Envelope, replies: EnvelopeReplies) -> tuple[dict[str, Verdict], list[str]]:
    """Each refused recipient's verdict, and the recipients the relay accepted."""
    verdicts = dict(env.unsendable)
    accepted: list[str] = []
    mail = replies.mail
    for (recipient, _), reply in zip(env.rcpts, replies.rcpts, strict=True):
        if not positive(mail.code):
            exc: Exception = aiosmtplib.SMTPSenderRefused(mail.code, mail.message, "")
            verdicts[recipient] = classify_exception(exc)
        elif positive(reply.code):
            accepted.append(recipient)
        else:
            exc = aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
            verdicts[recipient] = classify_exception(exc)
    return verdicts, accepted


def _body(data: bytes) -> bytes:
    # What aiosmtplib's data() sends: CRLF line endings, dot-stuffing, the final dot.
    # Its two regular expressions rewrite every line of every message (4 % of a node's CPU);
    # what we accepted has CRLF endings already (bare CR or LF is refused), and a line that
    # starts with a dot is rare: three counts and a search in C tell us, and the same bytes go.
    lines = data.count(b"\r\n")
    if lines == data.count(b"\r") == data.count(b"\n") and data.endswith(b"\r\n"):
        if data.startswith(b".") or b"\n." in data:
            data = PERIOD_REGEX.sub(b"..", data)
        return data + b".\r\n"
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"


def _write(protocol: SMTPProtocol, payload: bytes) -> None:
    # Armed before the write, as aiosmtplib's execute_command does: a reply arriving before
    # the first read must not be taken for unsolicited data and dropped.
    protocol._response_pending = True
    protocol.write(payload)


async def _reply(protocol: SMTPProtocol, timeout_s: float) -> aiosmtplib.SMTPResponse:
    """The next reply: one already buffered behind the last (several replies often arrive in
    one segment; aiosmtplib parses one per read), or the next to arrive."""
    buffered = protocol._read_response_from_buffer()
    if buffered is not None:
        return buffered
    # A deadline, not read_response's own timeout (wait_for): wait_for wakes this task one
    # loop turn after the reply, and a segment arriving in that turn, with the reply waiter
    # still full, would be dropped by the protocol.
    try:
        with deadlines.timeout(timeout_s):
            return await protocol.read_response(timeout=None)
    except TimeoutError as exc:
        raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc
