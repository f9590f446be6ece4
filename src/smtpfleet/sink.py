"""A recording SMTP relay on loopback with declarative faults.

Used as the demo relays of `smtpfleet dev`, by the tests, and by the failure drills. It is a
real aiosmtpd server in the caller's event loop (port 0 by default); faults can be changed
while it runs, so a test can turn a relay bad and good again mid-load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["Faults", "ReceivedMessage", "Sink"]

log = logging.getLogger(__name__)

OK_REPLY = "250 2.0.0 Ok: stored"


@dataclass(frozen=True)
class ReceivedMessage:
    sender: str
    recipients: tuple[str, ...]
    data: bytes  # as received: CRLF line endings, dot-stuffing undone
    peer: str
    at: float  # time.monotonic()


@dataclass
class Faults:
    banner: str | None = None  # e.g. "421 4.3.2 busy": greet with this, then close
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # recipient -> reply line
    data_replies: list[str] = field(default_factory=list)  # consumed one per message
    delay_s: float = 0.0  # before every reply after the greeting: a slow relay
    blackhole: bool = False  # accept TCP, never say anything (open sessions go silent too)

    def rcpt_reply(self, recipient: str) -> str | None:
        lowered = {k.lower(): v for k, v in self.rcpt_replies.items()}
        return lowered.get(recipient.lower())


class _Recorder:
    """aiosmtpd handler: applies the faults and records what was accepted."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._sink.faults.rcpt_reply(address)
        if reply is not None:
            self._sink.refused_recipients.append(address)
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        message = ReceivedMessage(
            sender="" if envelope.mail_from in (None, "<>") else str(envelope.mail_from),
            recipients=tuple(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            peer=str(session.peer[0]) if session.peer else "",
            at=time.monotonic(),
        )
        if self._sink.faults.data_replies:
            reply = self._sink.faults.data_replies.pop(0)
            if not reply.startswith("2"):
                self._sink.rejected.append(message)
                return reply
        self._sink.accepted += 1
        if self._sink.log_messages:
            log.info(
                "%s: accepted message from <%s> for %s (%d bytes)",
                self._sink.name,
                message.sender,
                ", ".join(message.recipients),
                len(message.data),
            )
        if self._sink.record:
            self._sink.messages.append(message)
        return OK_REPLY


class _FaultySMTP(SMTP):
    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        super().__init__(_Recorder(sink), **kwargs)
        self._sink = sink

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sink._protocols.add(self)
        self._sink.connections += 1
        self._sink.peak_sessions = max(self._sink.peak_sessions, len(self._sink._protocols))
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._sink._protocols.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        faults = self._sink.faults
        if faults.blackhole:
            while await self._reader.read(4096):
                pass
            return
        if faults.banner is not None:
            self._writer.write(faults.banner.encode() + b"\r\n")
            await self._writer.drain()
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    async def push(self, status: AnyStr) -> None:
        if self._sink.faults.blackhole:
            # A relay that went silent mid-session: nothing more is ever said on it.
            await asyncio.Event().wait()
        if self._sink.faults.delay_s > 0:
            await asyncio.sleep(self._sink.faults.delay_s)
        await super().push(status)


class Sink:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str = "sink",
        faults: Faults | None = None,
        record: bool = True,
        log_messages: bool = False,
    ) -> None:
        self.log_messages = log_messages  # one log line per message (the dev cluster's demo)
        self.record = record  # False: count only (benchmarks), keep no bodies
        self.accepted = 0
        self.host = host
        self.port = port
        self.name = name
        self.faults = faults or Faults()
        self.messages: list[ReceivedMessage] = []
        self.rejected: list[ReceivedMessage] = []  # refused at the final dot
        self.refused_recipients: list[str] = []  # refused at RCPT
        self.connections = 0  # sessions ever opened
        self.peak_sessions = 0  # most sessions open at once
        self._protocols: set[_FaultySMTP] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def open_sessions(self) -> int:
        return len(self._protocols)

    @property
    def count(self) -> int:
        return self.accepted

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _FaultySMTP(
                self, hostname=self.name, decode_data=False, data_size_limit=None, timeout=60
            ),
            self.host,
            self.port,
            reuse_address=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and every open session at once (a relay that goes away)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for protocol in list(self._protocols):
            if isinstance(protocol.transport, asyncio.Transport):
                protocol.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), timeout=5.0)

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {self.count} of {count} messages arrived")
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> Sink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _serve(host: str, port: int, report_s: float) -> None:
    """Run a sink until killed, printing `count N` whenever the count changes (for benchmarks)."""
    async with Sink(host, port, name="sink", record=False) as sink:
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

    parser = argparse.ArgumentParser(prog="python -m smtpfleet.sink")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--report-s", type=float, default=0.2)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(args.host, args.port, args.report_s))


if __name__ == "__main__":
    main()
