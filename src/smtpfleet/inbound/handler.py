"""aiosmtpd hooks: decide on each command and hand accepted mail to the spool.

Every reply comes from `smtpfleet.replies`. Our own failures before the durable write are 4xx
(DESIGN invariant 1); only the client's mistakes get a 5xx. The spool is the `Spool` protocol:
this package never sees Redis.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session

from smtpfleet import deadlines, replies
from smtpfleet.envelope import NewMessage, choose_shard, dedupe_fingerprint, new_qid
from smtpfleet.errors import QueueFull, QueueUnavailable, SigningFailed
from smtpfleet.inbound.policy import (
    NULL_PATHS,
    HeaderSection,
    HeaderSectionTooLarge,
    RecipientPolicy,
    has_bare_line_ending,
    received_header,
    recipient_key,
)
from smtpfleet.inbound.syntax import POSTMASTER
from smtpfleet.inbound.tls import describe as describe_tls
from smtpfleet.logs import info_event
from smtpfleet.metrics import Metrics
from smtpfleet.queue.spool import Spool

log = logging.getLogger(__name__)

ENHANCED_STATUS_CODES = "250-ENHANCEDSTATUSCODES"  # RFC 2034: we send them on every reply
# RFC 2920: a sending MTA may send MAIL, every RCPT and DATA at once, a round trip instead of
# one per command. aiosmtpd reads commands one line at a time and answers each in order,
# whether they came one per packet or together (tests/integration/test_fuzz.py sends groups).
PIPELINING = "250-PIPELINING"
# A control character in the client's name is never a host name (RFC 5321 §4.1.1.1), and the
# name goes into our Received header and logs.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Signer(Protocol):
    """Signs an accepted message before it is queued (inbound/signing.py: DKIM)."""

    async def sign(self, message: bytes) -> bytes:
        """The message to queue; raises SigningFailed when the client must retry."""
        ...


def _result(code: int, qid: str | None) -> str:
    """The accept's metric label, from the reply code and whether a queue id was given."""
    if code == 250 and qid is not None:
        return "queued"
    return "tempfail" if 400 <= code < 500 else "rejected"


def _peer_ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"


def _outcome(accepting: asyncio.Future[tuple[str, str | None]]) -> tuple[str, str | None]:
    """What an accept that outlived its session came to."""
    if accepting.cancelled() or accepting.exception() is not None:
        return replies.LOCAL_ERROR, None
    return accepting.result()


