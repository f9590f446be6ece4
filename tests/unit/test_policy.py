from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpfleet import replies
from smtpfleet.inbound.policy import (
    RELAY_CLIENTS_KEPT,
    HeaderSection,
    RecipientPolicy,
    effective_domain,
    has_bare_line_ending,
    parse_mailbox,
    received_header,
    routing_domains,
    sanitize_helo,
)

POLICY = RecipientPolicy(["example.com"], ["10.0.0.0/8", "fd00::/8"])
OUTSIDE = "192.0.2.7"
INSIDE = "10.1.2.3"


@pytest.mark.parametrize(
    ("address", "effective", "domains"),
    [
        ("user@example.com", "example.com", {"example.com"}),
        ("<User@EXAMPLE.COM.>", "example.com", {"example.com"}),
        # RFC 5321 §4.1.2 / appendix C: an old relay sends to the first hop.
        (
            "@a.example,@b.example:user@dom.example",
            "a.example",
            {"a.example", "b.example", "dom.example"},
        ),
        ("<@A.example:user@dom.example>", "a.example", {"a.example", "dom.example"}),
        # Percent hack: ours strips the last % and routes there.
        ("user%foreign.example@example.com", "foreign.example", {"foreign.example", "example.com"}),
        (
            "user%a.example%b.example@example.com",
            "b.example",
            {"a.example", "b.example", "example.com"},
        ),
        # Bang paths (UUCP): the leftmost host is next.
        ("foreign.example!user@example.com", "foreign.example", {"foreign.example", "example.com"}),
        (
            "a.example!b.example!user@example.com",
            "a.example",
            {"a.example", "b.example", "example.com"},
        ),
        (
            "a.example!user%b.example@example.com",
            "a.example",
            {"a.example", "b.example", "example.com"},
        ),
        # A quoted local part hiding an @.
        (
            '"user@foreign.example"@example.com',
            "foreign.example",
            {"foreign.example", "example.com"},
        ),
        (
            '"us\\"er@Foreign.example"@example.com',
            "foreign.example",
            {"foreign.example", "example.com"},
        ),
        ('"john doe"@example.com', "example.com", {"example.com"}),
        # Address literals are hosts of their own.
        ("user@[192.0.2.1]", "[192.0.2.1]", {"[192.0.2.1]"}),
        ("user@[IPv6:::1]", "[ipv6:::1]", {"[ipv6:::1]"}),
        ("user@[IPv6:2001:db8::1]", "[ipv6:2001:db8::1]", {"[ipv6:2001:db8::1]"}),
    ],
)
def test_effective_and_routing_domains(address: str, effective: str, domains: set[str]) -> None:
    assert effective_domain(address) == effective
    assert routing_domains(address) == frozenset(domains)


@pytest.mark.parametrize(
    "address",
    [
        "",
        "<>",
        "plain",
        "@",
        "a@",
        "@example.com",
        "a@b..c",
        "a@-b.com",
        "a@b-.com",
        "a@" + "x" * 64 + ".com",  # a label is at most 63 octets
        "a b@c.d",
        "a@b@c.d",  # an unquoted @ in the local part is not RFC 5321 syntax
        "<a@c.d",
        "a@[999.1.1.1]",
        "a@[1.2.3]",
        "a@[::1]",  # IPv6 literals need the "IPv6:" tag (RFC 5321 §4.1.3)
        "a@[IPv6:not-an-ip]",
        "a@[tag:general-literal]",
        '"unterminated@c.d',
        '"a"b@c.d',
        '"bad\x01char"@c.d',
        "@a.example:",
        "@a.example,b.example:user@c.d",  # each hop needs its @
        "@@a.example:user@c.d",
        "@a..example:user@c.d",
        "a@b.c d",
        "ü@example.com",  # SMTPUTF8 is not offered
    ],
)
def test_invalid_addresses(address: str) -> None:
    assert parse_mailbox(address) is None
    assert routing_domains(address) is None
    assert effective_domain(address) is None
    assert POLICY.check(address, OUTSIDE) == replies.BAD_ADDRESS
    assert POLICY.check(address, INSIDE) == replies.BAD_ADDRESS  # relay clients too


