"""The SMTP listeners of a node: aiosmtpd sessions with our replies, caps and drain.

aiosmtpd speaks the protocol; this module decides what happens around it: how many sessions
run at once, what a session hears while the node drains, and what aiosmtpd's own (basic-code)
error replies are rewritten to, in one table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP

from smtpfleet import replies
from smtpfleet.config import InboundConfig
from smtpfleet.inbound.handler import InboundHandler
from smtpfleet.metrics import Metrics, reply_class

log = logging.getLogger(__name__)

# aiosmtpd's own error replies (by prefix) → ours, with RFC 3463 enhanced codes. A 500 with
# exception text would look permanent to a client and leak internals; none passes through.
REWRITES: tuple[tuple[str, str], ...] = (
    ("552 Error: message size exceeds", replies.MESSAGE_TOO_BIG),
    ("552 Error: Too much mail data", replies.MESSAGE_TOO_BIG),
    ("500 Line too long", replies.LINE_TOO_LONG),
    ("500 Command line too long", "500 5.5.2 Command line too long"),
    ("500 Error: bad syntax", "500 5.5.2 Syntax error"),
    ("500 Error: strict ASCII mode", "500 5.5.2 Non-ASCII command; SMTPUTF8 is not offered"),
    ("500 Error: command", "500 5.5.1 Command not recognized"),
    ("500 Error: (", replies.LOCAL_ERROR),
    ("500 Error: Cannot describe error", replies.LOCAL_ERROR),
    ("503 Error: need RCPT", replies.NO_RECIPIENTS),
    ("503 Error: need MAIL", "503 5.5.1 Need MAIL command"),
    ("503 Error: nested MAIL", "503 5.5.1 Nested MAIL command"),
    ("503 Error: send HELO first", "503 5.5.1 Send HELO first"),
    ("503 Error: send EHLO first", "503 5.5.1 Send EHLO first"),
)


def rewrite(reply: str) -> str:
    for prefix, ours in REWRITES:
        if reply.startswith(prefix):
            return ours
    return reply


class InboundSMTP(SMTP):
    """One SMTP session."""

    def __init__(self, server: InboundServer, handler: InboundHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._server.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._server.sessions.discard(self)
        self._server.session_ended()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        refusal = self._server.admission()
        if refusal is not None:
            result = "refused_draining" if self._server.draining else "refused_capacity"
            self._server.metrics.sessions.labels(result).inc()
            await self.refuse(refusal)
            return
        self._server.metrics.sessions.labels("accepted").inc()
        await super()._handle_client()

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            status = rewrite(status)
            if status[3:4] != "-":  # count a multi-line reply once, at its last line
                self._server.metrics.replies.labels(reply_class(status)).inc()
        await super().push(status)

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    async def refuse(self, reply: str) -> None:
        """Say why, then close (RFC 5321 §3.8: a server closing early sends 421)."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            await super().push(reply)
        if self.transport is not None:
            self.transport.close()

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(replies.TIMEOUT.encode() + b"\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    # While draining, a command that would start something new gets 421; a transaction in
    # progress (RCPT, DATA after an accepted MAIL) runs to its end.
    async def _drain_gate(self) -> bool:
        if self._server.draining:
            await self.refuse(replies.SHUTTING_DOWN)
            return True
        return False

    async def smtp_MAIL(self, arg: str) -> None:  # noqa: N802 - aiosmtpd's command method
        if not await self._drain_gate():
            await super().smtp_MAIL(arg)

    async def smtp_HELO(self, arg: str) -> None:  # noqa: N802 - aiosmtpd's command method
        if not await self._drain_gate():
            await super().smtp_HELO(arg)

    async def smtp_EHLO(self, arg: str) -> None:  # noqa: N802 - aiosmtpd's command method
        if not await self._drain_gate():
            await super().smtp_EHLO(arg)

    async def smtp_NOOP(self, arg: str) -> None:  # noqa: N802 - aiosmtpd's command method
        if not await self._drain_gate():
            await super().smtp_NOOP(arg)

    async def smtp_RSET(self, arg: str) -> None:  # noqa: N802 - aiosmtpd's command method
        if not await self._drain_gate():
            await super().smtp_RSET(arg)


class InboundServer:
    def __init__(
        self,
        config: InboundConfig,
        handler: InboundHandler,
        hostname: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self._config = config
        self._handler = handler
        self._hostname = hostname
        self.sessions: set[InboundSMTP] = set()
        self.draining = False
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()
        self._idle.set()

    def _protocol(self) -> InboundSMTP:
        self._idle.clear()
        return InboundSMTP(
            self,
            self._handler,
            hostname=self._hostname,
            ident="smtpfleet ESMTP",
            data_size_limit=self._config.max_message_bytes,
            timeout=self._config.idle_timeout_s,
            decode_data=False,
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self._config.listen_addresses():
            server = await loop.create_server(
                self._protocol, host, port, reuse_address=True, reuse_port=True
            )
            self._servers.append(server)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        bound = []
        for server in self._servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                bound.append((str(host), int(port)))
        return bound

    @property
    def active_sessions(self) -> int:
        return len(self.sessions)

    def admission(self) -> str | None:
        """Why a new session may not start, or None."""
        if self.draining:
            return replies.SHUTTING_DOWN
        if len(self.sessions) > self._config.max_sessions:
            return replies.TOO_MANY_SESSIONS
        return None

    def session_ended(self) -> None:
        if not self.sessions:
            self._idle.set()

    def start_draining(self) -> None:
        """New sessions and idle ones hear 421 now; busy ones after their transaction.

        The listeners stay open until close(), so a client that still reaches this node (the
        load balancer has not noticed yet) gets a clear 421 rather than a refused connection.
        """
        self.draining = True
        for session in list(self.sessions):
            if not session.in_transaction:
                asyncio.get_running_loop().create_task(session.refuse(replies.SHUTTING_DOWN))
        log.info("inbound draining: %d sessions open", len(self.sessions))

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once every session has ended, False if some outlived the timeout."""
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, deadline - time.monotonic()))
        return not self.sessions

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout=5.0)
        self._servers.clear()