class InboundHandler:
    def __init__(
        self,
        *,
        spool: Spool,
        policy: RecipientPolicy,
        hostname: str,
        shards: int,
        max_recipients: int,
        max_received_headers: int,
        accept_timeout_s: float,
        metrics: Metrics,
        signer: Signer | None = None,
        fenced: Callable[[], bool] | None = None,
        tenant_header: str = "",
        class_header: str = "",
    ) -> None:
        self._metrics = metrics
        self._tenant_header = tenant_header.lower().encode("ascii")
        self._class_header = class_header.lower().encode("ascii")
        # True while this node is cut off from its queue (it fenced itself): say 451 at MAIL
        # instead of taking the whole message and waiting out the accept timeout, so the
        # sender tries the next MX at once.
        self._fenced = fenced
        self._signer = signer
        self._spool = spool
        self._policy = policy
        self._hostname = hostname
        self._shards = shards
        self._max_recipients = max_recipients
        self._max_received = max_received_headers
        self._accept_timeout_s = accept_timeout_s
        self._orphans: set[asyncio.Future[tuple[str, str | None]]] = set()
        # The recipient_key of each transaction's recipients: a duplicate is found in one
        # look-up, not by comparing with every recipient (up to max_recipients) at each RCPT.
        # aiosmtpd makes a new envelope per transaction; the old one's entry goes with it.
        self._recipient_keys: weakref.WeakKeyDictionary[Envelope, set[str]] = (
            weakref.WeakKeyDictionary()
        )

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        if _CONTROL.search(hostname):
            return [replies.BAD_HELO.format(command="EHLO")]
        # With an EHLO hook, aiosmtpd 1.4.6 leaves recording the client's name to the hook;
        # without it every later MAIL would get "503 send HELO first".
        session.host_name = hostname
        return [*responses[:-1], PIPELINING, ENHANCED_STATUS_CODES, responses[-1]]

    async def handle_HELO(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        if _CONTROL.search(hostname):
            return replies.BAD_HELO.format(command="HELO")
        session.host_name = hostname
        return f"250 {self._hostname}"

    async def handle_MAIL(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # SIZE= above the limit was refused by aiosmtpd before this hook (RFC 1870 §6.2,
        # rewritten to MESSAGE_TOO_BIG by the server); the actual size is enforced during DATA.
        if self._fenced is not None and self._fenced():
            return replies.QUEUE_UNAVAILABLE
        refusal = self._policy.check_sender(address)
        if refusal is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return replies.SENDER_OK

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        mailbox = self._mailbox(address)
        if mailbox is None:
            return replies.POSTMASTER_NO_DOMAIN
        address = mailbox
        keys = self._recipient_keys.setdefault(envelope, set())
        key = recipient_key(address)
        if key in keys:  # (the per-client limits let it by: accepted_already)
            # Accepted already, by the same rules: a second RCPT for it would reach the relay
            # and the mailbox twice. Checked before the limit, or a 452 would have the client
            # send it again in a transaction of its own.
            return replies.RCPT_DUPLICATE
        refusal = self._rcpt_refusal(session, envelope, address)
        if refusal is not None:
            return refusal
        keys.add(key)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return replies.RCPT_OK

    def accepted_already(self, envelope: Envelope, address: str) -> bool:
        """Whether RCPT `address` names a recipient this transaction has accepted (the same
        mailbox by recipient_key), which handle_RCPT answers 250 and takes once."""
        keys = self._recipient_keys.get(envelope)
        if not keys:  # a transaction's first RCPT: nothing to look up
            return False
        mailbox = self._mailbox(address)
        return mailbox is not None and recipient_key(mailbox) in keys

    def _mailbox(self, address: str) -> str | None:
        """The mailbox a RCPT names: RCPT TO:<Postmaster> (RFC 5321 §4.5.1: it MUST be
        accepted) is the postmaster of our first accepted domain; None when there is none."""
        return self._policy.postmaster if address == POSTMASTER else address

    def _rcpt_refusal(self, session: Session, envelope: Envelope, address: str) -> str | None:
        if len(envelope.rcpt_tos) >= self._max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 makes the client send the rest in another transaction.
            return replies.TOO_MANY_RECIPIENTS
        refusal = self._policy.check(
            address, _peer_ip(session), authenticated=bool(session.authenticated)
        )
        if refusal is not None:
            log.info("refused rcpt from %s: %s", _peer_ip(session), refusal)
        return refusal

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        started = time.perf_counter()
        data = bytes(envelope.original_content or b"")
        accepting = asyncio.ensure_future(self._accept(session, envelope, data))
        try:
            # Shielded: a client that resets the connection right after the final dot cancels
            # this hook, but the message may still be queued (and will be delivered), so its
            # accept record and metrics must still be written when the enqueue ends.
            reply, qid = await asyncio.shield(accepting)
        except asyncio.CancelledError:
            self._orphans.add(accepting)
            accepting.add_done_callback(self._orphans.discard)
            accepting.add_done_callback(
                lambda done: self._observe(session, envelope, data, *_outcome(done), started)
            )
            raise
        except Exception:
            # Answered here rather than in handle_exception so that aiosmtpd still resets the
            # transaction and the session stays usable.
            log.exception("unexpected error while accepting a message")
            reply, qid = replies.LOCAL_ERROR, None
        self._observe(session, envelope, data, reply, qid, started)
        return reply

    def _observe(
        self,
        session: Session,
        envelope: Envelope,
        data: bytes,
        reply: str,
        qid: str | None,
        started: float,
    ) -> None:
        self._metrics.accept_latency.observe(time.perf_counter() - started)
        self._metrics.child(self._metrics.messages, _result(int(reply[:3]), qid)).inc()
        info_event(
            log,
            "smtp transaction",
            {
                "event": "smtp.transaction",
                "qid": qid,
                "peer": _peer_ip(session),
                "recipients": len(envelope.rcpt_tos),
                "size": len(data),
                "code": int(reply[:3]),
            },
        )

    async def _accept(
        self, session: Session, envelope: Envelope, data: bytes
    ) -> tuple[str, str | None]:
        if has_bare_line_ending(data):
            log.warning("refused message with bare CR/LF from %s", _peer_ip(session))
            return replies.BARE_LINE_ENDING, None
        try:
            headers = HeaderSection(data)  # read once for all the questions below
        except HeaderSectionTooLarge:
            log.warning("refused a header section over 1 MiB from %s", _peer_ip(session))
            return replies.HEADERS_TOO_BIG, None
        if headers.received > self._max_received:
            return replies.LOOP_DETECTED, None
        message = self._new_message(session, envelope, data, headers)
        if self._signer is not None and self._may_sign(session):
            # Signed once, before the write: every delivery of it carries this signature.
            try:
                message = replace(message, data=await self._signer.sign(message.data))
            except SigningFailed:
                return replies.NOT_SIGNED, None
        return await self._enqueue(message), message.qid

    def _may_sign(self, session: Session) -> bool:
        """Only our own clients' mail is signed (relay_networks, or authenticated): mail from
        the internet to an accepted domain with a forged From: of ours must not get our
        signature (OpenDKIM signs for its InternalHosts and authenticated clients alone)."""
        return bool(session.authenticated) or self._policy.is_relay_client(_peer_ip(session))

    def tenant_of(self, session: Session, headers: HeaderSection) -> str | None:
        """Who the message is from, for routing rules: the authenticated user; else, from a
        relay_networks client, the tenant header. Anyone else's header is ignored, or a
        stranger could choose the relays their mail leaves through."""
        if session.authenticated and isinstance(session.auth_data, str):
            return session.auth_data
        if self._tenant_header and self._policy.is_relay_client(_peer_ip(session)):
            return headers.value(self._tenant_header)
        return None

    def class_of(self, session: Session, headers: HeaderSection) -> str | None:
        """The traffic class the client asks for, from our own clients only (relay_networks,
        or authenticated): a stranger must not put its mail ahead of the queue."""
        if self._class_header and self._may_sign(session):
            return headers.value(self._class_header)
        return None

    def _new_message(
        self, session: Session, envelope: Envelope, data: bytes, headers: HeaderSection
    ) -> NewMessage:
        # aiosmtpd keeps the null reverse-path as "<>" (it needs a truthy value); the queue
        # and the DSN logic know it as "".
        mail_from = envelope.mail_from or ""
        sender = "" if mail_from in NULL_PATHS else mail_from
        recipients = tuple(envelope.rcpt_tos)
        fingerprint = dedupe_fingerprint(
            headers.value(b"message-id"), sender, recipients, content=data
        )
        qid = new_qid(choose_shard(fingerprint, self._shards))
        trace = received_header(
            helo=session.host_name,
            peer_ip=_peer_ip(session),
            by_host=self._hostname,
            qid=qid,
            recipient=recipients[0] if len(recipients) == 1 else None,
            when=datetime.now(UTC),
            esmtp=bool(session.extended_smtp),
            tls=describe_tls(session.ssl),
            authenticated=bool(session.authenticated),
        )
        return NewMessage(
            qid=qid,
            sender=sender,
            recipients=recipients,
            data=trace + data,
            fingerprint=fingerprint,
            tenant=self.tenant_of(session, headers),
            traffic_class=self.class_of(session, headers),
        )

    async def _enqueue(self, message: NewMessage) -> str:
        # On timeout the enqueue is cancelled; the spool must then leave no copy behind
        # (RFC 5321 §4.2.5: after a 4xx to the final dot the message must not be delivered).
        try:
            # Not wait_for (on 3.11 a task per accept) nor asyncio.timeout (a loop timer armed
            # and cancelled per accept): a deadline that almost never fires (deadlines.py).
            with deadlines.timeout(self._accept_timeout_s):
                result = await self._spool.enqueue(message)
        except (QueueUnavailable, TimeoutError) as exc:
            # An exception is always true, and a TimeoutError says nothing: name the wait.
            reason = str(exc) or f"no answer within {self._accept_timeout_s:g} s"
            log.warning("%s: not queued, answered 451: %s", message.qid, reason)
            return replies.QUEUE_UNAVAILABLE
        except QueueFull:
            log.warning("%s: queue above its high-water mark, answered 452", message.qid)
            return replies.QUEUE_FULL
        except Exception:
            log.exception("%s: unexpected error while queueing", message.qid)
            return replies.LOCAL_ERROR
        if result.duplicate:
            log.info("%s: duplicate of %s, not queued again", message.qid, result.qid)
            self._metrics.messages.labels("duplicate").inc()
        return replies.QUEUED_FMT.format(qid=result.qid)

    async def close(self) -> None:
        """Cancel accepts whose client has gone; the queue is about to close under them."""
        orphans = list(self._orphans)
        for accepting in orphans:
            accepting.cancel()
        await asyncio.gather(*orphans, return_exceptions=True)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default "500 Error: (Exc) text" looks permanent and leaks internals. We do
        # not know what state the session is in (an error mid-DATA could leave message lines
        # to be read as commands), so the reply is a 421 and the server closes the connection.
        log.error("SMTP session error", exc_info=error)
        return replies.LOCAL_ERROR_CLOSING
