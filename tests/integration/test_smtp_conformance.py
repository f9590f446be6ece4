"""RFC conformance of the SMTP front, end to end: a real node on a real Redis, a sink relay.

Each test speaks raw SMTP to an in-process node on loopback (an `mx` listener, as a stranger
on the internet: no relay_networks) and checks the codes on the wire and what the relay got:
RCPT TO:<Postmaster> (RFC 5321 §4.1.1.3, §4.5.1), ESMTP parameters (§4.1.2), HELP (§4.3.2 and
RFC 2034), and duplicate recipients (§2.4).
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import argon2
import pytest

from smtpfleet import replies
from smtpfleet.node import Node
from smtpfleet.testing import eventually, node_config, running_node
from smtpfleet.testing.sink import ReceivedMessage, Sink
from smtpfleet.testing.tls import TlsFiles
from smtpfleet.testing.wire import Wire

pytestmark = pytest.mark.timeout(60)

ACCEPTED = ["example.net", "example.org"]  # the first is the one <Postmaster> is completed with
MX = {"relay_networks": [], "accepted_domains": ACCEPTED}
ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3} ")
USER, PASSWORD = "alice", "correct horse battery staple"


@contextlib.asynccontextmanager
async def node(
    redis_url: str, prefix: str, sink: Sink, inbound: Mapping[str, Any] | None = None
) -> AsyncIterator[Node]:
    overrides = {"redis": {"prefix": prefix}, "inbound": {**MX, **(inbound or {})}}
    async with running_node(node_config(redis_url, [sink.address], overrides)) as running:
        yield running


async def greeted(address: tuple[str, int]) -> Wire:
    wire = await Wire.open(address)
    assert (await wire.reply()).startswith("220 ")
    assert (await wire.cmd("EHLO client.test")).startswith("250")
    return wire


def message(message_id: str) -> bytes:
    return f"Subject: conformance\r\nMessage-ID: <{message_id}>\r\n\r\nbody\r\n.\r\n".encode()


async def send(wire: Wire, recipients: Sequence[str], message_id: str) -> list[str]:
    """One transaction: the reply to each RCPT; the message must be queued."""
    assert (await wire.cmd("MAIL FROM:<sender@example.com>")).startswith("250 2.1.0")
    answers = [await wire.cmd(f"RCPT TO:{recipient}") for recipient in recipients]
    assert (await wire.cmd("DATA")).startswith("354")
    assert (await wire.cmd(message(message_id))).startswith("250 2.0.0 Ok: queued as ")
    return answers


def received(sink: Sink, message_id: str) -> list[ReceivedMessage]:
    return [m for m in sink.messages if f"<{message_id}>".encode() in m.data]


async def arrived(sink: Sink, message_id: str) -> ReceivedMessage:
    await eventually(lambda: bool(received(sink, message_id)))
    [delivered] = received(sink, message_id)
    return delivered


# -- 1. RCPT TO:<Postmaster> --------------------------------------------------------------------

SPELLINGS = ("<Postmaster>", "<postmaster>", "<POSTMASTER>")  # §4.1.1.3: any case


async def test_postmaster_without_a_domain_is_delivered_to_the_first_accepted_domain(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    async with node(redis_url, prefix, sink) as running:
        wire = await greeted(running.inbound.addresses[0])
        for spelling in SPELLINGS:
            # A stranger on an mx listener, no AUTH: postmaster is ours, never relaying.
            [answer] = await send(wire, [spelling], f"pm-{spelling[1:-1]}")
            assert answer.startswith("250 2.1.5"), (spelling, answer)
        # Syntax still holds around it: it takes no domain-less cousins, nor MAIL.
        assert (await wire.cmd("MAIL FROM:<Postmaster>")).startswith("553 5.1.7")
        assert (await wire.cmd("MAIL FROM:<sender@example.com>")).startswith("250")
        assert (await wire.cmd("RCPT TO:<abuse>")).startswith("553 5.1.3")
        for spelling in SPELLINGS:
            delivered = await arrived(sink, f"pm-{spelling[1:-1]}")
            assert delivered.recipients == ("postmaster@example.net",), spelling


async def test_postmaster_on_a_submission_listener_after_auth(
    redis_url: str, prefix: str, sink: Sink, certs: TlsFiles, tmp_path: Path
) -> None:
    users = tmp_path / "users"
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    users.write_text(f"{USER}:{hasher.hash(PASSWORD)}\n")
    submission = {
        "listeners": [{"address": "127.0.0.1:0", "profile": "submission"}],
        "tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)},
        "auth": {"users_file": str(users)},
    }
    async with node(redis_url, prefix, sink, submission) as running:
        wire = await greeted(running.inbound.addresses[1])
        assert (await wire.cmd("STARTTLS")).startswith("220")
        await wire.starttls(certs.client_context())
        assert (await wire.cmd("EHLO client.test")).startswith("250")
        # RFC 6409 §4.3: a submission listener takes no MAIL before AUTH, for any recipient.
        assert (await wire.cmd("MAIL FROM:<sender@example.com>")).startswith("530 5.7.0")
        plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        assert (await wire.cmd(f"AUTH PLAIN {plain}")).startswith("235 2.7.0")
        [answer] = await send(wire, ["<Postmaster>"], "submission-postmaster")
        assert answer.startswith("250 2.1.5"), answer
        delivered = await arrived(sink, "submission-postmaster")
        assert delivered.recipients == ("postmaster@example.net",)


async def test_postmaster_without_any_accepted_domain_gets_550_not_a_syntax_error(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    relaying = {"relay_networks": ["127.0.0.0/8"], "accepted_domains": []}
    async with node(redis_url, prefix, sink, relaying) as running:
        wire = await greeted(running.inbound.addresses[0])
        assert (await wire.cmd("MAIL FROM:<sender@example.com>")).startswith("250 2.1.0")
        assert (await wire.cmd("RCPT TO:<Postmaster>")) == replies.POSTMASTER_NO_DOMAIN + "\r\n"
        # The session goes on; the refusal costs the message nothing else.
        assert (await wire.cmd("RCPT TO:<postmaster@example.com>")).startswith("250 2.1.5")
        assert (await wire.cmd("DATA")).startswith("354")
        assert (await wire.cmd(message("no-domain"))).startswith("250 2.0.0")
        delivered = await arrived(sink, "no-domain")
        assert delivered.recipients == ("postmaster@example.com",)


# -- 2. and 3. ESMTP parameters ----------------------------------------------------------------


async def test_an_unknown_keyword_with_a_hyphen_is_555_not_a_syntax_error(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    async with node(redis_url, prefix, sink) as running:
        wire = await greeted(running.inbound.addresses[0])
        for params in ("X-FOO=bar", "FOO=bar", "X-FOO", "X-A-1=2"):
            reply = await wire.cmd(f"MAIL FROM:<a@example.com> {params}")
            assert reply.startswith("555 5.5.4 MAIL FROM parameters not recognized"), reply
        # Not a keyword by §4.1.2's grammar: a syntax error, as before.
        for params in ("X_FOO=bar", "-FOO=bar", "FOO=a=b", "FOO="):
            assert (await wire.cmd(f"MAIL FROM:<a@example.com> {params}")).startswith(
                "501 5.5.4 Syntax: MAIL FROM:"
            ), params
        assert (await wire.cmd("MAIL FROM:<a@example.com>")).startswith("250 2.1.0")
        reply = await wire.cmd("RCPT TO:<r@example.net> X-FOO=bar")
        assert reply.startswith("555 5.5.4 RCPT TO parameters not recognized"), reply
        assert (await wire.cmd("RCPT TO:<r@example.net>")).startswith("250 2.1.5")
        assert (await wire.cmd("DATA")).startswith("354")
        assert (await wire.cmd(message("hyphen"))).startswith("250 2.0.0")
        assert (await arrived(sink, "hyphen")).recipients == ("r@example.net",)


async def test_a_parameter_given_twice_is_501_whichever_value_comes_last(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    async with node(redis_url, prefix, sink) as running:
        wire = await greeted(running.inbound.addresses[0])
        # One SIZE above the limit is refused; the same with a small one behind it was taken.
        assert (await wire.cmd("MAIL FROM:<a@example.com> SIZE=26214401")).startswith("552 5.3.4")
        for params, keyword in [
            ("SIZE=26214401 SIZE=10", "SIZE"),
            ("BODY=8BITMIME BODY=7BIT", "BODY"),
            ("body=8BITMIME SIZE=10 BODY=8BITMIME", "BODY"),
            ("X-FOO=1 x-foo=1", "X-FOO"),
        ]:
            reply = await wire.cmd(f"MAIL FROM:<a@example.com> {params}")
            assert reply == replies.REPEATED_PARAMETER.format(keyword=keyword) + "\r\n", reply
        assert (await wire.cmd("MAIL FROM:<a@example.com> SIZE=10 BODY=8BITMIME")).startswith(
            "250 2.1.0"
        )
        reply = await wire.cmd("RCPT TO:<r@example.net> NOTIFY=NEVER NOTIFY=NEVER")
        assert reply == replies.REPEATED_PARAMETER.format(keyword="NOTIFY") + "\r\n", reply
        assert (await wire.cmd("RCPT TO:<r@example.net>")).startswith("250 2.1.5")
        assert (await wire.cmd("DATA")).startswith("354")
        assert (await wire.cmd(message("twice"))).startswith("250 2.0.0")
        assert (await arrived(sink, "twice")).recipients == ("r@example.net",)


# -- 4. HELP ------------------------------------------------------------------------------------


async def test_help_is_214_with_an_enhanced_code_and_an_unknown_topic_504(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    async with node(redis_url, prefix, sink) as running:
        wire = await greeted(running.inbound.addresses[0])
        listing = await wire.cmd("HELP")
        assert listing.startswith("214 2.0.0 Supported commands: "), listing
        for command in ("DATA", "EHLO", "MAIL", "QUIT", "RCPT", "RSET"):
            assert command in listing.split(), listing
        # An mx listener offers no AUTH: HELP does not list it, nor explain it.
        assert "AUTH" not in listing.split(), listing
        assert (await wire.cmd("HELP AUTH")).startswith("504 5.5.4"), listing
        syntax = await wire.cmd("HELP mail")
        assert syntax.startswith("214 2.0.0 Syntax: MAIL FROM: <address>"), syntax
        unknown = await wire.cmd("HELP FOO")
        assert unknown.startswith("504 5.5.4 Unknown HELP topic"), unknown
        for reply in (listing, syntax, unknown):
            assert ENHANCED.match(reply), reply


# -- 5. Duplicate recipients --------------------------------------------------------------------


async def test_a_duplicate_recipient_gets_250_and_reaches_the_relay_once(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    async with node(redis_url, prefix, sink) as running:
        wire = await greeted(running.inbound.addresses[0])
        recipients = [
            "<u@example.net>",
            "<u@EXAMPLE.NET>",
            "<u@example.net>",
            '<"u"@Example.Net>',  # a quoted local part is the atom it quotes
            "<U@example.net>",  # the local part is case-sensitive: another mailbox
            "<Postmaster>",
            "<postmaster@EXAMPLE.net>",  # "postmaster" in any case, and the domain too
        ]
        answers = await send(wire, recipients, "duplicates")
        assert [a[:10] for a in answers] == ["250 2.1.5 "] * len(recipients), answers
        assert answers[0] == replies.RCPT_OK + "\r\n"
        assert answers[1] == replies.RCPT_DUPLICATE + "\r\n"
        delivered = await arrived(sink, "duplicates")
        assert delivered.recipients == ("u@example.net", "U@example.net", "postmaster@example.net")
        # The next transaction starts afresh: the same recipient is a first one there.
        [again] = await send(wire, ["<u@example.net>"], "next-transaction")
        assert again == replies.RCPT_OK + "\r\n"
        assert (await arrived(sink, "next-transaction")).recipients == ("u@example.net",)


async def test_a_duplicate_at_the_recipient_limit_is_not_refused(
    redis_url: str, prefix: str, sink: Sink
) -> None:
    """A 452 would have the client send it again in another transaction: a second copy."""
    async with node(redis_url, prefix, sink, {"max_recipients": 100}) as running:
        wire = await greeted(running.inbound.addresses[0])
        recipients = [f"<r{n}@example.net>" for n in range(100)] + ["<R99@example.net>"]
        recipients += ["<r0@EXAMPLE.net>"]
        answers = await send(wire, recipients, "at-the-limit")
        assert answers[100].startswith("452 4.5.3"), answers[100]  # a new one: over the limit
        assert answers[101] == replies.RCPT_DUPLICATE + "\r\n"
        await eventually(lambda: bool(received(sink, "at-the-limit")))
        delivered = [r for m in received(sink, "at-the-limit") for r in m.recipients]
        assert sorted(delivered) == sorted(f"r{n}@example.net" for n in range(100))
