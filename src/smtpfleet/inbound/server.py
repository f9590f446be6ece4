"""The SMTP listeners of a node: aiosmtpd sessions with our replies, caps and drain.

aiosmtpd speaks the protocol; this module decides what happens around it: how many sessions
run at once, what a session hears while the node drains, how the idle timer behaves around
DATA, and what aiosmtpd's own (basic-code) replies are rewritten to, in one table.

A reply of 421 always closes the connection here (RFC 5321 §3.8): the session cap, draining,
the idle timeout and errors of unknown state all end that way.

Each listener has a profile (`ListenerConfig`): STARTTLS where a certificate is configured,
implicit TLS from the first byte, TLS required before mail. A TLS upgrade makes aiosmtpd call
`connection_made` again on the same session object: it is admitted (and counted) once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, AnyStr, Final, cast

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    _Missing,
    syntax,
)

from smtpfleet import deadlines, replies
from smtpfleet.config import InboundConfig, ListenerConfig, ListenerProfile, describe_pair_failure
from smtpfleet.envelope import now_ms
from smtpfleet.errors import ConfigError
from smtpfleet.inbound import redact, tls
from smtpfleet.inbound.auth import AuthCheck, Authenticator, initial_response, plain_credentials
from smtpfleet.inbound.budget import ByteBudget
from smtpfleet.inbound.client_gate import ClientGates
from smtpfleet.inbound.counters import ClientCounter
from smtpfleet.inbound.failures import FailureCounter
from smtpfleet.inbound.handler import InboundHandler
from smtpfleet.inbound.limits import DataRate, Limit, LocalClientCounter
from smtpfleet.inbound.message_data import MessageData
from smtpfleet.inbound.proxy import client_of, in_networks, networks, well_formed
from smtpfleet.inbound.reload import Reloading
from smtpfleet.inbound.session_init import init_session
from smtpfleet.inbound.syntax import (
    RepeatedParameter,
    parse_forward_path,
    parse_params,
    parse_path,
    parse_vrfy,
)
from smtpfleet.inbound.tls_tickets import TicketKeyError
from smtpfleet.metrics import Metrics, reply_class, tls_version

log = logging.getLogger(__name__)

Command = Callable[[str | None], Awaitable[None]]
Gate = Callable[[str, Command, str | None], Awaitable[None]]

IDENT: Final = "ESMTP smtpfleet"  # the 220 banner: "220 <hostname> ESMTP smtpfleet"
CLOSE_WAIT_S: Final = 2.0  # close(): how long session tasks get to unwind after an abort
# After our last reply, how long a closing session goes on reading (and discarding) what the
# client still sends. Closing a socket with unread input makes the kernel answer with a reset,
# and a reset can destroy our final reply before the client reads it (RFC 5321 §3.8 wants the
# 421 seen). Postfix reads pending input before it disconnects for the same reason.
LINGER_S: Final = 2.0

# Unknown commands before we give up on a client (aiosmtpd's own limit, BOGUS_LIMIT).
MAX_UNKNOWN_COMMANDS: Final = 5
# Commands that move no mail: each resets the idle timer, so without a bound a client holds a
# session (and its place under max_sessions) for ever by sending one before each timeout.
# After MAX_JUNK_COMMANDS of them with no DATA in between: 421. Postfix's bound is about the
# same (smtpd_junk_command_limit 100, then smtpd_hard_error_limit 20 more).
JUNK_COMMANDS: Final = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP", "HELO", "EHLO"})
MAX_JUNK_COMMANDS: Final = 100
AUTH_LINE_LIMIT: Final = 12288 + 2  # an AUTH response line with its CRLF (RFC 4954 §4)
RATE_CHECK_S: Final = 1.0  # how often a session in DATA checks its client's data rate
# aiosmtpd's one reply for a path it could not read; we say which path it was.
_MALFORMED: Final = "553 5.1.3 Error: malformed address"


def _end(transport: asyncio.Transport) -> None:
    """The linger is over. A client that reads nothing (its receive window full) leaves our
    last replies unsent, and close() waits for them to go, for ever: its session kept its
    place under inbound.max_sessions after the idle timeout (a probe: two such clients shut
    everyone else out of a node with max_sessions 2). Those are aborted."""
    if transport.get_write_buffer_size() > 0:
        transport.abort()
    else:
        transport.close()


# aiosmtpd 1.4.6's own replies (smtp.py, matched whole) → ours, with RFC 3463 enhanced codes.
# Texts that echo client input or exception details are replaced, never passed on: a 500 with
# exception text would look permanent to a client and leak internals.
REWRITES: Final[tuple[tuple[str, str], ...]] = (
    # MAIL ... SIZE= above the limit (RFC 1870 §6.2), and DATA that grew beyond it.
    (r"552 Error: message size exceeds fixed maximum message size", replies.MESSAGE_TOO_BIG),
    (r"552 Error: Too much mail data", replies.MESSAGE_TOO_BIG),
    (r"500 Line too long \(see RFC5321 4\.5\.3\.1\.6\)", replies.LINE_TOO_LONG),
    (r"500 Command line too long", replies.COMMAND_TOO_LONG),
    (r"500 Error: bad syntax", replies.SYNTAX_ERROR),
    (r"500 Error: strict ASCII mode", replies.NON_ASCII_COMMAND),
    (r"500 Error: command .* not recognized", replies.UNKNOWN_COMMAND),
    # handle_exception itself failed: state unknown, so 421 and close (DESIGN invariant 1).
    (r"500 Error: \(.*|500 Error: Cannot describe error", replies.LOCAL_ERROR_CLOSING),
    (r"501 Syntax: (.*)", r"501 5.5.4 Syntax: \1"),
    (
        r"501 Error: BODY can only be one of 7BIT, 8BITMIME",
        "501 5.5.4 BODY must be 7BIT or 8BITMIME",
    ),
    (r"501 Error: SMTPUTF8 .*", "555 5.5.4 SMTPUTF8 is not offered"),
    (
        r"555 (MAIL FROM|RCPT TO) parameters not recognized or not implemented",
        r"555 5.5.4 \1 parameters not recognized or not implemented",
    ),
    (r"503 Error: need RCPT command", replies.NO_RECIPIENTS),
    (r"503 Error: need MAIL command", replies.NEED_MAIL),
    (r"503 Error: nested MAIL command", replies.NESTED_MAIL),
    (r"503 Error: send (HELO|EHLO) first", r"503 5.5.1 Send \1 first"),
    (r"502 Could not VRFY .*", "501 5.5.4 Syntax: VRFY <address>"),
    (r"502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
    (r"454 TLS not available", replies.TLS_NOT_OFFERED),
    (r"530 Must issue a STARTTLS command first", replies.MUST_STARTTLS),
    (r"501 Syntax: STARTTLS", "501 5.5.4 Syntax: STARTTLS"),
    (r"252 Cannot VRFY user, (.*)", r"252 2.0.0 Cannot VRFY user, \1"),
    # HELP: 214 is the help message (RFC 5321 §4.2.2; §4.3.2 answers HELP with 211 or 214,
    # else 502 or 504), with 2.0.0 since RFC 2034 wants an enhanced code on every 2xx after
    # ENHANCEDSTATUSCODES. aiosmtpd says 250, and 501 to a topic it has no help for: that is
    # 504, a parameter not implemented, X.5.4 (RFC 3463 §3.6: "unrecognized features").
    (r"250 Supported commands: (.*)", r"214 2.0.0 Supported commands: \1"),
    (r"250 Syntax: (.*)", r"214 2.0.0 Syntax: \1"),
    (r"501 Supported commands: (.*)", r"504 5.5.4 Unknown HELP topic; supported commands: \1"),
    (r"503 Already authenticated", replies.AUTH_ALREADY),
    (r"501 (Not enough value|Too many values)", replies.AUTH_SYNTAX),
    (r"250 OK", replies.OK),
    (r"221 Bye", replies.BYE),
)
_REWRITES = tuple((re.compile(pattern), template) for pattern, template in REWRITES)
_HAS_ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
# asyncio's default of 100 drops the SYNs of a burst of new connections, and each dropped
# client waits for its SYN retry (1, 3, 7 s ...): the kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 4096


def rewrite(reply: str) -> str:
    """Our wording of one reply line; any other 4xx/5xx without an enhanced code gets X.0.0."""
    if _HAS_ENHANCED.match(reply):
        # Ours already: aiosmtpd's own replies carry no enhanced code. One of them goes with
        # every message ("250 2.0.0 Ok: queued as <id>"), and would otherwise run the whole
        # table and take a place in its cache each time.
        return reply
    return _rewritten(reply)


# Commands a pipelining client may follow with more in the same group (RFC 2920 §3.1).
_PIPELINED_MIDWAY: Final = frozenset({"MAIL", "RCPT", "RSET"})


# aiosmtpd's replies repeat (EHLO's lines, 250s, the same refusals): the table runs once per
# distinct line. Lines that carry client text (VRFY's address) are few and the cache is bounded.
@functools.lru_cache(maxsize=1024)
def _rewritten(reply: str) -> str:
    for pattern, template in _REWRITES:
        match = pattern.fullmatch(reply)
        if match is not None:
            return match.expand(template)
    if reply[:1] in ("4", "5"):
        return f"{reply[:4]}{reply[0]}.0.0 {reply[4:]}".rstrip()
    return reply


@functools.lru_cache(maxsize=4096)
def _unmapped(address: str) -> str:
    """An IPv4-mapped IPv6 address as its IPv4 address (parsed once per distinct client)."""
    with contextlib.suppress(ValueError):
        mapped = getattr(ipaddress.ip_address(address), "ipv4_mapped", None)
        if mapped is not None:
            return str(mapped)
    return address


def _hand_to_tls(
    loop: asyncio.AbstractEventLoop, transport: asyncio.BaseTransport, early: bytes
) -> None:
    """Give `early` to the TLS protocol that start_tls is about to put on `transport`.

    start_tls (asyncio's and uvloop's alike) sets its protocol on the transport at once and
    connects it, then resumes reading, in the loop's next turn; this runs in the turn after,
    before any further read, so the bytes keep their order. The protocol is a buffered one
    (get_buffer, buffer_updated) in both loops."""

    def feed() -> None:
        protocol: Any = transport.get_protocol()
        if transport.is_closing() or not hasattr(protocol, "buffer_updated"):
            return  # the handshake ended already, or start_tls did not run
        view = memoryview(early)
        while view:
            buffer = protocol.get_buffer(len(view))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]

    loop.call_soon(loop.call_soon, feed)


def _retrieve(task: asyncio.Task[None]) -> None:
    # A session task ends with ConnectionResetError when the client vanished while we wrote
    # to it; nobody is left to tell, so mark it retrieved rather than log it at GC.
    if not task.cancelled() and task.exception() is not None:
        log.debug("session ended: %r", task.exception())


class _InputEnded(BaseException):
    """Leaves aiosmtpd's command loop, which catches every Exception, once the input ended."""