# Every trick below has made some MTA an open relay; an outside client must get 550 5.7.1.
OPEN_RELAY_TRICKS = [
    "victim@elsewhere.org",
    "victim@EXAMPLE.com.elsewhere.org",
    "victim@elsewhere.example.com.org",
    "victim@notexample.com",
    "victim@sub.example.com",  # subdomains are not ours unless listed
    "victim%elsewhere.org@example.com",
    "victim%elsewhere.org%example.com@example.com",  # every % hop counts, not only the last
    "victim%@example.com",  # an empty hidden host is not ours either
    "elsewhere.org!victim@example.com",
    "example.com!elsewhere.org!victim@example.com",
    "elsewhere.org!victim%example.com@example.com",
    "!victim@example.com",
    '"victim@elsewhere.org"@example.com',
    '"victim%elsewhere.org"@example.com',
    '"elsewhere.org!victim"@example.com',
    "@elsewhere.org:victim@example.com",
    "@example.com,@elsewhere.org:victim@example.com",
    "<@elsewhere.org:victim@example.com>",
    "victim@[192.0.2.1]",
    "victim@[127.0.0.1]",
    "victim@[IPv6:2001:db8::1]",
    "victim@[IPv6:::ffff:127.0.0.1]",
]


@pytest.mark.parametrize("address", OPEN_RELAY_TRICKS)
def test_open_relay_tricks_are_denied_to_outside_clients(address: str) -> None:
    assert POLICY.check(address, OUTSIDE) == replies.RELAY_DENIED


@pytest.mark.parametrize("address", OPEN_RELAY_TRICKS)
def test_relay_clients_are_trusted_with_any_valid_address(address: str) -> None:
    assert POLICY.check(address, INSIDE) is None


@pytest.mark.parametrize(
    "address",
    ["user@example.com", "User@EXAMPLE.COM.", "<a.b+c@example.com>", '"a b"@example.com'],
)
def test_accepted_domains_are_open_to_everyone(address: str) -> None:
    assert POLICY.check(address, OUTSIDE) is None


def test_accepted_domains_are_normalised_and_literals_never_accepted() -> None:
    policy = RecipientPolicy([" Example.NET. ", "[192.0.2.1]"], [])
    assert policy.check("a@example.net", OUTSIDE) is None
    assert policy.is_accepted("EXAMPLE.net.")
    assert policy.check("a@[192.0.2.1]", OUTSIDE) == replies.RELAY_DENIED


def test_relay_networks_ipv4_ipv6_and_mapped() -> None:
    for ip in ("10.1.2.3", "fd00::5", "::ffff:10.9.9.9"):
        assert POLICY.is_relay_client(ip)
        assert POLICY.check("someone@elsewhere.org", ip) is None
    for ip in ("11.0.0.1", "fe80::1", "::ffff:192.0.2.1", "not-an-ip", "unknown"):
        assert not POLICY.is_relay_client(ip)
        assert POLICY.check("someone@elsewhere.org", ip) == replies.RELAY_DENIED


def test_relay_answers_stay_right_past_the_kept_addresses() -> None:
    # Each answer is kept (asked at every RCPT), the least recent let go: never wrong.
    policy = RecipientPolicy([], ["10.0.0.0/8"])
    for round_ in range(2):
        for n in range(RELAY_CLIENTS_KEPT + 10):
            inside = n % 2 == 0
            ip = f"{10 if inside else 11}.0.{n // 256}.{n % 256}"
            assert policy.is_relay_client(ip) is inside, (round_, ip)
            assert policy._relay_client.cache_info().currsize <= RELAY_CLIENTS_KEPT


def test_sender_check_allows_the_null_path_and_checks_syntax() -> None:
    assert RecipientPolicy.check_sender("") is None
    assert RecipientPolicy.check_sender("<>") is None
    assert RecipientPolicy.check_sender("a@b.example") is None
    assert RecipientPolicy.check_sender("a%b@c.example") is None  # syntax only, no relay rule
    assert RecipientPolicy.check_sender("a@@b") == replies.BAD_SENDER
    assert RecipientPolicy.check_sender("a@-b.example") == replies.BAD_SENDER


def test_bare_line_endings() -> None:
    assert not has_bare_line_ending(b"")
    assert not has_bare_line_ending(b"no line endings at all")
    assert not has_bare_line_ending(b"a\r\nb\r\n\r\n")
    for bad in (
        b"a\nb\r\n",
        b"a\rb\r\n",
        b"a\r\n\r",
        b"\n\r\n",
        b"a\r\r\n",
        b"a\n\r",
        b"\r",
        b"\n",
    ):
        assert has_bare_line_ending(bad), bad


