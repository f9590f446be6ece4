"""The SMTP front on the wire: a real aiosmtpd server on port 0, raw client connections.

The spool here is an in-memory implementation of our own `Spool` protocol, so these tests
see exactly what inbound would hand to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from smtpfleet.config import InboundConfig
from smtpfleet.envelope import EnqueueResult, NewMessage
from smtpfleet.errors import QueueFull, QueueUnavailable
from smtpfleet.inbound.handler import InboundHandler
from smtpfleet.inbound.policy import RecipientPolicy
from smtpfleet.inbound.server import InboundServer

pytestmark = pytest.mark.timeout(30)


@dataclass
class MemorySpool:
    messages: list[NewMessage] = field(default_factory=list)
    fail_with: Exception | None = None
    hang: bool = False
    duplicate_of: str | None = None

    async def enqueue(self, message: NewMessage) -> EnqueueResult:
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail_with is not None:
            raise self.fail_with
        if self.duplicate_of is not None:
            return EnqueueResult(self.duplicate_of, duplicate=True)
        self.messages.append(message)
        return EnqueueResult(message.qid)


class Client:
    """A raw SMTP client: we want the exact bytes and codes on the wire."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self) -> str:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 5)).decode()
            if not line:
                return "".join(lines) or "<closed>"
            lines.append(line)
            if line[3:4] != "-":
                return "".join(lines)

    async def cmd(self, line: str | bytes) -> str:
        self.writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        return await self.reply()

    async def transaction(
        self, data: bytes, recipients: Sequence[str] = ("rcpt@example.net",)
    ) -> str:
        assert (await self.cmd("MAIL FROM:<sender@example.com>")).startswith("250")
        for recipient in recipients:
            assert (await self.cmd(f"RCPT TO:<{recipient}>")).startswith("250")
        assert (await self.cmd("DATA")).startswith("354")
        return await self.cmd(data)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


Harness = tuple[InboundServer, MemorySpool]


async def start(spool: MemorySpool, **overrides: Any) -> InboundServer:
    config = InboundConfig(
        listen=["127.0.0.1:0"],
        accepted_domains=["example.net"],
        max_message_bytes=overrides.pop("max_message_bytes", 10_000),
        max_received_headers=5,
        accept_timeout_s=overrides.pop("accept_timeout_s", 1.0),
        **overrides,
    )
    handler = InboundHandler(
        spool=spool,
        policy=RecipientPolicy(config.accepted_domains, config.relay_networks),
        hostname="mx.test",
        shards=4,
        max_recipients=config.max_recipients,
        max_received_headers=config.max_received_headers,
        accept_timeout_s=config.accept_timeout_s,
    )
    server = InboundServer(config, handler, "mx.test")
    await server.start()
    return server


@pytest.fixture
async def spool() -> MemorySpool:
    return MemorySpool()


@pytest.fixture
async def server(spool: MemorySpool) -> AsyncIterator[InboundServer]:
    server = await start(spool)
    yield server
    await server.close()


async def connect(server: InboundServer, ehlo: bool = True) -> Client:
    reader, writer = await asyncio.open_connection(*server.addresses[0])
    client = Client(reader, writer)
    assert (await client.reply()).startswith("220 mx.test")
    if ehlo:
        assert (await client.cmd("EHLO client.test")).startswith("250")
    return client


MESSAGE = b"Subject: hi\r\nMessage-ID: <a@b>\r\n\r\nline one\r\n..starts with a dot\r\n.\r\n"


async def test_clean_message_is_queued_with_trace_header_and_dots_undone(
    server: InboundServer, spool: MemorySpool
) -> None:
    client = await connect(server)
    reply = await client.transaction(MESSAGE)
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    [message] = spool.messages
    assert reply.strip().endswith(message.qid)
    assert message.data.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test")
    assert message.data.endswith(b"\r\n\r\nline one\r\n.starts with a dot\r\n")
    assert message.fingerprint is not None
    await client.close()


@pytest.mark.parametrize(
    "payload",
    [
        # The classic: bare LF around the dot, then a second, smuggled transaction.
        b"Subject: a\r\n\r\nbody\n.\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@example.net>\r\n"
        b"DATA\r\nsmuggled\r\n.\r\n",
        b"Subject: a\r\n\r\nbody\r\n.\nMAIL FROM:<evil@x>\r\n.\r\n",
        b"Subject: a\r\n\r\nbody\n.\r\nMAIL FROM:<evil@x>\r\n.\r\n",
        b"Subject: a\r\n\r\nbody\r.\rMAIL FROM:<evil@x>\r\n.\r\n",
        b"Subject: a\r\n\r\nbare CR\r in a line\r\n.\r\n",
        b"Subject: a\r\n\r\nbare LF\n in a line\r\n.\r\n",
    ],
)
async def test_smuggling_payloads_are_refused_whole(
    server: InboundServer, spool: MemorySpool, payload: bytes
) -> None:
    client = await connect(server)
    reply = await client.transaction(payload)
    assert reply.startswith("550 5.6.11")
    assert spool.messages == []
    # The connection is still in a sane state: a clean message after it is queued alone.
    assert (await client.transaction(MESSAGE)).startswith("250")
    assert len(spool.messages) == 1
    assert b"evil" not in spool.messages[0].data
    await client.close()


