"""MAIL parameters (relays/mail_params.py): BODY=8BITMIME only for 8-bit data to a relay that
offers 8BITMIME (RFC 6152 §3), SIZE with the message's length to a relay that offers SIZE
(RFC 1870), and the pipelined MAIL line byte for byte what aiosmtplib's `mail(options=...)`
writes on the step-by-step path."""

from __future__ import annotations

import pytest
from aiosmtplib.email import quote_address
from hypothesis import given
from hypothesis import strategies as st

from smtpfleet.relays import mail_params
from smtpfleet.relays.mail_params import NO_EXTENSIONS, Content, Extensions
from smtpfleet.relays.pipelining import envelope, wire

EVERY_RELAY = [Extensions(eight_bit_mime=e, size=s) for e in (False, True) for s in (False, True)]
relays = st.sampled_from(EVERY_RELAY)
messages = st.binary(max_size=64)


def test_extensions_come_from_the_ehlo_keywords() -> None:
    # aiosmtplib's esmtp_extensions: lower-cased keyword -> the rest of the line.
    ehlo = {"8bitmime": "", "size": "10240000", "pipelining": ""}
    assert mail_params.extensions(ehlo) == Extensions(eight_bit_mime=True, size=True)
    assert mail_params.extensions({"size": ""}) == Extensions(size=True)  # no maximum declared
    assert mail_params.extensions({"pipelining": ""}) == NO_EXTENSIONS
    assert mail_params.extensions({}) == NO_EXTENSIONS  # a relay that answered HELO


@pytest.mark.parametrize(
    ("data", "eight_bit"),
    [
        (b"", False),
        (b"plain\r\n", False),
        (b"\x7f\r\n", False),  # DEL is ASCII
        (b"\x80", True),
        ("caf\u00e9\r\n".encode(), True),
        (b"ascii then \xff", True),
    ],
)
def test_content_sees_any_byte_of_0x80_or_above(data: bytes, eight_bit: bool) -> None:
    assert mail_params.content(data) == Content(eight_bit=eight_bit, octets=len(data))


@pytest.mark.parametrize(
    ("relay", "eight_bit", "expected"),
    [
        (Extensions(eight_bit_mime=True, size=True), True, ["BODY=8BITMIME", "SIZE=42"]),
        (Extensions(eight_bit_mime=True, size=True), False, ["SIZE=42"]),  # 7BIT is implied
        (Extensions(eight_bit_mime=True), True, ["BODY=8BITMIME"]),
        (Extensions(size=True), True, ["SIZE=42"]),  # sent as it is, not declared
        (NO_EXTENSIONS, True, []),
    ],
)
def test_options_follow_what_the_relay_offers(
    relay: Extensions, eight_bit: bool, expected: list[str]
) -> None:
    assert mail_params.options(relay, Content(eight_bit=eight_bit, octets=42)) == expected


@given(relays, messages)
def test_params_are_the_options_as_they_follow_the_address(relay: Extensions, data: bytes) -> None:
    content = mail_params.content(data)
    expected = b"".join(b" " + option.encode() for option in mail_params.options(relay, content))
    assert mail_params.params(relay, content) == expected


@given(relays, messages)
def test_the_pipelined_mail_line_is_what_aiosmtplib_writes_with_those_options(
    relay: Extensions, data: bytes
) -> None:
    env = envelope("s@example.com", ["r@example.net"], data)
    options = mail_params.options(relay, env.content)
    # aiosmtplib's mail(): b"MAIL", b"FROM:" + the quoted address, each option, joined by a
    # space and ended with CRLF (protocol.execute_command).
    theirs = b" ".join(
        [b"MAIL", b"FROM:" + quote_address("s@example.com").encode(), *map(str.encode, options)]
    )
    assert wire(env, relay).split(b"\r\n")[0] == theirs


def test_only_mail_carries_parameters() -> None:
    env = envelope("s@example.com", ["a@example.net", "b@example.net"], b"\xc3\xa9\r\n")
    assert wire(env, Extensions(eight_bit_mime=True, size=True)) == (
        b"MAIL FROM:<s@example.com> BODY=8BITMIME SIZE=4\r\n"
        b"RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
    )
    assert wire(env) == (  # a relay that offers neither: the lines as before
        b"MAIL FROM:<s@example.com>\r\n"
        b"RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
    )
