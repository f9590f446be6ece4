"""A recording SMTP relay on loopback with declarative faults.

Used as the demo relays of `smtpfleet dev`, by the tests, and by the failure drills. It is a
real aiosmtpd server in the caller's event loop (port 0 by default); faults can be changed
while it runs, so a test can turn a relay bad and good again mid-load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = ["Faults", "ReceivedMessage", "Sink"]

log = logging.getLogger(__name__)

OK_RCPT = "250 2.1.5 Ok"
OK_DATA = "250 2.0.0 Ok: stored"
CLOSING = "421 4.3.2 Service shutting down"
DATA_SIZE_LIMIT = 100 * 1024 * 1024  # above any sane max_message_bytes; advertised as SIZE
IDLE_TIMEOUT_S = 60.0  # aiosmtpd closes sessions idle this long (real relays: 300 s)
BLACKHOLE_POLL_S = 0.05
WAIT_POLL_S = 0.01
STOP_WAIT_S = 2.0


@dataclass(frozen=True)
class ReceivedMessage:
    sender: str  # "" for the null reverse-path <>
    recipients: tuple[str, ...]
    data: bytes  # as received: CRLF line endings, dot-stuffing undone
    peer: str  # "host:port" of the client; one port per session, so it shows connection reuse
    at: float  # time.monotonic()
    tls_version: str | None = None  # e.g. "TLSv1.3" when the session ran STARTTLS; None: plain
    login: str | None = None  # the AUTH user of the session, when it authenticated


@dataclass
class Faults:
    """What the sink does wrong. Mutable: changes apply to the next reply of every session."""

    banner: str | None = None  # e.g. "421 4.3.2 busy": greet with this, then close
    mail_reply: str | None = None  # e.g. "550 5.7.1 sender refused": the reply to every MAIL
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # recipient -> reply line
    data_replies: list[str] = field(default_factory=list)  # for the final dot, one per message
    delay_s: float = 0.0  # before every reply except the greeting: a slow relay
    blackhole: bool = False  # say nothing while set: no greeting, open sessions go silent
    close_after_data: bool = False  # reply to the final dot, then drop the session
    lose_data_reply: bool = False  # store the message, then drop the session unanswered
    silence_after_data: bool = False  # store the message, then go silent (blackhole) unanswered
    # Drop the session instead of replying, at this chance per reply after the greeting: a
    # relay that dies mid-transaction, anywhere (after storing a message, its reply is lost).
    drop_chance: float = 0.0
    # Answer `421` and close instead of the reply, at this chance per reply after the
    # greeting: a relay shutting down mid-session (RFC 5321 §3.8). At the final dot the
    # message is then not stored.
    closing_chance: float = 0.0
    draws: random.Random = field(default_factory=random.Random)

    def drop_now(self) -> bool:
        return self.drop_chance > 0 and self.draws.random() < self.drop_chance

    def closing_now(self) -> bool:
        return self.closing_chance > 0 and self.draws.random() < self.closing_chance

    def rcpt_reply(self, recipient: str) -> str | None:
        lowered = recipient.lower()
        for address, reply in self.rcpt_replies.items():
            if address.lower() == lowered:
                return reply
        return None

    def next_data_reply(self) -> str | None:
        return self.data_replies.pop(0) if self.data_replies else None


def _accepted(reply: str) -> bool:
    return reply.startswith("2")


class _Recorder:
    """aiosmtpd handler: applies the RCPT and DATA faults and records every attempt."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # with this hook in place, aiosmtpd leaves it to us
        if self._sink.pipelining:
            # aiosmtpd reads commands line by line, so a pipelined group just works (RFC 2920);
            # it only never says so.
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._sink.faults.mail_reply or "250 2.1.0 Ok"
        if _accepted(reply):
            envelope.mail_from = address  # with a hook in place aiosmtpd leaves it to us
            envelope.mail_options.extend(options)
        return reply

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._sink.faults.rcpt_reply(address) or OK_RCPT
        if _accepted(reply):
            # With a hook in place aiosmtpd leaves the envelope to us.
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        else:
            self._sink.refused_recipients.append(address)
        return reply

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        message = ReceivedMessage(
            sender="" if envelope.mail_from in (None, "<>") else str(envelope.mail_from),
            recipients=tuple(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            peer=_peer(session.peer),
            at=time.monotonic(),
            tls_version=_tls_version(session),
            login=_login(session),
        )
        reply = self._sink.faults.next_data_reply() or OK_DATA
        if isinstance(server, _FaultySMTP):
            server.final_reply = True
            if self._sink.faults.closing_now():
                server.close_after_reply = True
                reply = CLOSING
        if _accepted(reply):
            self._sink._record(message)
            if self._sink.faults.lose_data_reply and isinstance(server, _FaultySMTP):
                server.drop_next_reply = True
            if self._sink.faults.silence_after_data:
                self._sink.faults.blackhole = True
        else:
            # Kept apart so a test can tell "the relay saw it and refused" from "never arrived".
            self._sink.rejected.append(message)
        return reply


def _tls_version(session: Session) -> str | None:
    ssl_object = (session.ssl or {}).get("ssl_object")
    return ssl_object.version() if isinstance(ssl_object, ssl.SSLObject) else None


def _login(session: Session) -> str | None:
    data = session.auth_data
    return data.login.decode() if isinstance(data, LoginPassword) else None


def _peer(peer: Any) -> str:
    if not isinstance(peer, tuple) or len(peer) < 2:
        return str(peer or "")
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class _FaultySMTP(SMTP):
    """aiosmtpd's SMTP with the session-level faults (greeting, silence, delay, drop)."""

    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        super().__init__(_Recorder(sink), **kwargs)
        self._sink = sink
        self._greeted = False
        self._mid_reply = False  # the last line pushed was "NNN-...", more lines follow
        self.drop_next_reply = False
        self.final_reply = False  # the next reply answers a final dot
        self.close_after_reply = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sink._session_opened(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._sink._session_closed(self)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session's task and keeps the connection half open; a client
        # gone before the banner (or while a blackhole holds it) was then never closed.
        super().eof_received()
        return False

    def data_received(self, data: bytes) -> None:
        self._sink.reads += 1  # one per segment read: shows how many writes a client made
        super().data_received(data)

    async def _handle_client(self) -> None:
        # A reset or broken pipe is how clients often leave; aiosmtpd re-raises it from the
        # session task, and asyncio would log "Task exception was never retrieved".
        with contextlib.suppress(ConnectionError):
            if self._sink.faults.banner is None:
                await super()._handle_client()
            else:
                await self._refuse(self._sink.faults.banner)

    async def _refuse(self, banner: str) -> None:
        await self._wait_out_blackhole()
        self._writer.write(banner.encode() + b"\r\n")
        await self._writer.drain()
        if self.transport is not None:
            self.transport.close()

    async def _wait_out_blackhole(self) -> None:
        # Polled, since Faults is a plain field a test flips; healing lets an open session
        # continue, as it would after a network partition ends.
        while self._sink.faults.blackhole:  # noqa: ASYNC110
            await asyncio.sleep(BLACKHOLE_POLL_S)

    async def push(self, status: AnyStr) -> None:
        await self._wait_out_blackhole()
        delay_s = self._sink.faults.delay_s
        # aiosmtpd pushes a multi-line reply (EHLO) line by line: delay only its first line.
        if self._greeted and not self._mid_reply and delay_s > 0:
            await asyncio.sleep(delay_s)
        if self.drop_next_reply or (
            self._greeted and not self._mid_reply and self._sink.faults.drop_now()
        ):
            self._sink.dropped += 1
            if self.transport is not None:
                # A reset, as a relay that died gives. (uvloop's transports are not
                # asyncio.Transport subclasses: an isinstance test would skip the reply and
                # leave the session open, a reply behind, which no TCP relay can do.)
                cast(asyncio.WriteTransport, self.transport).abort()
            return
        if self.close_after_reply and (self.transport is None or self.transport.is_closing()):
            return  # said 421 and closed: the rest of a multi-line reply goes nowhere
        final, self.final_reply = self.final_reply, False
        if self._greeted and not self._mid_reply and not final and self._sink.faults.closing_now():
            self.close_after_reply = True
        if self.close_after_reply:
            self._sink.closed += 1
            await super().push(CLOSING)
            if self.transport is not None:
                self.transport.close()
            return
        self._greeted = True
        self._mid_reply = status[3:4] in ("-", b"-")
        await super().push(status)

    async def smtp_DATA(self, arg: str) -> None:  # noqa: N802 - aiosmtpd's command method
        await super().smtp_DATA(arg)
        if self._sink.faults.close_after_data and self.transport is not None:
            self.transport.close()

    @property
    def session_task(self) -> asyncio.Task[None] | None:
        task: asyncio.Task[None] | None = self._handler_coroutine  # aiosmtpd's name for it
        return task


class Sink:
    """An SMTP relay on loopback that records what it accepts; see `Faults` for failures."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str = "sink",
        faults: Faults | None = None,
        record: bool = True,
        keep: int | None = None,
        log_messages: bool = False,
        tls: ssl.SSLContext | None = None,
        require_tls: bool = False,
        credentials: tuple[str, str] | None = None,
        pipelining: bool = False,
    ) -> None:
        self.host = host
        self.port = port  # 0 until start() binds; then kept, so stop() + start() reuses it
        self.name = name  # also the hostname in the greeting (no getfqdn() DNS lookup)
        self.faults = faults or Faults()
        self.record = record  # False: count only (benchmarks), keep no bodies
        self.log_messages = log_messages  # one log line per message (the dev cluster's demo)
        self.pipelining = pipelining  # advertise PIPELINING (RFC 2920) in the EHLO reply
        self.reads = 0  # reads from clients, all sessions: a pipelined envelope is one
        self.accepted = 0  # messages answered 2xx at the final dot
        # The last `keep` accepted messages (None: all of them, as tests and drills reconcile
        # every one); a relay left running under load must not grow without bound.
        self.messages: deque[ReceivedMessage] = deque(maxlen=keep)
        self.rejected: list[ReceivedMessage] = []  # refused at the final dot
        self.refused_recipients: list[str] = []  # refused at RCPT
        self.connections = 0  # sessions ever opened
        self.dropped = 0  # sessions dropped instead of a reply (Faults.drop_chance)
        self.closed = 0  # sessions closed with a 421 instead of a reply (Faults.closing_chance)
        self.peak_sessions = 0  # most sessions open at once
        # A relay that offers STARTTLS with this server context (and insists on it before
        # MAIL with require_tls), and one that insists on AUTH (PLAIN, LOGIN) with these
        # credentials (only under TLS when it offers TLS, as real relays do).
        self.tls = tls
        self.require_tls = require_tls
        self.credentials = credentials
        self.auth_failures = 0  # AUTH attempts refused
        self._protocols: set[_FaultySMTP] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def count(self) -> int:
        return self.accepted

    @property
    def open_sessions(self) -> int:
        return len(self._protocols)

    @property
    def serving(self) -> bool:
        return self._server is not None

    def by_recipient(self) -> dict[str, list[ReceivedMessage]]:
        """Accepted messages per recipient (lower-cased), in arrival order."""
        result: defaultdict[str, list[ReceivedMessage]] = defaultdict(list)
        for message in self.messages:
            for recipient in message.recipients:
                result[recipient.lower()].append(message)
        return dict(result)

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"{self.name} already serving on {self.address}")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _FaultySMTP(
                self,
                hostname=self.name,
                decode_data=False,
                data_size_limit=DATA_SIZE_LIMIT,
                timeout=IDLE_TIMEOUT_S,
                loop=loop,
                **self._security(),
            ),
            self.host,
            self.port,
            reuse_address=True,  # a restarted relay binds its old port at once
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _security(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "tls_context": self.tls,
            "require_starttls": self.require_tls,
            "auth_require_tls": self.tls is not None,
        }
        if self.credentials is not None:
            settings.update(auth_required=True, authenticator=self._authenticate)
        return settings

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        given = (
            (data.login.decode(), data.password.decode())
            if isinstance(data, LoginPassword)
            else None
        )
        if given is not None and given == self.credentials:
            return AuthResult(success=True, auth_data=data)
        self.auth_failures += 1
        return AuthResult(success=False, handled=False)

    async def stop(self) -> None:
        """Close the listener and every open session at once (a relay that goes away)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Server.close() leaves accepted connections open (Python 3.11): drop them ourselves,
        # and wait for their session tasks so nothing is pending when the loop closes.
        tasks = [p.session_task for p in self._protocols if p.session_task is not None]
        for protocol in list(self._protocols):
            if protocol.transport is not None:  # not isinstance: uvloop's are no subclasses
                # At once, like a relay that crashed: what it still had to write is dropped.
                cast(asyncio.WriteTransport, protocol.transport).abort()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_WAIT_S)
        await server.wait_closed()

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> None:
        """Return once `count` messages were accepted; TimeoutError says how many arrived."""
        # Polled: drills carry `accepted` over from a sink they replaced, which no event sees.
        deadline = time.monotonic() + timeout_s
        while self.accepted < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name}: {self.accepted} of {count} messages arrived in {timeout_s}s"
                )
            await asyncio.sleep(WAIT_POLL_S)

    async def __aenter__(self) -> Sink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _record(self, message: ReceivedMessage) -> None:
        self.accepted += 1
        if self.record:
            self.messages.append(message)
        if self.log_messages:
            log.info(
                "%s: accepted message from <%s> for %s (%d bytes)",
                self.name,
                message.sender,
                ", ".join(message.recipients),
                len(message.data),
            )

    def _session_opened(self, protocol: _FaultySMTP) -> None:
        self._protocols.add(protocol)
        self.connections += 1
        self.peak_sessions = max(self.peak_sessions, len(self._protocols))

    def _session_closed(self, protocol: _FaultySMTP) -> None:
        self._protocols.discard(protocol)


async def _serve(host: str, port: int, report_s: float, pipelining: bool) -> None:
    """Run a sink until killed, printing `count N` whenever the count changes (for benchmarks)."""
    async with Sink(host, port, name="sink", record=False, pipelining=pipelining) as sink:
        print(f"listening {sink.address}", flush=True)
        last = -1
        while True:
            await asyncio.sleep(report_s)
            if sink.count != last:
                last = sink.count
                print(f"count {last}", flush=True)


def main() -> None:
    import argparse

    import uvloop

    parser = argparse.ArgumentParser(prog="python -m smtpfleet.testing.sink")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--report-s", type=float, default=0.2)
    parser.add_argument("--pipelining", action="store_true", help="advertise PIPELINING")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(args.host, args.port, args.report_s, args.pipelining))


if __name__ == "__main__":
    main()