async def test_foreign_domains_and_relay_tricks_get_550_5_7_1(server: InboundServer) -> None:
    client = await connect(server)
    assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("250")
    for address in [
        "v@elsewhere.org",
        "v%elsewhere.org@example.net",
        "elsewhere.org!v@example.net",
    ]:
        assert (await client.cmd(f"RCPT TO:<{address}>")).startswith("550 5.7.1"), address
    assert (await client.cmd("RCPT TO:<user@bad..example.net>")).startswith("553 5.1.3")
    assert (await client.cmd("RCPT TO:<ok@example.net>")).startswith("250 2.1.5")
    await client.close()


async def test_recipient_limit(spool: MemorySpool) -> None:
    server = await start(spool, max_recipients=100)
    client = await connect(server)
    assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("250")
    for i in range(100):
        assert (await client.cmd(f"RCPT TO:<r{i}@example.net>")).startswith("250")
    assert (await client.cmd("RCPT TO:<r100@example.net>")).startswith("452 4.5.3")
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd(MESSAGE)).startswith("250")
    assert len(spool.messages[0].recipients) == 100
    await client.close()
    await server.close()


async def test_size_is_advertised_and_enforced(server: InboundServer, spool: MemorySpool) -> None:
    client = await connect(server, ehlo=False)
    assert "250-SIZE 10000" in await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<s@example.com> SIZE=20000")).startswith("552 5.3.4")
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    reply = await client.transaction(big * 200 + b".\r\n")
    assert reply.startswith("552 5.3.4")
    assert spool.messages == []
    await client.close()


async def test_overlong_line_is_refused(server: InboundServer, spool: MemorySpool) -> None:
    client = await connect(server)
    reply = await client.transaction(b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n")
    assert reply.startswith("500 5.5.2")
    assert spool.messages == []
    await client.close()


async def test_mail_loop_is_refused(server: InboundServer, spool: MemorySpool) -> None:
    client = await connect(server)
    trace = b"Received: from a by b; Thu, 1 Jan 2026 00:00:00 +0000\r\n" * 6
    reply = await client.transaction(trace + b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert reply.startswith("554 5.4.6")
    assert spool.messages == []
    await client.close()


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (QueueUnavailable("redis down"), "451 4.3.0"),
        (QueueFull("full"), "452 4.3.1"),
        (RuntimeError("bug"), "451 4.3.0"),
    ],
)
async def test_queue_trouble_is_always_temporary(
    server: InboundServer, spool: MemorySpool, failure: Exception, expected: str
) -> None:
    spool.fail_with = failure
    client = await connect(server)
    assert (await client.transaction(MESSAGE)).startswith(expected)
    await client.close()


async def test_a_hanging_queue_gets_451_within_the_accept_timeout(spool: MemorySpool) -> None:
    spool.hang = True
    server = await start(spool, accept_timeout_s=0.5)
    client = await connect(server)
    started = asyncio.get_running_loop().time()
    assert (await client.transaction(MESSAGE)).startswith("451 4.3.0")
    assert asyncio.get_running_loop().time() - started < 2.0
    await client.close()
    await server.close()


async def test_duplicate_gets_the_original_queue_id(
    server: InboundServer, spool: MemorySpool
) -> None:
    spool.duplicate_of = "1.ORIGINAL"
    client = await connect(server)
    assert (await client.transaction(MESSAGE)).strip() == "250 2.0.0 Ok: queued as 1.ORIGINAL"
    await client.close()


async def test_session_cap_answers_421(spool: MemorySpool) -> None:
    server = await start(spool, max_sessions=2)
    first, second = await connect(server), await connect(server)
    reader, writer = await asyncio.open_connection(*server.addresses[0])
    third = Client(reader, writer)
    assert (await third.reply()).startswith("421 4.3.2")
    for client in (first, second, third):
        await client.close()
    await server.close()


async def test_drain_refuses_new_work_but_finishes_the_transaction(
    server: InboundServer, spool: MemorySpool
) -> None:
    busy = await connect(server)
    idle = await connect(server)
    address = server.addresses[0]
    assert (await busy.cmd("MAIL FROM:<s@example.com>")).startswith("250")
    assert (await busy.cmd("RCPT TO:<r@example.net>")).startswith("250")
    server.start_draining()
    assert (await idle.reply()).startswith("421 4.3.2")  # idle sessions are told at once
    reader, writer = await asyncio.open_connection(*address)
    latecomer = Client(reader, writer)
    assert (await latecomer.reply()).startswith("421 4.3.2")
    await latecomer.close()
    assert (await busy.cmd("DATA")).startswith("354")
    assert (await busy.cmd(MESSAGE)).startswith("250")
    assert (await busy.cmd("MAIL FROM:<s@example.com>")).startswith("421 4.3.2")
    assert await server.wait_idle(5.0)
    assert len(spool.messages) == 1
    await busy.close()
    await idle.close()


async def test_unknown_commands_get_enhanced_codes(server: InboundServer) -> None:
    client = await connect(server)
    assert (await client.cmd("BOGUS")).startswith("500 5.5.1")
    assert (await client.cmd("DATA")).startswith("503 5.5.1")
    await client.close()


async def test_null_sender_is_accepted_and_queued_as_empty(
    server: InboundServer, spool: MemorySpool
) -> None:
    client = await connect(server)
    assert (await client.cmd("MAIL FROM:<>")).startswith("250")
    assert (await client.cmd("RCPT TO:<r@example.net>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd(MESSAGE)).startswith("250")
    assert spool.messages[0].sender == ""
    await client.close()
