"""The envelope lines of a pipelined transaction are byte for byte what aiosmtplib sends."""

from __future__ import annotations

import pytest
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    PERIOD_REGEX,
    normalize_message_line_endings,
)
from hypothesis import example, given
from hypothesis import strategies as st

from smtpfleet.relays.pipelining import _body, _line

ATOM_CHARS = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
atoms = st.text(ATOM_CHARS, min_size=1, max_size=8)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
plain = st.builds(
    lambda local, domain: ".".join(local) + "@" + ".".join(domain),
    st.lists(atoms, min_size=1, max_size=3),
    st.lists(labels, min_size=1, max_size=3),
)


def _theirs(verb: bytes, address: str) -> bytes | None:
    """What aiosmtplib's mail()/rcpt() would put on the wire; None where it refuses (its
    quoting, ASCII, or its command-injection check before any write)."""
    try:
        argument = quote_address(address).encode("ascii")
    except ValueError:
        return None
    if COMMAND_INJECTION_REGEX.search(argument):
        return None
    return verb + argument + b"\r\n"


def _ours(verb: bytes, address: str) -> bytes | None:
    try:
        return _line(verb, address)
    except ValueError:
        return None


@given(plain)
@example("first.last@example.net")
@example("o'brien+tag@mx-1.example.org")
def test_plain_addresses_are_sent_as_aiosmtplib_sends_them(address: str) -> None:
    assert _ours(b"RCPT TO:", address) == _theirs(b"RCPT TO:", address)


@given(st.text(max_size=40))
@example("")
@example("Some One <one@example.net>")
@example('"quoted local"@example.net')
@example("a..b@example.net")
@example(".a@example.net")
@example("a@-example.net")
@example("a@example.net\r\nRCPT TO:<b@example.net>")
@example("rcpt@exämple.net")
def test_any_other_text_is_sent_or_refused_as_aiosmtplib_would(address: str) -> None:
    assert _ours(b"MAIL FROM:", address) == _theirs(b"MAIL FROM:", address)


@pytest.mark.parametrize("address", ["a@example.net", "x.y-z@a.b.c"])
def test_the_fast_path_adds_nothing_of_its_own(address: str) -> None:
    assert _line(b"MAIL FROM:", address) == b"MAIL FROM:<" + address.encode() + b">\r\n"


@given(st.binary(max_size=60) | st.text("\r\n.ab", max_size=60).map(str.encode))
@example(b"a\r\n.b\r\n")
@example(b".\r\n")
@example(b"a\r\nb")
@example(b"a\nb\r\n")
@example(b"")
def test_a_body_is_sent_as_aiosmtplib_sends_it(data: bytes) -> None:
    theirs = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
    assert _body(data) == theirs