def _naive_bare(data: bytes) -> bool:
    for i, byte in enumerate(data):
        if byte == 13 and data[i + 1 : i + 2] != b"\n":
            return True
        if byte == 10 and (i == 0 or data[i - 1] != 13):
            return True
    return False


@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"."]), max_size=30))
def test_bare_line_ending_agrees_with_the_definition(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert has_bare_line_ending(data) == _naive_bare(data)


def test_received_headers_are_counted_in_the_header_section_only() -> None:
    data = (
        b"Received: a\r\n\tfolded received: x\r\nreceived: b\r\nRECEIVED : obsolete space\r\n"
        b"X-Received: not one\r\nSubject: x\r\n\r\nReceived: in body\r\n"
    )
    assert HeaderSection(data).received == 3
    assert HeaderSection(b"\r\nReceived: body only\r\n").received == 0
    # No blank line: the header section ends at the first line that is not a field.
    assert HeaderSection(b"Received: a\r\nthis is body\r\nReceived: b\r\n").received == 1


def _message_id(data: bytes) -> str | None:
    return HeaderSection(data).value(b"message-id")


def test_message_id_unfolds_and_ignores_the_body() -> None:
    assert _message_id(b"Message-ID:\r\n <x@y>\r\n\r\n") == "<x@y>"
    assert _message_id(b"Subject: a\r\n\r\nMessage-ID: <body@y>\r\n") is None
    assert _message_id(b"message-id: <lower@y>\r\nMessage-ID: <second@y>\r\n\r\n") == "<lower@y>"
    assert _message_id(b"Message-ID:   \r\n\r\n") is None
    assert _message_id(b"X-Message-ID: <other@y>\r\n\r\n") is None


WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_received_header_shape() -> None:
    header = received_header(
        helo="client.example",
        peer_ip="192.0.2.1",
        by_host="mx.test",
        qid="1.ABC",
        recipient="r@example.com",
        when=WHEN,
    )
    assert header == (
        b"Received: from client.example ([192.0.2.1])\r\n"
        b"\tby mx.test (smtpfleet) with ESMTP id 1.ABC\r\n"
        b"\tfor <r@example.com>; Fri, 02 Jan 2026 03:04:05 +0000\r\n"
    )


@given(
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1)),
    st.sampled_from([UTC, timezone(timedelta(hours=-5)), timezone(timedelta(minutes=330))]),
)
def test_the_trace_date_is_format_datetime_to_the_second(naive: datetime, zone: timezone) -> None:
    # Cached per second for UTC (every message of a second shares it); the same text.
    when = naive.replace(tzinfo=UTC).astimezone(zone)
    header = received_header(
        helo="h", peer_ip="192.0.2.1", by_host="mx.test", qid="1.A", recipient=None, when=when
    )
    assert header.endswith(f"; {format_datetime(when)}\r\n".encode())


def test_received_header_without_for_ipv6_helo_and_offset() -> None:
    header = received_header(
        helo="[IPv6:2001:db8::5]",
        peer_ip="2001:db8::5",
        by_host="mx.test",
        qid="2.DEF",
        recipient=None,
        when=WHEN.astimezone(timezone(timedelta(hours=-5))),
        esmtp=False,
    )
    assert header == (
        b"Received: from [IPv6:2001:db8::5] ([IPv6:2001:db8::5])\r\n"
        b"\tby mx.test (smtpfleet) with SMTP id 2.DEF; Thu, 01 Jan 2026 22:04:05 -0500\r\n"
    )


def test_received_header_cannot_be_injected_through_helo() -> None:
    header = received_header(
        helo="evil\r\nX-Injected: 1 (x); é\x00",
        peer_ip="192.0.2.1",
        by_host="mx.test",
        qid="1.ABC",
        recipient="r@example.com",
        when=WHEN,
    )
    lines = header.split(b"\r\n")
    assert lines[0] == b"Received: from evilX-Injected:1x ([192.0.2.1])"
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert lines[-1] == b""
    assert b"\n" not in header.replace(b"\r\n", b"")
    assert sanitize_helo(None) == sanitize_helo("") == sanitize_helo("()\r\n") == "unknown"
    assert sanitize_helo("a" * 500) == "a" * 100