class InboundSMTP(SMTP):
    """One SMTP session. Overrides private aiosmtpd 1.4.6 methods, noted where done."""

    def __init__(
        self,
        server: InboundServer,
        handler: InboundHandler,
        listener: ListenerConfig,
        **kwargs: Any,
    ) -> None:
        # aiosmtpd's constructor without its per-session introspection (session_init.py); it
        # reads PLAIN and LOGIN and hands the pair to its authenticator hook.
        init_session(self, handler, authenticator=self._take_credentials, **kwargs)
        self._server = server
        self._listener = listener
        self._offered: LoginPassword | None = None  # what the client sent in AUTH
        self._greeted = False  # the 220 banner went out
        self._client: tuple[str, int] | None = None  # the client a PROXY header named
        self._lost = False  # connection_lost ran
        self._input_ended = False  # the client closed its side after the banner
        self._refusal: str | None = None
        self._busy = False  # a command is being handled
        self._reading_data = False  # between DATA and the final dot
        self._command = ""  # the command being handled
        self._closing = False  # our last reply is out; input is read and discarded
        self._linger: asyncio.TimerHandle | None = None
        self._unknown_left = MAX_UNKNOWN_COMMANDS
        self._junk_left = MAX_JUNK_COMMANDS  # until the next DATA
        self._unsent: list[str] = []  # the first lines of a multi-line reply, not yet written
        self._rate: DataRate | None = None  # while reading DATA, when a minimum rate is set
        self._rate_timer: deadlines.Deadline | None = None
        self._idle: deadlines.Deadline | None = None
        # aiosmtpd keeps these on the class and adds 26 to MAIL's limit on every EHLO, for all
        # sessions: keep ours per session.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        # Every command passes the drain gate: one place, not one override per command.
        self._smtp_methods = _Commands(self._smtp_methods, self._gated, self._unknown)
        if "DATA" in self._handle_hooks:
            self._handle_hooks["DATA"] = self._untimed(self._handle_hooks["DATA"])
        if "EHLO" in self._handle_hooks and not self.offers_auth:
            self._handle_hooks["EHLO"] = _without_auth(self._handle_hooks["EHLO"])
        self._gate = server.gates.new()  # the per-client limits, in front of MAIL and RCPT
        self._gate.guard(self._handle_hooks, handler.accepted_already)

    @property
    def offers_auth(self) -> bool:
        """Submission listeners do (under TLS only: aiosmtpd's `auth_require_tls`)."""
        return (
            self._listener.profile is ListenerProfile.SUBMISSION and self._server.auth is not None
        )

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:  # private in aiosmtpd
        # Our RFC 5321 reading replaces aiosmtpd's RFC 5322 one (inbound/syntax.py): a path we
        # cannot read is refused here (553, or 501 for VRFY) and never reaches a relay.
        if self._command == "VRFY":
            return parse_vrfy(arg), ""
        if self._command == "RCPT":  # also takes <Postmaster>, completed by the handler
            return parse_forward_path(arg) or (None, None)
        return parse_path(arg) or (None, None)

    # The reply to the parameters _getparams refused, for aiosmtpd's 501 that follows at once.
    _params_refusal: str | None = None

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        # Private in aiosmtpd, which calls it for MAIL and RCPT alone (with params upper-cased).
        # RFC 5321 §4.1.2's grammar, not aiosmtpd's isalnum() (which made X-FOO=1 a 501, not
        # an unknown parameter's 555), and a keyword given twice refused, not the last one
        # taken. On None aiosmtpd answers its syntax 501, which _rewrite replaces.
        try:
            return parse_params(params)
        except RepeatedParameter as exc:
            self._params_refusal = replies.REPEATED_PARAMETER.format(keyword=exc.keyword)
            return None

    # -- lifecycle -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiosmtpd calls this again once TLS is up (STARTTLS, implicit TLS) with the TLS
        # transport: a fresh session (RFC 3207 §4.2) and the plaintext read so far thrown away
        # (§6: commands pipelined after STARTTLS). The connection was admitted the first time.
        upgraded = self._original_transport is not None
        if not upgraded:
            self._refusal = self._server.register(self)
        super().connection_made(transport)
        if upgraded and self._client is not None and self.session is not None:
            # The fresh session is still the proxied client's. (aiosmtpd types peer as a str but
            # stores the transport's peername tuple, as we do.)
            self.session.peer = self._client  # type: ignore[assignment]
        if not upgraded and self._handler_coroutine is not None:
            self._handler_coroutine.add_done_callback(_retrieve)

    def connection_lost(self, error: Exception | None) -> None:
        if self._lost:
            return  # after a failed TLS handshake we call it ourselves (asyncio does not)
        self._lost = True
        if self._linger is not None:
            self._linger.cancel()
        self._stop_rate()
        super().connection_lost(error)
        self._server.unregister(self)
        self._server.gates.release(self._gate)
        task = self._handler_coroutine
        if task is None or task.done():
            self._let_go()
        else:  # aiosmtpd has just cancelled it: it ends in a later turn
            task.add_done_callback(lambda _: self._let_go())

    def _let_go(self) -> None:
        """Break the cycles a finished session is made of, so it is freed as soon as the last
        reference goes instead of by the cycle collector: its command tables and hooks hold
        its own bound methods and closures, its writer and its task's frame point back at it.
        Left to the collector, every session of a new connection per message survived into
        the oldest generation, and each full collection (about 20,000 objects, 35-50 ms on a
        busy node) stalled every session of the node at once."""
        self._smtp_methods = {}
        self._handle_hooks = {}
        self._auth_methods = {}
        self._authenticator = None
        self._auth_callback = None
        self._client_connected_cb = None
        self._writer = None  # type: ignore[assignment]  # aiosmtpd types it as always set
        self._handler_coroutine = None
        # The idle and rate deadlines hold bound methods of this session (cancelled by now).
        self._idle = self._rate_timer = self._timeout_handle = None

    def eof_received(self) -> bool | None:
        if self._lost:
            return False  # a late EOF of a TLS session's plain transport: nothing left to end
        if self._closing and self.transport is not None:
            self.transport.close()  # the client read our last word and left: done lingering
            return False
        if self._greeted and self.session is not None and self.session.ssl is None:
            # A client may send its last commands, QUIT the last, and close its side at once
            # (`printf ... | nc -N`, a script's pipe): each is answered, as Postfix does. The
            # command loop reads to the end of the input, then closes (`handle_exception`).
            # aiosmtpd cancelled the session instead: a message whose final dot had arrived
            # was queued with its 250 never sent, and the messages behind it were dropped.
            self._input_ended = True
            return asyncio.StreamReaderProtocol.eof_received(self)  # keeps our side open
        # Before the banner (a load balancer's TCP check, a scanner), or under TLS (asyncio
        # closes a TLS connection at end-of-file): aiosmtpd cancels the session's task and
        # keeps the connection half open, which its task closes only when cancelled inside
        # the command loop. Nothing closed a connection cancelled before the banner, while
        # its place was counted or the banner went: each such check kept a descriptor, a
        # session and the client's cluster-wide place for good. So close it here (asyncio
        # flushes what we wrote).
        super().eof_received()
        return False

    async def handle_exception(self, error: Exception) -> str:
        if self._input_ended and isinstance(error, asyncio.IncompleteReadError):
            # The client's input ended; whatever it sent in full has been answered. A command
            # or a message cut off by the end is not: a message without its final dot is not
            # queued. aiosmtpd's loop would read the end again and again, so leave it.
            log.info("%r closed its side; session ended", self._peer())
            self._closing = True  # nothing more is said, not even aiosmtpd's reply to this
            if self.transport is not None:
                self.transport.close()
            raise _InputEnded
        return await super().handle_exception(error)

    async def _handle_client(self) -> None:  # private in aiosmtpd: the session's main loop
        if self.transport is None or self.transport.is_closing():
            return  # told to leave before the greeting
        if not await self._before_greeting():
            self._close_before_greeting()
            return
        refusal = self._refusal or (replies.SHUTTING_DOWN if self._server.draining else None)
        if refusal is None:  # admitted by this node: now the client's own limit
            refusal = await self._gate.admit(self._client_ip())
        if refusal is not None:
            with contextlib.suppress(ConnectionError):
                await self.push(refusal)
            return
        self._greeted = True
        with contextlib.suppress(_InputEnded):
            await super()._handle_client()

    def _close_before_greeting(self) -> None:
        if self._original_transport is None:
            if self.transport is not None:
                self.transport.close()
            return
        # A TLS handshake was cut short: asyncio will not tell the session, so we do.
        self._original_transport.close()
        self.connection_lost(None)

    async def _before_greeting(self) -> bool:
        """What a listener needs before its banner: a PROXY header, then implicit TLS."""
        if not (self._listener.proxy_protocol or self._listener.implicit_tls):
            return True  # the usual case: no bound to arm
        if self._listener.proxy_protocol and not self._from_trusted_proxy():
            return False
        try:
            async with asyncio.timeout(self._server.pre_greeting_timeout_s):
                if self._listener.proxy_protocol and not await self._read_proxy_header():
                    return False
                return not self._listener.implicit_tls or await self._start_tls(implicit=True)
        except TimeoutError:
            log.info("%r: nothing usable before the greeting timeout", self._peer())
            if self._listener.proxy_protocol and self.session and not self.session.proxy_data:
                self._server.metrics.proxy_headers.labels("invalid").inc()
            else:
                self._handshake("failed", None)
            return False

    # -- PROXY protocol --------------------------------------------------------------------

    def _from_trusted_proxy(self) -> bool:
        """Only a trusted proxy may name the client; anyone else is closed without a word."""
        peer = self.session.peer if self.session is not None else None
        address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if in_networks(address, self._server.trusted_proxies):
            return True
        log.warning("%s: not a trusted proxy, closed before the banner", address)
        self._server.metrics.proxy_headers.labels("untrusted").inc()
        return False

    async def _read_proxy_header(self) -> bool:
        """A v1 or v2 header (aiosmtpd's parser); its client becomes this session's peer."""
        assert self.session is not None
        try:
            data = await get_proxy(self._reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            data = None
        if not data or not well_formed(data):  # ProxyData is false when invalid
            log.info("%r: no valid PROXY header, closed", self._peer())
            self._server.metrics.proxy_headers.labels("invalid").inc()
            return False
        self.session.proxy_data = data
        self._client = client_of(data)
        if self._client is None:  # the proxy's own check (v2 LOCAL, v1 UNKNOWN)
            self._server.metrics.proxy_headers.labels("local").inc()
            return True
        log.debug("%r: PROXY header names %r", self._peer(), self._client)
        self.session.peer = self._client  # type: ignore[assignment]
        self._server.metrics.proxy_headers.labels("ok").inc()
        return True

    def _peer(self) -> object:
        return self.session.peer if self.session else None

    # -- AUTH (RFC 4954) -------------------------------------------------------------------

    @syntax("AUTH <mechanism>", when="offers_auth")  # HELP lists it where it is offered
    async def smtp_AUTH(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd's name
        """PLAIN and LOGIN on submission listeners, under TLS only, within the failure limit."""
        auth = self._server.auth
        if auth is None or not self.offers_auth:
            await self.push(replies.AUTH_NOT_OFFERED)
        elif self._tls_protocol is None:
            # RFC 4954 §4: a password never crosses in clear. Answered before anything more is
            # read, so an initial response sent anyway is never decoded.
            self._count_auth("in_clear")
            await self.push(replies.ENCRYPTION_REQUIRED)
        elif await auth.blocked(self._client_ip()):
            self._count_auth(AuthCheck.BLOCKED)
            await self.push(replies.AUTH_TOO_MANY_FAILURES)  # 421: and close
        else:
            await self._auth_exchange(auth, _upper_mechanism(arg or ""))

    async def _auth_exchange(self, auth: Authenticator, arg: str) -> None:
        self._offered = None
        # aiosmtpd checks EHLO, reads the mechanism's exchange and answers what is malformed
        # (501, 503, 504); a user name and password reach _take_credentials, unanswered.
        # RFC 4954 §4: a response line may be 12,288 octets; the reader's limit is a data
        # line's (1,001), and a longer response ended the session with a traceback.
        reader: Any = self._reader
        limit, reader._limit = reader._limit, AUTH_LINE_LIMIT
        try:
            await super().smtp_AUTH(arg)
        except ValueError as exc:
            if not str(exc).startswith("Separator"):  # the reader's: a line over the limit
                raise
            self._offered = None
            self._count_auth("malformed")
            await self.push(replies.AUTH_LINE_TOO_LONG)
            return
        finally:
            reader._limit = limit
        offered, self._offered = self._offered, None
        if offered is None:
            self._count_auth("malformed")
            return
        result = await auth.check(self._client_ip(), offered.login, offered.password)
        self._count_auth(result)
        if result is AuthCheck.OK and self.session is not None:
            self.session.authenticated = True  # may relay; Received says ESMTPSA
            # The user is the message's tenant for routing rules (handler.tenant_of).
            self.session.auth_data = offered.login.decode("utf-8", "replace")
        await self.push(_AUTH_REPLIES[result])

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:  # noqa: N802 - aiosmtpd's
        """RFC 4616 PLAIN, as aiosmtpd reads it but for the authorization identity, which
        aiosmtpd drops (see `plain_credentials`), and `=`, an empty initial response."""
        response = await self._plain_response(args)
        if response is None:
            return AuthResult(success=False)  # answered
        credentials = plain_credentials(response)
        if isinstance(credentials, str):
            await self.push(credentials)
            return AuthResult(success=False)
        return self._authenticate("PLAIN", LoginPassword(*credentials))

    async def _plain_response(self, args: list[str]) -> bytes | None:
        """The client's response, decoded; None once its refusal is answered."""
        if len(args) == 1:
            challenged = await self.challenge_auth("")  # it answers `*` and bad base64 itself
            return None if isinstance(challenged, _Missing) else challenged
        response = initial_response(args[1])
        if response is None:
            await self.push(replies.AUTH_BAD_BASE64)
        return response

    def _take_credentials(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: object
    ) -> AuthResult:
        """aiosmtpd's authenticator hook. It is synchronous and argon2 is slow: keep the pair
        for `_auth_exchange` to verify in a thread, and let aiosmtpd say nothing."""
        self._offered = data if isinstance(data, LoginPassword) else None
        return AuthResult(success=False, handled=True)

    def _client_ip(self) -> str:
        """The client's address (the PROXY header's, when there is one); an IPv4 client on a
        dual-stack listener counts as its IPv4 address."""
        peer = self.session.peer if self.session is not None else None
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        return _unmapped(address)

    def _count_auth(self, result: str) -> None:
        self._server.metrics.auth.labels(str(result)).inc()

    # -- TLS -------------------------------------------------------------------------------

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd's name
        """RFC 3207: aiosmtpd's, plus a failed handshake that is counted and ends quietly."""
        if arg:
            await self.push("501 Syntax: STARTTLS")
        elif self._tls_protocol is not None:
            await self.push(replies.TLS_ACTIVE)
        elif not self.tls_context:
            await self.push(replies.TLS_NOT_OFFERED)
        else:
            await self.push(replies.TLS_READY)
            await self._start_tls()

    async def _start_tls(self, *, implicit: bool = False) -> bool:
        """Run the server side of a TLS handshake on this connection (aiosmtpd's STARTTLS).

        On success aiosmtpd's `connection_made` runs again with the TLS transport. On failure
        asyncio never tells the session that the connection is gone, so we do.
        """
        assert self.tls_context is not None
        assert self.transport is not None
        self._original_transport = self.transport
        reader: Any = self._reader
        if implicit and reader._buffer:
            # The client's first handshake bytes, read before the TLS layer took over: with
            # the connection, or in the packet of the PROXY header. Dropped, the handshake
            # never ended (most of a burst of port-465 clients, every proxied one).
            _hand_to_tls(self.loop, self.transport, bytes(reader._buffer))
        reader._buffer.clear()  # RFC 3207 §6: plaintext pipelined after STARTTLS is dropped
        try:
            # The loop's own TLS (uvloop's is compiled): asyncio's SSLProtocol, which aiosmtpd
            # uses, handles every record in Python and cost 2.5 ms of CPU per connection.
            upgraded = await self.loop.start_tls(
                cast(asyncio.Transport, self.transport),
                self,
                self.tls_context,
                server_side=True,
                ssl_handshake_timeout=tls.HANDSHAKE_TIMEOUT_S,
            )
        except (OSError, EOFError, TimeoutError) as exc:  # ssl.SSLError, a reset, a timeout
            self._handshake("failed", None)
            log.info("%r TLS handshake failed: %s", self._peer(), exc)
            self.connection_lost(exc)
            return False
        if upgraded is None:  # the client left during the handshake
            self.connection_lost(None)
            return False
        self._tls_protocol = _TlsInfo(upgraded)  # type: ignore[assignment]  # read for _extra only
        ssl_object = upgraded.get_extra_info("ssl_object")
        self._handshake("ok", ssl_object.version() if ssl_object is not None else None)
        # What asyncio's SSLProtocol does once the handshake is done, and start_tls does not:
        # the session starts over on the TLS transport (aiosmtpd's connection_made). That
        # clears the reader, which by now may hold the client's first command under TLS.
        under_tls = bytes(reader._buffer)
        self.connection_made(upgraded)
        reader._buffer.extend(under_tls)
        return True

    def _handshake(self, result: str, version: str | None) -> None:
        self._server.metrics.tls.labels("inbound", result, tls_version(version)).inc()

    @property
    def handler_task(self) -> asyncio.Task[None] | None:
        return self._handler_coroutine

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def abort(self) -> None:
        if self.transport is not None:
            cast(asyncio.Transport, self.transport).abort()

    # -- replies ---------------------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        if self._closing:
            return  # our last reply is out; what the client still sends gets no answer
        if isinstance(status, bytes):  # only AUTH challenges ("334 ...")
            await super().push(self._take_unsent(b"\r\n") + status)
            return
        reply = self._rewrite(status)
        self._count(reply)
        if reply[3:4] == "-" or self._more_pipelined(reply):
            # A multi-line reply (EHLO's ten lines) leaves in one write, not one per line;
            # so do the replies to a pipelined group (below).
            self._unsent.append(reply)
            return
        if self._unsent:
            reply = "\r\n".join((*self._unsent, reply))
            self._unsent.clear()
        await super().push(reply)
        if int(reply[:3]) == replies.CLOSING_CODE:  # RFC 5321 §3.8: 421 means we close
            self._close()

    def _more_pipelined(self, reply: str) -> bool:
        """RFC 2920 §3.2: with the client's next command read already, the reply to MAIL, RCPT
        or RSET waits for that command's reply and they leave in one write: a sending MTA's
        MAIL, RCPTs and DATA get one segment back, not one per command. Never a 421, never the
        reply to DATA, STARTTLS, AUTH, QUIT or the message, which the client waits for; the
        next command always answers (or closes, and `_say_and_close` writes what waits)."""
        return (
            self._command in _PIPELINED_MIDWAY
            and int(reply[:3]) != replies.CLOSING_CODE
            and b"\n" in cast(Any, self._reader)._buffer  # a whole line read, not yet taken
        )

    def _take_unsent(self, end: bytes) -> bytes:
        """What push held back, to go out ahead of what is written now."""
        if not self._unsent:
            return b""
        text = "\r\n".join(self._unsent).encode("ascii") + end
        self._unsent.clear()
        return text

    def _count(self, reply: str) -> None:
        if reply[3:4] != "-":  # a multi-line reply counts once, at its last line
            metrics = self._server.metrics
            metrics.child(metrics.replies, reply_class(reply)).inc()

    def _say_and_close(self, reply: str) -> None:
        """An unsolicited reply (RFC 5321 §3.8: 421 before closing), written without waiting."""
        if self.transport is not None and not self.transport.is_closing():
            self._count(reply)
            self._writer.write(self._take_unsent(b"\r\n") + reply.encode("ascii") + b"\r\n")
        self._close()

    def _close(self) -> None:
        """Close after a lingering read: FIN now, the socket once the client leaves, or at
        the end of the linger."""
        transport = cast(asyncio.Transport | None, self.transport)
        if transport is None or transport.is_closing() or self._closing:
            return
        self._closing = True
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()  # TLS: close_notify, then the socket
        self._linger = asyncio.get_running_loop().call_later(LINGER_S, _end, transport)

    def _rewrite(self, reply: str) -> str:
        if self._params_refusal is not None:  # what _getparams found wrong, said instead
            said, self._params_refusal = self._params_refusal, None
            if reply.startswith("501 "):
                return said
        if reply == _MALFORMED:  # aiosmtpd says it for MAIL and RCPT alike
            return replies.BAD_SENDER if self._command == "MAIL" else replies.BAD_ADDRESS
        return rewrite(reply)

    async def _unknown(self, command: str, arg: str | None) -> None:
        """Any command we do not know; after MAX_UNKNOWN_COMMANDS, 421 and a lingering close.

        aiosmtpd's own limit answers 502 and closes at once, so pipelined input makes the
        kernel reset the connection over the reply.
        """
        if self._closing:
            return
        self._unknown_left -= 1
        # Not the command itself: it may be a LOGIN user name or password sent out of turn.
        log.info("%r unknown command", self.session.peer if self.session else None)
        await self.push(
            replies.UNKNOWN_COMMAND if self._unknown_left > 0 else replies.TOO_MANY_UNKNOWN
        )

    # -- drain -----------------------------------------------------------------------------

    async def _gated(self, command: str, method: Command, arg: str | None) -> None:
        """Every command passes here: the drain gate, and what the session is doing."""
        if self.transport is None or self.transport.is_closing() or self._closing:
            return  # aiosmtpd would go on with commands already buffered: run none
        if self._server.draining and not self.in_transaction and command != "QUIT":
            await self.push(replies.SHUTTING_DOWN)
            return
        if command in JUNK_COMMANDS:
            self._junk_left -= 1
            if self._junk_left < 0:
                await self.push(replies.TOO_MANY_JUNK)
                return
        elif command == "DATA":
            self._junk_left = MAX_JUNK_COMMANDS
        self._busy, self._reading_data = True, command == "DATA"
        self._command = command
        try:
            await method(arg)
        finally:
            self._busy = self._reading_data = False
        self.leave_if_draining()

    def leave_if_draining(self) -> None:
        """A draining session that is between transactions hears 421 now.

        Waiting for the client's next command could take until the idle timeout; a client that
        sends one anyway reads this 421 as its reply, which is what it would have got.
        """
        if self._server.draining and not self._busy and not self.in_transaction:
            self._say_and_close(replies.SHUTTING_DOWN)

    # -- DATA ------------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd's command name
        """DATA, read into one buffer that the node-wide byte budget pays for.

        Replaces aiosmtpd 1.4.6's, which keeps each line as its own object (about twice the
        message in memory) and then joins them (a third copy), and has no shared limit. The
        protocol is the same: only CRLF.CRLF ends DATA (RFC 5321 §4.1.1.4), dot-stuffing is
        undone (§4.5.2), and a refusal is answered only after the final dot (§4.2.5).
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(replies.NO_RECIPIENTS)
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        budget = self._server.budget
        if budget.available < max(1, _declared_size(self.envelope.mail_options)):
            budget.refusals += 1
            await self.push(replies.NO_ROOM)  # tell now, before the client sends it all
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reading = MessageData(budget, self.data_size_limit or 0)
        self._start_rate()
        try:
            await reading.read(self._reader)
            self._stop_rate()
            await self._finish_data(reading)
        finally:
            self._stop_rate()
            reading.release()
        self._set_post_data_state()  # type: ignore[no-untyped-call]

    async def _finish_data(self, reading: MessageData) -> None:
        assert self.envelope is not None
        if self._closing:
            return  # told 421 during DATA (too slow): a final dot after that queues nothing
        if reading.refusal is not None:
            await self.push(reading.refusal)
            return
        if reading.folded:
            self._server.metrics.lines_folded.inc(reading.folded)
        self.envelope.original_content = reading.take()
        status = await self._call_handler_hook("DATA")
        await self.push(replies.OK if status is MISSING else status)

    # -- idle timer ------------------------------------------------------------------------

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels a loop timer and arms a new one at every command; a deadline that
        # moves later is one store (deadlines.py), and it fires at most a tick late.
        duration_s = duration or self._timeout_duration
        if self._idle is None:
            self._idle = deadlines.call_later(duration_s, self._timeout_cb)
            self._timeout_handle = self._idle  # type: ignore[assignment]  # what aiosmtpd cancels
        else:
            self._idle.reset(self.loop.time() + duration_s)

    def data_received(self, data: bytes) -> None:
        # aiosmtpd resets the idle timer only when a command arrives, so a large message on a
        # slow link would be cut off mid-DATA. RFC 5321 §4.5.3.2.5 times each block instead.
        if self._reading_data:
            self._reset_timeout()
        if self._rate is not None:
            self._rate.add(self.loop.time(), len(data))
        super().data_received(data)

    # -- minimum data rate -----------------------------------------------------------------

    def _start_rate(self) -> None:
        min_bps, window_s = self._server.min_data_rate
        if min_bps:
            self._rate = DataRate(min_bps, window_s, self.loop.time())
            self._rate_timer = deadlines.call_later(RATE_CHECK_S, self._check_rate)

    def _stop_rate(self) -> None:
        self._rate = None
        if self._rate_timer is not None:
            self._rate_timer.cancel()
            self._rate_timer = None

    def _check_rate(self) -> None:
        """A client sending DATA slower than the minimum hears 421 4.4.2 and is closed: it
        would hold a session, and its share of the node's byte budget, for as long as it likes.
        """
        if self._rate is None:
            return
        if not self._rate.too_slow(self.loop.time()):
            self._rate_timer = deadlines.call_later(RATE_CHECK_S, self._check_rate)
            return
        self._stop_rate()
        self._server.gates.refused(Limit.DATA_RATE, self._client_ip())
        self._say_and_close(replies.DATA_TOO_SLOW)

    def _untimed(self, hook: Callable[..., Awaitable[str]]) -> Callable[..., Awaitable[str]]:
        async def untimed(*args: Any) -> str:
            # The handler bounds its own wait (accept_timeout_s); the idle timer must not cancel
            # an enqueue in flight and leave the client without any reply.
            self._reading_data = False
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            try:
                return await hook(*args)
            finally:
                if self.transport is not None:  # not after connection_lost cancelled it
                    self._reset_timeout()

        return untimed

    def _timeout_cb(self) -> None:  # private in aiosmtpd, which closes without a word
        log.info("%r idle timeout", self.session.peer if self.session else None)
        if not self._greeted:
            self.abort()  # nothing was said yet: a 421 would be noise before a TLS handshake
            return
        self._say_and_close(replies.TIMEOUT)


# What each verdict of `Authenticator.check` is answered with.
_AUTH_REPLIES: Final = {
    AuthCheck.OK: replies.AUTH_OK,
    AuthCheck.INVALID: replies.AUTH_INVALID,
    AuthCheck.BLOCKED: replies.AUTH_TOO_MANY_FAILURES,
}


def _upper_mechanism(arg: str) -> str:
    """SASL mechanism names are upper case (RFC 4422 §3.1); clients that write `auth plain`
    are common and Postfix takes them. aiosmtpd looks the name up as it came."""
    mechanism, space, rest = arg.strip().partition(" ")
    return f"{mechanism.upper()}{space}{rest}"


def _without_auth(hook: Callable[..., Awaitable[list[str]]]) -> Callable[..., Awaitable[list[str]]]:
    """The EHLO hook, with aiosmtpd's AUTH extension line left out."""

    async def ehlo(*args: Any) -> list[str]:
        return [line for line in await hook(*args) if not line.startswith("250-AUTH")]

    return ehlo


def _declared_size(mail_options: list[str]) -> int:
    """The SIZE= of MAIL FROM (RFC 1870), 0 when none was given."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


class _TlsInfo:
    """What aiosmtpd reads from its TLS protocol object: `_extra`, the handshake's results
    (the session's `ssl`, from which the Received line names version and cipher)."""

    __slots__ = ("_extra",)

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._extra = {
            name: transport.get_extra_info(name)
            for name in ("peercert", "cipher", "compression", "ssl_object")
        }


class _Gated:
    """A command on its way through the session's gate; aiosmtpd's syntax attributes (which
    HELP reads) come from the command itself."""

    __slots__ = ("_command", "_gate", "_method")

    def __init__(self, gate: Gate, command: str, method: Command) -> None:
        self._gate, self._command, self._method = gate, command, method

    def __call__(self, arg: str | None) -> Awaitable[None]:
        return self._gate(self._command, self._method, arg)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)


class _Commands(dict[str, Command]):
    """aiosmtpd's command table: every command it holds is gated, one object per call (not a
    closure per command per session), and our handler answers every command it does not hold.
    """

    def __init__(
        self,
        known: dict[str, Command],
        gate: Gate,
        unknown: Callable[[str, str | None], Awaitable[None]],
    ) -> None:
        super().__init__(known)
        self._gate = gate
        self._unknown = unknown

    def get(self, command: str, default: Command | None = None) -> Command:  # type: ignore[override]
        known = super().get(command)
        if known is None:
            return functools.partial(self._unknown, command)
        return _Gated(self._gate, command, known)


def load_files(
    config: InboundConfig, auth_failures: FailureCounter | None = None
) -> tuple[Reloading[ssl.SSLContext] | None, Authenticator | None]:
    """The certificate and the users file, as a node starts with them (`config check` too):
    a file that cannot be used is a ConfigError naming the key and the file."""
    try:
        certificates = tls.certificates(config.tls)
    except TicketKeyError as exc:  # names its file already
        raise ConfigError(f"inbound.tls: {exc}") from None
    except tls.CertificateError as exc:  # says what is wrong, naming the files
        raise ConfigError(f"inbound.tls: {exc}") from None
    except OSError as exc:  # a file that is not there: found before anything is loaded
        assert config.tls is not None
        why = describe_pair_failure(config.tls.cert_file, config.tls.key_file, exc)
        raise ConfigError(f"inbound.tls: {why}") from None
    try:
        auth = Authenticator.from_config(config.auth, auth_failures)
    except (OSError, ValueError) as exc:  # the message names the file and line, no content
        raise ConfigError(f"inbound.auth.users_file: {exc}") from None
    return certificates, auth


class InboundServer:
    def __init__(
        self,
        config: InboundConfig,
        handler: InboundHandler,
        hostname: str,
        metrics: Metrics,
        auth_failures: FailureCounter | None = None,
        client_counter: ClientCounter | None = None,
    ) -> None:
        self.metrics = metrics
        # Per-client limits: the cluster's count when given, else this node's own.
        self.gates = ClientGates(
            config.limits,
            client_counter or LocalClientCounter(now_ms),
            networks(config.relay_networks),
            metrics,
        )
        self.min_data_rate = (config.min_data_rate_bps, config.data_rate_window_s)
        self.auth: Authenticator | None = None  # loaded by start()
        self._auth_failures = auth_failures  # default: this node's own count
        self.budget = ByteBudget(config.max_receiving_bytes)
        self.certificates: Reloading[ssl.SSLContext] | None = None  # loaded by start()
        self.pre_greeting_timeout_s = config.proxy_timeout_s
        self.trusted_proxies = networks(config.trusted_proxies)
        self._config = config
        self._handler = handler
        self._hostname = hostname
        self._sessions: set[InboundSMTP] = set()  # admitted
        self._refused: set[InboundSMTP] = set()  # being told 421
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    def _protocol(self, listener: ListenerConfig) -> InboundSMTP:
        # The context current now: a renewed certificate is used from the next session on.
        context = self.certificates.get() if self.certificates is not None else None
        return InboundSMTP(
            self,
            self._handler,
            listener,
            tls_context=context,
            require_starttls=listener.require_tls,
            # RFC 6409 §4.3: a submission server takes mail from authenticated clients only.
            auth_required=listener.profile is ListenerProfile.SUBMISSION,
            auth_require_tls=True,
            hostname=self._hostname,
            ident=IDENT,
            data_size_limit=self._config.max_message_bytes,  # also advertised as SIZE in EHLO
            timeout=self._config.idle_timeout_s,
            decode_data=False,
        )

    async def start(self) -> None:
        """Bind every listener, in order; SO_REUSEPORT lets worker processes share a port."""
        loop = asyncio.get_running_loop()
        redact.install()
        self._load_files()
        try:
            for listener in self._config.all_listeners():
                host, port = listener.hostport
                server = await loop.create_server(
                    functools.partial(self._protocol, listener),
                    host,
                    port,
                    reuse_address=True,
                    reuse_port=True,
                    backlog=LISTEN_BACKLOG,
                )
                self._servers.append(server)
        except BaseException:
            await self.close()
            raise

    def _load_files(self) -> None:
        self.certificates, self.auth = load_files(self._config, self._auth_failures)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) pairs: the real port where the config said 0."""
        bound = []
        for server in self._servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                bound.append((str(host), int(port)))
        return bound

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    def register(self, session: InboundSMTP) -> str | None:
        """Admit a new connection, or say why not (the reply it gets before we close)."""
        self._idle.clear()
        if self.draining:
            refusal, result = replies.SHUTTING_DOWN, "refused_draining"
        elif len(self._sessions) >= self._config.max_sessions:
            refusal, result = replies.TOO_MANY_SESSIONS, "refused_capacity"
        else:
            refusal, result = None, "accepted"
        self.metrics.child(self.metrics.sessions, result).inc()
        (self._sessions if refusal is None else self._refused).add(session)
        return refusal

    def unregister(self, session: InboundSMTP) -> None:
        self._sessions.discard(session)
        self._refused.discard(session)
        if not self._sessions and not self._refused:
            self._idle.set()

    def start_draining(self) -> None:
        """New sessions and idle ones hear 421 now; busy ones after their transaction.

        The listeners stay open until close(), so a client that still reaches this node (the
        load balancer has not noticed yet) gets a clear 421 rather than a refused connection.
        """
        self.draining = True
        for session in list(self._sessions):
            session.leave_if_draining()
        log.info("inbound draining: %d sessions open", len(self._sessions))

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once every session has ended, False if some outlived the timeout."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        return self._idle.is_set()

    async def close(self) -> None:
        """Stop listening, cut every session, and wait for their tasks to unwind."""
        for server in self._servers:
            server.close()
        sessions = [*self._sessions, *self._refused]
        for session in sessions:
            session.abort()
        tasks = [t for s in sessions if (t := s.handler_task) is not None and not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
        await self.gates.close()
        await self._handler.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
