"""The SMTP front on the wire: a real aiosmtpd server on port 0, raw client connections.

The spool here is an in-memory implementation of our own `Spool` protocol, so these tests see
exactly what inbound would hand to the queue. Raw streams, not an SMTP client library, because
the point is the exact bytes and codes on the wire, including after a smuggling attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from smtpfleet import replies
from smtpfleet.errors import QueueFull, QueueUnavailable
from smtpfleet.inbound.handler import InboundHandler
from smtpfleet.inbound.policy import RecipientPolicy
from smtpfleet.inbound.server import InboundServer, _rewritten, rewrite
from smtpfleet.testing.client import eventually
from smtpfleet.testing.inbound import MemorySpool, inbound_front
from smtpfleet.testing.tools import need_program
from smtpfleet.testing.wire import Wire

pytestmark = pytest.mark.timeout(30)

WAIT_S = 5.0
ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3} ")
MESSAGE = b"Subject: hi\r\nMessage-ID: <a@b>\r\n\r\nline one\r\n..starts with a dot\r\n.\r\n"


class Client(Wire):
    """The raw client, with the transaction steps these tests repeat."""

    async def start_transaction(self, recipients: Sequence[str] = ("rcpt@example.net",)) -> None:
        assert (await self.cmd("MAIL FROM:<sender@example.com>")).startswith("250 2.1.0")
        for recipient in recipients:
            assert (await self.cmd(f"RCPT TO:<{recipient}>")).startswith("250 2.1.5")
        assert (await self.cmd("DATA")).startswith("354")

    async def transaction(
        self, data: bytes, recipients: Sequence[str] = ("rcpt@example.net",)
    ) -> str:
        await self.start_transaction(recipients)
        return await self.cmd(data)


class Harness:
    def __init__(self, server: InboundServer, spool: MemorySpool) -> None:
        self.server = server
        self.spool = spool
        self.clients: list[Client] = []

    async def open(self) -> Client:
        reader, writer = await asyncio.open_connection(*self.server.addresses[0])
        client = Client(reader, writer)
        self.clients.append(client)
        return client

    async def connect(self, ehlo: bool = True) -> Client:
        client = await self.open()
        assert (await client.reply()).startswith("220 mx.test ESMTP smtpfleet")
        if ehlo:
            assert (await client.cmd("EHLO client.test")).startswith("250")
        return client

    async def aclose(self) -> None:
        for client in self.clients:
            await client.close()
        await self.server.close()


@contextlib.asynccontextmanager
async def running(spool: MemorySpool | None = None, **overrides: Any) -> AsyncIterator[Harness]:
    spool = spool or MemorySpool()
    settings: dict[str, Any] = {
        "listen": ["127.0.0.1:0"],
        "accepted_domains": ["example.net"],
        "max_message_bytes": 10_000,
        "max_received_headers": 5,
        "accept_timeout_s": 1.0,
    }
    async with inbound_front(settings | overrides, spool) as front:
        harness = Harness(front.server, spool)
        try:
            yield harness
        finally:
            await harness.aclose()


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async with running() as harness:
        yield harness


async def test_clean_message_is_queued_with_trace_header_first_and_dots_undone(
    h: Harness,
) -> None:
    client = await h.connect()
    reply = await client.transaction(MESSAGE)
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    [message] = h.spool.messages
    assert reply.strip().endswith(message.qid)
    assert message.sender == "sender@example.com"
    assert message.recipients == ("rcpt@example.net",)
    assert message.data.startswith(
        b"Received: from client.test ([127.0.0.1])\r\n"
        b"\tby mx.test (smtpfleet) with ESMTP id " + message.qid.encode() + b"\r\n"
        b"\tfor <rcpt@example.net>; "
    )
    assert message.data.endswith(
        b"\r\nSubject: hi\r\nMessage-ID: <a@b>\r\n\r\nline one\r\n.starts with a dot\r\n"
    )
    assert message.fingerprint is not None
    assert h.server.active_sessions == 1


async def test_several_recipients_are_not_named_in_the_trace_header(h: Harness) -> None:
    client = await h.connect()
    reply = await client.transaction(MESSAGE, recipients=["a@example.net", "b@example.net"])
    assert reply.startswith("250 2.0.0")
    [message] = h.spool.messages
    assert message.recipients == ("a@example.net", "b@example.net")
    first_header = message.data.split(b"\r\nSubject:")[0]
    assert b" for <" not in first_header


SMUGGLING = [
    # The classic: bare LF around the dot, then a second, smuggled transaction.
    b"Subject: a\r\n\r\nbody\n.\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@example.net>\r\n"
    b"DATA\r\nsmuggled\r\n.\r\n",
    b"Subject: a\r\n\r\nbody\r\n.\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@example.net>\r\n"
    b"DATA\r\nsmuggled\r\n.\r\n",
    b"Subject: a\r\n\r\nbody\n.\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@example.net>\r\n"
    b"DATA\r\nsmuggled\r\n.\r\n",
    b"Subject: a\r\n\r\nbody\r.\rMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@example.net>\r\n"
    b"DATA\r\nsmuggled\r\n.\r\n",
    b"Subject: a\r\n\r\nbody\r\n.\rMAIL FROM:<evil@x.example>\r\n.\r\n",
    b"Subject: a\r\n\r\nbody\r.\r\nMAIL FROM:<evil@x.example>\r\n.\r\n",
    b"Subject: a\r\n\r\nbody\r\n\n.\r\nMAIL FROM:<evil@x.example>\r\n.\r\n",
    b"Subject: a\r\n\r\nbare CR\r in a line\r\n.\r\n",
    b"Subject: a\r\n\r\nbare LF\n in a line\r\n.\r\n",
    b"Subject: a\r\n\r\nCR CR LF\r\r\n.\r\n",
]


@pytest.mark.parametrize("payload", SMUGGLING)
async def test_smuggling_payloads_are_refused_whole(h: Harness, payload: bytes) -> None:
    client = await h.connect()
    assert (await client.transaction(payload)).startswith("550 5.6.11")
    assert h.spool.messages == []
    # Nothing after the bare line ending ran as a command: the next reply is NOOP's own.
    assert (await client.cmd("NOOP")).startswith("250 2.0.0")
    # The session is sane: a clean message after it is queued alone.
    assert (await client.transaction(MESSAGE)).startswith("250 2.0.0")
    [message] = h.spool.messages
    assert message.sender == "sender@example.com"
    assert b"evil" not in message.data
    assert b"smuggled" not in message.data


async def test_foreign_domains_and_relay_tricks_get_550_5_7_1(h: Harness) -> None:
    client = await h.connect()
    assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("250 2.1.0")
    for address in [
        "v@elsewhere.org",
        "v%elsewhere.org@example.net",
        "elsewhere.org!v@example.net",
        '"v@elsewhere.org"@example.net',
        "v@[192.0.2.1]",
        "v@[IPv6:2001:db8::1]",
    ]:
        assert (await client.cmd(f"RCPT TO:<{address}>")).startswith("550 5.7.1"), address
    assert (await client.cmd("RCPT TO:<user@-bad.example.net>")).startswith("553 5.1.3")
    # aiosmtpd drops a source route (RFC 5321 §3.6.1 allows it): only the last domain is used.
    assert (await client.cmd("RCPT TO:<@elsewhere.org:ok@example.net>")).startswith("250 2.1.5")
    assert (await client.cmd("RCPT TO:<ok2@example.net>")).startswith("250 2.1.5")
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd(MESSAGE)).startswith("250 2.0.0")
    assert h.spool.messages[0].recipients == ("ok@example.net", "ok2@example.net")


async def test_relay_networks_may_send_anywhere() -> None:
    async with running(relay_networks=["127.0.0.0/8"]) as h:
        client = await h.connect()
        assert (await client.transaction(MESSAGE, ["v@elsewhere.org"])).startswith("250 2.0.0")
        assert h.spool.messages[0].recipients == ("v@elsewhere.org",)


async def test_bad_sender_and_null_sender(h: Harness) -> None:
    client = await h.connect()
    assert (await client.cmd("MAIL FROM:<s@-bad.example>")).startswith("553 5.1.7")
    assert (await client.cmd("MAIL FROM:<>")).startswith("250 2.1.0")
    assert (await client.cmd("RCPT TO:<r@example.net>")).startswith("250 2.1.5")
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd(MESSAGE)).startswith("250 2.0.0")
    assert h.spool.messages[0].sender == ""


async def test_recipient_limit() -> None:
    async with running(max_recipients=100) as h:
        client = await h.connect()
        assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("250")
        for i in range(100):
            assert (await client.cmd(f"RCPT TO:<r{i}@example.net>")).startswith("250 2.1.5")
        assert (await client.cmd("RCPT TO:<r100@example.net>")).startswith("452 4.5.3")
        assert (await client.cmd("RCPT TO:<r101@example.net>")).startswith("452 4.5.3")
        assert (await client.cmd("DATA")).startswith("354")
        assert (await client.cmd(MESSAGE)).startswith("250 2.0.0")
        assert len(h.spool.messages[0].recipients) == 100


async def test_ehlo_advertises_size_pipelining_and_enhanced_status_codes(h: Harness) -> None:
    client = await h.connect(ehlo=False)
    ehlo = await client.cmd("EHLO client.test")
    assert ehlo.startswith("250-mx.test\r\n")
    assert "250-SIZE 10000\r\n" in ehlo
    assert "250-PIPELINING\r\n" in ehlo
    assert "250-ENHANCEDSTATUSCODES\r\n" in ehlo
    assert ehlo.endswith("250 HELP\r\n")
    # The EHLO hook must record the client's name, or MAIL would need HELO first.
    assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("250 2.1.0")


async def test_a_pipelined_envelope_gets_one_reply_per_command_in_order(h: Harness) -> None:
    """RFC 2920, offered in EHLO: MAIL, every RCPT and DATA in one write (a sending MTA's
    one round trip); a refused recipient among them leaves the others' message intact."""
    client = await h.connect(ehlo=False)
    assert "250-PIPELINING\r\n" in await client.cmd("EHLO client.test")
    client.writer.write(
        b"MAIL FROM:<s@example.com>\r\nRCPT TO:<a@example.net>\r\n"
        b"RCPT TO:<x@elsewhere.example>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
    )
    answers = [await client.reply() for _ in range(5)]
    assert [a[:3] for a in answers] == ["250", "250", "550", "250", "354"]
    assert answers[2].startswith("550 5.7.1")
    assert (await client.cmd(MESSAGE)).startswith("250 2.0.0")
    # The next transaction may follow the final dot's reply in one write too.
    client.writer.write(b"RSET\r\nMAIL FROM:<>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
    assert [(await client.reply())[:3] for _ in range(4)] == ["250", "250", "250", "354"]
    assert (await client.cmd(MESSAGE)).startswith("250 2.0.0")
    first, second = h.spool.messages
    assert list(first.recipients) == ["a@example.net", "b@example.net"]
    assert list(second.recipients) == ["c@example.net"]


async def test_the_replies_to_a_pipelined_group_leave_in_one_write(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 2920 §3.2: the replies to MAIL and RCPT wait while the next command is read
    already, so a group gets one segment back; in lock-step each reply is its own write."""
    port = h.server.addresses[0][1]
    writes: list[bytes] = []
    write = asyncio.StreamWriter.write

    def recorded(writer: asyncio.StreamWriter, data: bytes) -> None:
        if writer.get_extra_info("sockname")[1] == port:  # the server's side only
            writes.append(bytes(data))
        write(writer, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", recorded)
    client = await h.connect()
    writes.clear()
    client.writer.write(
        b"MAIL FROM:<s@example.com>\r\nRCPT TO:<a@example.net>\r\n"
        b"RCPT TO:<x@elsewhere.example>\r\nDATA\r\n"
    )
    assert [(await client.reply())[:3] for _ in range(4)] == ["250", "250", "550", "354"]
    assert len(writes) == 1, writes
    assert writes[0].count(b"\r\n") == 4
    assert (await client.cmd(MESSAGE)).startswith("250 2.0.0")
    writes.clear()
    await client.start_transaction(["a@example.net", "b@example.net"])
    assert len(writes) == 4  # lock-step: nothing is held for a command not yet sent


async def test_swaks_pipelines_its_envelope(h: Harness) -> None:
    """A real client that pipelines when offered (`swaks --pipeline`, as an MTA would)."""
    host, port = h.server.addresses[0]
    process = await asyncio.create_subprocess_exec(
        need_program("swaks", "apt install swaks"),
        *("--server", host, "--port", str(port), "--pipeline", "--helo", "swaks.test"),
        *("--from", "s@example.com", "--to", "a@example.net,b@example.net"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(process.communicate(), 30))[0].decode()
    assert process.returncode == 0, output
    # The whole envelope went out before the first reply came back.
    sent = output.index(" -> DATA")
    assert output.index(" -> MAIL FROM") < sent < output.index("<-  250 2.1.0")
    [message] = h.spool.messages
    assert list(message.recipients) == ["a@example.net", "b@example.net"]


async def test_size_parameter_above_the_limit_is_refused(h: Harness) -> None:
    client = await h.connect()
    assert (await client.cmd("MAIL FROM:<s@example.com> SIZE=10001")).startswith("552 5.3.4")
    assert (await client.cmd("MAIL FROM:<s@example.com> SIZE=9000")).startswith("250 2.1.0")


async def test_too_much_data_is_refused_after_the_final_dot(h: Harness) -> None:
    client = await h.connect()
    big = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 200 + b".\r\n"
    assert (await client.transaction(big)).startswith("552 5.3.4")
    assert h.spool.messages == []
    # aiosmtpd read through to the end of DATA: the session goes on in step.
    assert (await client.cmd("NOOP")).startswith("250 2.0.0")


async def test_a_line_over_the_limit_is_folded_not_refused(h: Harness) -> None:
    """RFC 5321 §4.5.3.1.6 allows 1000 octets with CRLF; longer lines are common in generated
    HTML and every major MTA takes them. Refusing them (500) bounced such mail here."""
    client = await h.connect()
    longest = b"y" * 998 + b"\r\n"
    assert (await client.transaction(b"Subject: x\r\n\r\n" + longest + b".\r\n")).startswith(
        "250 2.0.0"
    )
    assert h.spool.messages[0].data.endswith(b"\r\n\r\n" + longest)
    too_long = b"." + b"y" * 1000 + b"\r\n"  # and dot-stuffed: the dot goes before the fold
    reply = await client.transaction(b"Subject: x\r\n\r\n" + too_long + b"after\r\n.\r\n")
    assert reply.startswith("250 2.0.0"), reply
    body = h.spool.messages[1].data.split(b"\r\n\r\n", 1)[1]
    assert body == b"y" * 998 + b"\r\n " + b"yy\r\nafter\r\n"
    assert (await client.cmd("NOOP")).startswith("250 2.0.0")


async def test_overlong_command_line(h: Harness) -> None:
    client = await h.connect()
    assert (await client.cmd("NOOP " + "x" * 2000)).startswith("500 5.5.2")
    assert (await client.cmd("NOOP")).startswith("250 2.0.0")


@pytest.mark.parametrize(
    ("continuations", "reply"),
    [(300_000, "552 5.3.4 Message header section too large"), (200_000, "250 2.0.0")],
    ids=["over", "under"],
)
async def test_a_header_section_over_a_mebibyte_is_refused(continuations: int, reply: str) -> None:
    """One field and hundreds of thousands of continuation lines: read whole, a 20 MB one took
    600 MB beyond the receiving budget and held the event loop 2.5 s for every session."""
    data = b"X-Long: a\r\n" + b" a\r\n" * continuations + b"Subject: x\r\n\r\nbody\r\n.\r\n"
    async with running(max_message_bytes=2_000_000) as h:
        client = await h.connect()
        assert (await client.transaction(data)).startswith(reply)
        assert len(h.spool.messages) == reply.startswith("250")  # 4 bytes a continuation line


async def test_mail_loop_is_refused(h: Harness) -> None:
    client = await h.connect()
    trace = b"Received: from a by b; Thu, 1 Jan 2026 00:00:00 +0000\r\n" * 6
    reply = await client.transaction(trace + b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert reply.startswith("554 5.4.6")
    assert h.spool.messages == []
    # Five are still fine (the limit is 5).
    assert (await client.transaction(trace[: len(trace) * 5 // 6] + b"\r\nb\r\n.\r\n")).startswith(
        "250 2.0.0"
    )


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (QueueUnavailable("redis down"), "451 4.3.0"),
        (QueueFull("full"), "452 4.3.1"),
        (RuntimeError("bug with secret detail"), "451 4.3.0"),
    ],
)
async def test_queue_trouble_is_always_temporary(
    h: Harness, failure: Exception, expected: str
) -> None:
    h.spool.fail_with = failure
    client = await h.connect()
    reply = await client.transaction(MESSAGE)
    assert reply.startswith(expected)
    assert "secret" not in reply
    # The transaction was reset: the client may try again at once in the same session.
    h.spool.fail_with = None
    assert (await client.transaction(MESSAGE)).startswith("250 2.0.0")


async def test_a_hanging_queue_gets_451_within_the_accept_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(MemorySpool(delay_s=3600), accept_timeout_s=0.5) as h:
        client = await h.connect()
        await client.start_transaction()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with caplog.at_level(logging.WARNING, logger="smtpfleet.inbound.handler"):
            assert (await client.cmd(MESSAGE)).startswith("451 4.3.0")
        assert 0.4 < loop.time() - started < 2.0
        assert h.spool.cancelled == 1  # the enqueue was cancelled, not left running
        # The log says why (it said "answered 451: " and nothing more).
        said = [r.getMessage() for r in caplog.records if "answered 451" in r.getMessage()]
        assert len(said) == 1
        assert said[0].endswith("not queued, answered 451: no answer within 0.5 s"), said


async def test_duplicate_gets_the_original_queue_id(h: Harness) -> None:
    h.spool.duplicate_of = "1.ORIGINAL"
    client = await h.connect()
    assert (await client.transaction(MESSAGE)).strip() == "250 2.0.0 Ok: queued as 1.ORIGINAL"


async def test_session_cap_answers_421_and_closes() -> None:
    async with running(max_sessions=2) as h:
        first, _second = await h.connect(), await h.connect()
        third = await h.open()
        assert (await third.reply()).startswith("421 4.3.2")
        assert await third.closed()
        assert h.server.active_sessions == 2
        # The admitted sessions are unaffected, and a freed slot is usable again.
        assert (await first.cmd("QUIT")).startswith("221 2.0.0")
        assert await first.closed()  # EOF comes after the server's connection_lost
        assert h.server.active_sessions == 1
        assert (await (await h.connect()).cmd("NOOP")).startswith("250 2.0.0")


async def _reads_nothing(address: tuple[str, int], stop: asyncio.Event) -> socket.socket:
    """A client that pipelines commands as fast as the node takes them and never reads a
    reply: RCPT without MAIL (503), which the bound on commands that move no mail does not
    count, so the session ends by its idle timeout."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, address)
    await loop.sock_recv(sock, 1000)  # the banner, and nothing after it
    refused = b"RCPT TO:<a@example.net>\r\n" * 2_000
    with contextlib.suppress(TimeoutError, OSError):
        while not stop.is_set():
            await asyncio.wait_for(loop.sock_sendall(sock, refused), 0.5)
    return sock


async def test_a_client_that_reads_nothing_gives_its_place_back_after_the_idle_timeout() -> None:
    """Its receive window full, our replies stay unsent, and closing waited for them for
    ever: the session held its place under max_sessions after the idle timeout (a probe: two
    such clients kept a node with max_sessions 2 refusing everyone, 86 of 86 tries, 45 s).
    At the end of the linger after the 421 the connection is aborted."""
    async with running(max_sessions=1, idle_timeout_s=0.5) as h:
        stop = asyncio.Event()
        hostile = asyncio.create_task(_reads_nothing(h.server.addresses[0], stop))
        await eventually(lambda: h.server.active_sessions == 1)
        try:
            # Idle timeout 0.5 s (its 421 never read), linger 2 s, then the slot is free.
            await eventually(lambda: h.server.active_sessions == 0, timeout_s=6)
            assert (await (await h.connect()).cmd("NOOP")).startswith("250 2.0.0")
        finally:
            stop.set()
            (await hostile).close()


async def test_commands_that_move_no_mail_are_bounded_until_the_next_message(
    h: Harness,
) -> None:
    """Each NOOP reset the idle timer: one sent before each timeout held a session, and its
    place under max_sessions, for ever. A hundred such commands without a DATA: 421."""
    sender = await h.connect()  # its EHLO is the first
    for _ in range(49):
        assert (await sender.cmd("NOOP")).startswith("250")
    for _ in range(50):
        assert (await sender.cmd("RSET")).startswith("250")
    assert (await sender.transaction(MESSAGE)).startswith("250 2.0.0")  # mail: counted anew
    for _ in range(100):
        assert (await sender.cmd("NOOP")).startswith("250")
    assert await sender.cmd("NOOP") == replies.TOO_MANY_JUNK + "\r\n"
    assert await sender.closed()


async def test_drain_refuses_new_work_but_finishes_the_transaction(h: Harness) -> None:
    busy = await h.connect()
    idle = await h.connect()
    await busy.start_transaction()  # the 354 is in: the session reads the message
    busy.send(MESSAGE[:20])  # DATA in flight when the drain starts
    await asyncio.sleep(0.05)
    h.server.start_draining()
    assert (await idle.reply()).startswith("421 4.3.2")  # idle sessions are told at once
    assert await idle.closed()
    latecomer = await h.open()
    assert (await latecomer.reply()).startswith("421 4.3.2")
    assert await latecomer.closed()
    assert (await busy.cmd(MESSAGE[20:])).startswith("250 2.0.0")
    assert (await busy.cmd("MAIL FROM:<s@example.com>")).startswith("421 4.3.2")
    assert await busy.closed()
    assert await h.server.wait_idle(WAIT_S)
    assert len(h.spool.messages) == 1
    assert h.spool.messages[0].data.endswith(b".starts with a dot\r\n")


async def test_drain_lets_a_transaction_that_has_only_begun_finish(h: Harness) -> None:
    client = await h.connect()
    assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("250")
    h.server.start_draining()
    assert (await client.cmd("RCPT TO:<r@example.net>")).startswith("250 2.1.5")
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd(MESSAGE)).startswith("250 2.0.0")
    assert (await client.reply()).startswith("421 4.3.2")  # unsolicited, then closed
    assert await client.closed()
    assert await h.server.wait_idle(WAIT_S)


async def test_drain_runs_nothing_pipelined_after_the_transaction(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    senders: list[str] = []
    handle_mail = InboundHandler.handle_MAIL

    async def spy(self: InboundHandler, *args: Any) -> str:
        senders.append(args[3])
        return await handle_mail(self, *args)

    monkeypatch.setattr(InboundHandler, "handle_MAIL", spy)
    client = await h.connect()
    await client.start_transaction()
    h.server.start_draining()
    second = b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n" + MESSAGE
    client.send(MESSAGE + second)  # RFC 2920 style: the next transaction in the same write
    assert (await client.reply()).startswith("250 2.0.0")
    assert (await client.reply()).startswith("421 4.3.2")
    assert await client.closed()
    assert await h.server.wait_idle(WAIT_S)
    assert len(h.spool.messages) == 1
    assert senders == ["sender@example.com"]  # the pipelined MAIL never reached the handler


async def test_wait_idle_times_out_while_a_transaction_is_open(h: Harness) -> None:
    client = await h.connect()
    assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("250")
    h.server.start_draining()
    assert not await h.server.wait_idle(0.2)
    assert h.server.active_sessions == 1


async def test_handler_errors_are_never_5xx(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> str | None:
        raise RuntimeError("policy bug with secret detail")

    client = await h.connect()
    monkeypatch.setattr(RecipientPolicy, "check", broken)
    assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("250")
    reply = await client.cmd("RCPT TO:<r@example.net>")
    # State unknown: a temporary reply, no internals, and the connection is closed.
    assert reply.startswith("421 4.3.0")
    assert "secret" not in reply
    assert "RuntimeError" not in reply
    assert await client.closed()


async def test_errors_while_accepting_data_are_451(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(data: bytes) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr("smtpfleet.inbound.handler.HeaderSection", broken)
    client = await h.connect()
    assert (await client.transaction(MESSAGE)).startswith("451 4.3.0")
    assert (await client.cmd("NOOP")).startswith("250 2.0.0")  # the session goes on


async def test_idle_timeout_says_421_and_closes() -> None:
    async with running(idle_timeout_s=0.3) as h:
        client = await h.connect()
        assert (await client.reply()).startswith("421 4.4.2")
        assert await client.closed()


async def test_slow_data_is_not_cut_off_by_the_idle_timer() -> None:
    async with running(idle_timeout_s=0.6) as h:
        client = await h.connect()
        await client.start_transaction()
        for _ in range(10):  # 1.5 s in all: two and a half idle timeouts
            client.send(b"X-Slow: line\r\n")
            await asyncio.sleep(0.15)
        assert (await client.cmd(MESSAGE)).startswith("250 2.0.0")


async def test_the_idle_timer_does_not_cancel_an_enqueue_in_flight() -> None:
    async with running(MemorySpool(delay_s=0.6), idle_timeout_s=0.3, accept_timeout_s=2.0) as h:
        client = await h.connect()
        assert (await client.transaction(MESSAGE)).startswith("250 2.0.0")
        assert h.spool.cancelled == 0
        assert len(h.spool.messages) == 1


async def test_close_is_prompt_and_cancels_work_in_flight() -> None:
    spool = MemorySpool(delay_s=3600)
    async with running(spool, accept_timeout_s=5.0) as h:
        waiting = await h.connect()
        await waiting.start_transaction()
        waiting.send(MESSAGE)
        idle = await h.connect()
        await eventually(lambda: spool.started == 1, timeout_s=WAIT_S)  # the enqueue waits
        loop = asyncio.get_running_loop()
        started = loop.time()
        await h.server.close()
        assert loop.time() - started < 1.0
        assert await waiting.closed()
        assert await idle.closed()
        assert spool.cancelled == 1
        assert h.server.active_sessions == 0
        assert await h.server.wait_idle(0)


PROTOCOL_ERRORS = [
    "BOGUS",
    "DATA",
    "RCPT TO:<r@example.net>",
    "MAIL FROM:",
    "MAIL FROM:<s@example.com> FOO=BAR",
    "MAIL FROM:<s@example.com> BODY=BINARYMIME",
    "MAIL FROM:<s@example.com> SMTPUTF8",
    "MAIL FROM:<bad address>",
    "EHLO",
    "HELO",
    "VRFY",
    "VRFY <<<",
    "EXPN list",
    "STARTTLS",
    "AUTH PLAIN",
    "QUIT now",
    "",
]


async def test_every_error_reply_has_an_enhanced_code(h: Harness) -> None:
    client = await h.connect()
    for command in PROTOCOL_ERRORS:
        reply = await client.cmd(command)
        assert reply[:1] in "45", (command, reply)
        assert ENHANCED.match(reply), (command, reply)
    assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("250")
    assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("503 5.5.1")
    assert (await client.cmd("RCPT TO:<r@example.net> NOTIFY=NEVER")).startswith("555 5.5.4")
    assert (await client.cmd("RSET")).startswith("250 2.0.0")
    assert (await client.cmd("QUIT")).startswith("221 2.0.0")


async def test_helo_clients_get_smtp_in_the_trace_header(h: Harness) -> None:
    client = await h.connect(ehlo=False)
    assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("503 5.5.1")
    assert (await client.cmd("HELO old.client")).startswith("250")
    assert (await client.transaction(MESSAGE)).startswith("250 2.0.0")
    assert b"from old.client ([127.0.0.1])" in h.spool.messages[0].data
    assert b"with SMTP id" in h.spool.messages[0].data


@pytest.mark.parametrize(
    ("aiosmtpd_says", "we_say"),
    [
        ("552 Error: message size exceeds fixed maximum message size", replies.MESSAGE_TOO_BIG),
        ("552 Error: Too much mail data", replies.MESSAGE_TOO_BIG),
        ("500 Line too long (see RFC5321 4.5.3.1.6)", replies.LINE_TOO_LONG),
        ("500 Error: (KeyError) 'secret'", replies.LOCAL_ERROR_CLOSING),
        ("500 Error: Cannot describe error", replies.LOCAL_ERROR_CLOSING),
        ('500 Error: command "X<script>" not recognized', replies.UNKNOWN_COMMAND),
        ("501 Syntax: RCPT TO: <address>", "501 5.5.4 Syntax: RCPT TO: <address>"),
        ("503 Error: send HELO first", "503 5.5.1 Send HELO first"),
        ("502 Could not VRFY <<<secret", "501 5.5.4 Syntax: VRFY <address>"),
        ("454 TLS not available", "502 5.5.1 STARTTLS not offered"),
        ("421 Something new", "421 4.0.0 Something new"),  # fallback for unknown texts
        ("250 OK", replies.OK),
        ("250-SIZE 10000", "250-SIZE 10000"),
        (replies.RELAY_DENIED, replies.RELAY_DENIED),
    ],
)
def test_rewrite_table(aiosmtpd_says: str, we_say: str) -> None:
    assert rewrite(aiosmtpd_says) == we_say


def test_our_own_replies_skip_the_table_and_its_cache() -> None:
    """Every message gets a reply of its own ("queued as <id>"): it must not run the table
    nor push aiosmtpd's repeating lines out of its cache."""
    rewrite("250 OK")
    cached = _rewritten.cache_info()
    for n in range(2000):
        queued = replies.QUEUED_FMT.format(qid=f"q{n}")
        assert rewrite(queued) == queued
    assert rewrite("451 4.3.0 Try again later") == "451 4.3.0 Try again later"
    after = _rewritten.cache_info()
    assert (after.misses, after.currsize) == (cached.misses, cached.currsize)
    assert rewrite("250 OK") == replies.OK
    assert _rewritten.cache_info().hits == after.hits + 1  # still cached


# -- hostile input found by fuzzing (issue 16) ---------------------------------------------------

POISON_SENDERS = ["<\x0bpoison@fuzz.example>", "<\x0cp@fuzz.example>", "<\x1cp@fuzz.example>"]
POISON_RECIPIENTS = ["<\x1fa..b@example.net>", "<\x1ep@example.net>", "<a@example.net\x1d>"]


async def test_poison_addresses_are_refused_and_nothing_is_queued(h: Harness) -> None:
    client = await h.connect()
    for sender in POISON_SENDERS:
        assert (await client.cmd(f"MAIL FROM:{sender}")).startswith("553 5.1.7"), repr(sender)
    assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("250 2.1.0")
    for recipient in POISON_RECIPIENTS:
        assert (await client.cmd(f"RCPT TO:{recipient}")).startswith("553 5.1.3"), repr(recipient)
    assert (await client.cmd("RCPT TO:<ok@example.net>")).startswith("250 2.1.5")
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd(MESSAGE)).startswith("250 2.0.0")
    [message] = h.spool.messages
    assert message.sender == "s@example.com"
    assert message.recipients == ("ok@example.net",)


PARSE_ERRORS = [
    ("VRFY <a@[>", "501 5.5.4"),
    ("MAIL FROM:<a@[>", "553 5.1.7"),
    ("MAIL FROM:<s@example.com>", "250 2.1.0"),
    ("RCPT TO:<a@[1.2.3.4>", "553 5.1.3"),
    ("RCPT TO:x@[127.0.0.1", "553 5.1.3"),
    # Lenient parses that used to be accepted with 250.
    ("RCPT TO:<a b@example.net>", "553 5.1.3"),
    ("RCPT TO:<(comment)a@example.net>", "553 5.1.3"),
    ("RCPT TO:<a@example.net(comment)>", "553 5.1.3"),
    ("RCPT TO:<a@example.net", "553 5.1.3"),
    ("RCPT TO:<a@b_c.example.net>", "553 5.1.3"),
    ("RCPT TO:<" + "l" * 300 + "@example.net>", "553 5.1.3"),
]


async def test_address_parse_errors_are_answered_and_the_session_goes_on(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    client = await h.connect()
    for command, expected in PARSE_ERRORS:
        reply = await client.cmd(command)
        assert reply.startswith(expected), (command, reply)
        assert "malformed" not in reply  # aiosmtpd's wording is not ours
    assert (await client.cmd("RCPT TO:<ok@example.net>")).startswith("250 2.1.5")
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd(MESSAGE)).startswith("250 2.0.0")
    assert h.spool.messages[0].recipients == ("ok@example.net",)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("command", ["EHLO a\x00b", "HELO a\x01b", "EHLO x\x7f"])
async def test_control_characters_in_the_client_name_get_501(h: Harness, command: str) -> None:
    client = await h.connect(ehlo=False)
    assert (await client.cmd(command)).startswith("501 5.5.4"), repr(command)
    # Not greeted: the name was refused, so MAIL needs a good HELO/EHLO first.
    assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("503 5.5.1")
    assert (await client.cmd("HELO good.example")).startswith("250 mx.test")
    assert (await client.cmd("MAIL FROM:<s@example.com>")).startswith("250 2.1.0")


async def test_help_lists_the_commands_and_their_syntax(h: Harness) -> None:
    client = await h.connect()
    listing = await client.cmd("HELP")
    assert listing.startswith("214 2.0.0 "), listing  # RFC 5321 §4.3.2; RFC 2034
    for command in ("DATA", "EHLO", "MAIL", "QUIT", "RCPT", "RSET"):
        assert command in listing.split(), listing
    assert (await client.cmd("HELP MAIL")).startswith("214 2.0.0 Syntax: MAIL FROM: <address>")
    assert (await client.cmd("HELP BOGUS")).startswith("504 5.5.4 Unknown HELP topic")


async def test_too_many_unknown_commands_421_is_read_before_the_close() -> None:
    async with running() as h:
        client = await h.connect()
        # Five unknown commands and a burst of pipelined input behind them: the client must
        # still read every reply and then a clean EOF, not a connection reset.
        client.send(b"BOGUS\r\n" * 5 + b"NOISE " + b"x" * 200 + b"\r\n" * 2000)
        replies_seen = [await client.reply() for _ in range(5)]
        assert all(r.startswith("500 5.5.1") for r in replies_seen[:4]), replies_seen
        assert replies_seen[4].startswith("421 4.7.0"), replies_seen
        client.send(b"MORE NOISE\r\n" * 1000)  # still arriving after our last reply
        assert await client.closed()


async def test_a_client_that_resets_after_the_final_dot_still_gets_its_accept_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="smtpfleet.inbound.handler")
    spool = MemorySpool(delay_s=0.3)
    async with running(spool) as h:
        client = await h.connect()
        await client.start_transaction()
        client.send(MESSAGE)
        await eventually(lambda: spool.started == 1, timeout_s=WAIT_S)  # the enqueue is in flight
        assert not spool.messages
        client.writer.transport.abort()  # RST, no reply read
        await eventually(lambda: spool.messages, timeout_s=WAIT_S)
        [message] = spool.messages

        def records() -> list[Any]:
            return [r for r in caplog.records if getattr(r, "event", "") == "smtp.transaction"]

        await eventually(records, timeout_s=WAIT_S)
        logged = records()
        assert [getattr(r, "qid", None) for r in logged] == [message.qid]
        assert [getattr(r, "code", None) for r in logged] == [250]


async def test_the_node_wide_byte_budget_refuses_with_452_and_is_given_back() -> None:
    async with running(max_message_bytes=10_000, max_receiving_bytes=15_000) as h:
        budget = h.server.budget
        first, second, third = await h.connect(), await h.connect(), await h.connect()
        await first.start_transaction()
        # 8 kB, no final dot; the message is read (and held) a block at a time, each ending
        # at a line's end: all but the last kilobyte or so is held at once.
        first.send(b"Subject: a\r\n\r\n" + (b"a" * 78 + b"\r\n") * 100)
        await eventually(lambda: budget.held >= 7_000, timeout_s=WAIT_S)
        # The budget cannot hold a second 8 kB message: refused after its final dot, with a
        # temporary reply, and what it had taken is given back at once.
        await second.start_transaction()
        reply = await second.cmd(b"Subject: b\r\n\r\n" + (b"b" * 78 + b"\r\n") * 100 + b".\r\n")
        assert reply.startswith("452 4.3.1"), reply
        # A declared SIZE above what is left is refused before the data is sent.
        assert (await third.cmd("MAIL FROM:<s@example.com> SIZE=9000")).startswith("250")
        assert (await third.cmd("RCPT TO:<r@example.net>")).startswith("250")
        assert (await third.cmd("DATA")).startswith("452 4.3.1")
        assert (await first.cmd(b".\r\n")).startswith("250 2.0.0")
        assert budget.held == 0
        # With the budget free again, the refused message goes through.
        reply = await second.transaction(b"Subject: b\r\n\r\n" + b"b" * 78 + b"\r\n.\r\n")
        assert reply.startswith("250 2.0.0"), reply
        assert [len(m.data) > 8_000 for m in h.spool.messages] == [True, False]
        assert budget.held == 0


async def test_data_is_unstuffed_and_refusals_wait_for_the_final_dot(h: Harness) -> None:
    client = await h.connect()
    await client.start_transaction()
    reply = await client.cmd(b"A: 1\r\n\r\n..x\r\n...\r\n.\r\n")
    assert reply.startswith("250 2.0.0"), reply
    assert h.spool.messages[0].data.endswith(b"\r\n\r\n.x\r\n..\r\n")
    await client.start_transaction()
    # Too big a message in one long line, then more data: one refusal, after the final dot
    # (RFC 5321 §4.2.5), and the rest is still read as data.
    reply = await client.cmd(b"A: 1\r\n\r\n" + b"x" * 30_000 + b"\r\nmore\r\n.\r\n")
    assert reply.startswith("552 5.3.4"), reply
    assert (await client.cmd("NOOP")).startswith("250"), "the rest was not read as commands"
    assert len(h.spool.messages) == 1
    assert h.server.budget.held == 0


async def test_a_multi_line_reply_leaves_in_one_write(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EHLO's ten lines were ten writes (ten syscalls and segments) per connection."""
    writes: list[bytes] = []
    write = asyncio.StreamWriter.write

    def counting(writer: asyncio.StreamWriter, data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        write(writer, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", counting)
    client = await h.connect(ehlo=False)
    reply = await client.cmd("EHLO client.test")
    assert reply.startswith("250-mx.test")
    assert "\r\n250 " in reply
    [ehlo] = [data for data in writes if data.startswith(b"250-")]
    assert ehlo.decode() == reply


@pytest.mark.parametrize("delay_s", [0.0, 0.2], ids=["queue-quick", "queue-slow"])
async def test_a_client_that_closes_its_side_after_pipelining_gets_every_reply(
    delay_s: float,
) -> None:
    """`printf ... | nc -N`: every command sent before the end is answered, QUIT's 221 too.
    With a slow queue the end arrives while the first message is being queued."""
    spool = MemorySpool(delay_s=delay_s)
    async with running(spool) as h:
        client = await h.connect()
        transaction = b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
        client.send(transaction + MESSAGE + transaction + MESSAGE + b"QUIT\r\n")
        client.writer.write_eof()
        said = (await asyncio.wait_for(client.reader.read(), WAIT_S)).decode()
        codes = [line[:3] for line in said.splitlines()]
        assert codes == ["250", "250", "354", "250"] * 2 + ["221"], said
        assert len(spool.messages) == 2
        await eventually(lambda: h.server.active_sessions == 0, timeout_s=WAIT_S)


async def test_a_message_cut_off_by_the_clients_end_is_not_queued(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    client = await h.connect()
    await client.start_transaction()
    client.send(b"Subject: cut\r\n\r\nno final dot\r\n")
    client.writer.write_eof()
    assert await client.closed()
    await eventually(lambda: h.server.active_sessions == 0, timeout_s=WAIT_S)
    assert not h.spool.messages
    assert h.spool.started == 0
    assert not [r for r in caplog.records if r.levelno >= 40], "a client's end is not an error"


async def test_the_size_limit_counts_the_message_not_the_doubled_dots(h: Harness) -> None:
    """9,014 octets of message (max_message_bytes is 10,000) sent as 12,014 with its dots
    doubled: RFC 1870's message size leaves them out, so a SIZE declared honestly holds."""
    body = b"..\r\n" * 3000  # 3,000 lines of one dot, each doubled on the wire
    client = await h.connect()
    assert (await client.cmd("MAIL FROM:<s@example.com> SIZE=9014")).startswith("250")
    assert (await client.cmd("RCPT TO:<r@example.net>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    assert (await client.cmd(b"Subject: dots\r\n\r\n" + body + b".\r\n")).startswith("250 ")
    [message] = h.spool.messages
    assert message.data.endswith(b"Subject: dots\r\n\r\n" + b".\r\n" * 3000)
