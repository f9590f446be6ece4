"""Paths are read by RFC 5321's grammar; whatever it accepts, our outbound client can send."""

from __future__ import annotations

import pytest
from aiosmtplib.email import quote_address
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpfleet.inbound.syntax import parse_path, parse_vrfy


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<>", ("<>", "")),
        ("<> SIZE=100", ("<>", "SIZE=100")),
        ("<user@example.com>", ("user@example.com", "")),
        (
            "<First.Last+tag@Mail.Example.COM> SIZE=2048 BODY=8BITMIME",
            ("First.Last+tag@Mail.Example.COM", "SIZE=2048 BODY=8BITMIME"),
        ),
        ("<o'neil{x}~@example.org>\tSMTPUTF8", ("o'neil{x}~@example.org", "SMTPUTF8")),
        ('<"quoted user"@example.com>', ('"quoted user"@example.com', "")),
        ('<"a\\"b"@example.com>', ('"a\\"b"@example.com', "")),
        ("<user@[192.0.2.1]>", ("user@[192.0.2.1]", "")),
        ("<user@[IPv6:2001:db8::1]>", ("user@[IPv6:2001:db8::1]", "")),
        # RFC 5321 §3.6.1: a source route may be ignored; only the mailbox goes on.
        ("<@relay.example,@b.example:user@example.com>", ("user@example.com", "")),
        # Repeated or leading dots exist in the wild and route nowhere else.
        ("<a..b@example.net>", ("a..b@example.net", "")),
        ("<" + "l" * 64 + "@example.com>", ("l" * 64 + "@example.com", "")),
    ],
)
def test_paths_of_rfc_5321(arg: str, expected: tuple[str, str]) -> None:
    assert parse_path(arg) == expected


@pytest.mark.parametrize(
    "arg",
    [
        # Control characters (the poison addresses found by fuzzing), 8-bit, blanks.
        "<\x0bpoison@fuzz.example>",
        "<\x0cpoison@fuzz.example>",
        "<\x1fa..b@example.net>",
        "<a\x00b@example.net>",
        "<user@example.net\x1c>",
        "<user@exämple.net>",
        "<a b@c.example>",
        "<user@example.com>\x0bSIZE=1",
        # Comments, a missing bracket, no brackets at all, stray text.
        "<(comment)a@b.example>",
        "<a@b.example(comment)>",
        "<a@b.example",
        "a@b.example",
        "<user@example.com>SIZE=1",
        # Broken domains and literals (the parse errors that dropped sessions).
        "<a@[>",
        "<a@[1.2.3.4>",
        "x@[127.0.0.1",
        "<a@[300.1.1.1]>",
        "<a@[IPv6:zz]>",
        "<a@[tag:general]>",
        "<a@b_c.example>",
        "<a@-b.example>",
        "<a@b.example.>",
        "<a@b..example>",
        "<user@>",
        "<@example.com>",
        "<postmaster>",
        "<...@example.com>",
        '<"unterminated@example.com>',
        # RFC 5321 §4.5.3.1: 64-octet local part, 255-octet domain, 256-octet path.
        "<" + "l" * 65 + "@example.com>",
        "<" + "l" * 300 + "@example.com>",
        "<a@" + ".".join(["d" * 63] * 4) + ">",
        "<@" + "r" * 200 + ".example:" + "l" * 60 + "@example.com>",
    ],
)
def test_anything_else_is_not_a_path(arg: str) -> None:
    assert parse_path(arg) is None


def test_vrfy_takes_a_user_name_or_a_path() -> None:
    assert parse_vrfy("postmaster") == "postmaster"
    assert parse_vrfy('"John Smith"') == '"John Smith"'
    assert parse_vrfy("<a@b.example>") == "a@b.example"
    for bad in ("<a@[>", "<<<", "a\x0bb", "\x00", "a b", "<a@b.example> SIZE=1"):
        assert parse_vrfy(bad) is None, bad


_PIECES = st.sampled_from(
    [
        *("<", ">", "@", ".", " ", "\t", "a", "Z", "0", "-", "+", '"', "\\", "(", ")", "[", "]"),
        *(":", ",", "_", "\x00", "\x0b", "\x1f", "\x7f", "é", "IPv6:", "1.2.3.4", "::1"),
    ]
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PIECES, max_size=24).map("".join))
def test_every_accepted_mailbox_can_be_sent_by_our_client(arg: str) -> None:
    """The poison-message class: nothing we accept is refused by aiosmtplib later."""
    parsed = parse_path(arg)
    if parsed is None or parsed[0] == "<>":
        return
    mailbox, rest = parsed
    assert quote_address(mailbox) == f"<{mailbox}>"
    assert mailbox.isascii()
    assert mailbox.isprintable()
    assert all(c.isprintable() or c == "\t" for c in rest)
