from __future__ import annotations

from datetime import UTC, datetime

import pytest

from smtpfleet import replies
from smtpfleet.inbound.policy import (
    RecipientPolicy,
    count_received_headers,
    has_bare_line_ending,
    message_id,
    received_header,
    routing_domains,
    sanitize_helo,
)

POLICY = RecipientPolicy(["example.com"], ["10.0.0.0/8", "fd00::/8"])
OUTSIDE = "192.0.2.7"


@pytest.mark.parametrize(
    "address",
    [
        "victim@elsewhere.org",
        "victim%elsewhere.org@example.com",  # percent hack
        "elsewhere.org!victim@example.com",  # bang path
        '"victim@elsewhere.org"@example.com',  # quoted @
        "@elsewhere.org:victim@example.com",  # source route
        "@example.com,@elsewhere.org:victim@example.com",  # any hop counts
        "victim@[192.0.2.1]",  # domain literal
        "victim@[IPv6:2001:db8::1]",
        "victim@EXAMPLE.com.evil.org",
    ],
)
def test_open_relay_tricks_are_denied_to_outside_clients(address: str) -> None:
    assert POLICY.check(address, OUTSIDE) == replies.RELAY_DENIED


@pytest.mark.parametrize(
    "address", ["user@example.com", "User@EXAMPLE.COM.", "<a.b+c@example.com>"]
)
def test_accepted_domains_are_open_to_everyone(address: str) -> None:
    assert POLICY.check(address, OUTSIDE) is None


def test_relay_networks_may_send_anywhere_ipv4_ipv6_and_mapped() -> None:
    for ip in ("10.1.2.3", "fd00::5", "::ffff:10.9.9.9"):
        assert POLICY.check("someone@elsewhere.org", ip) is None
    assert POLICY.check("someone@elsewhere.org", "not-an-ip") == replies.RELAY_DENIED


@pytest.mark.parametrize(
    "address", ["", "plain", "@", "a@", "a@b..c", "a@-b.com", "a@[999.1.1.1]", "a b@c.d"]
)
def test_invalid_addresses_are_syntax_errors(address: str) -> None:
    assert routing_domains(address) is None
    assert POLICY.check(address, "10.0.0.1") == replies.BAD_ADDRESS


def test_sender_check_allows_the_null_path() -> None:
    assert RecipientPolicy.check_sender("") is None
    assert RecipientPolicy.check_sender("<>") is None
    assert RecipientPolicy.check_sender("a@b.example") is None
    assert RecipientPolicy.check_sender("a@@b") == replies.BAD_SENDER


def test_bare_line_endings() -> None:
    assert not has_bare_line_ending(b"a\r\nb\r\n")
    assert not has_bare_line_ending(b"")
    assert has_bare_line_ending(b"a\nb\r\n")
    assert has_bare_line_ending(b"a\rb\r\n")
    assert has_bare_line_ending(b"a\r\n\r")
    assert has_bare_line_ending(b"\n\r\n")


def test_received_headers_are_counted_in_the_header_section_only() -> None:
    data = b"Received: a\r\n\tfolded\r\nreceived: b\r\nSubject: x\r\n\r\nReceived: in body\r\n"
    assert count_received_headers(data) == 2


def test_message_id_unfolds_and_ignores_the_body() -> None:
    assert message_id(b"Message-ID:\r\n <x@y>\r\n\r\n") == "<x@y>"
    assert message_id(b"Subject: a\r\n\r\nMessage-ID: <body@y>\r\n") is None
    assert message_id(b"message-id: <lower@y>\r\n\r\n") == "<lower@y>"


def test_received_header_is_one_folded_crlf_header_with_a_clean_helo() -> None:
    header = received_header(
        helo="evil\r\nX-Injected: 1 (x)",
        peer_ip="192.0.2.1",
        by_host="mx.test",
        qid="1.ABC",
        recipient="r@example.com",
        when=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    lines = header.split(b"\r\n")
    assert lines[0].startswith(b"Received: from evilX-Injected:1x ([192.0.2.1])")
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert lines[-1] == b""
    assert b"id 1.ABC" in header
    assert b"for <r@example.com>; Fri, 02 Jan 2026 03:04:05 +0000" in header
    assert sanitize_helo("") == "unknown"
    assert len(sanitize_helo("a" * 500)) == 100
