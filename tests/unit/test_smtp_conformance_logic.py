"""The pure rules behind the SMTP front's RFC conformance: <Postmaster>, ESMTP parameters,
HELP's replies and what makes two recipients one mailbox."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpfleet.inbound.policy import RecipientPolicy, recipient_key
from smtpfleet.inbound.server import rewrite
from smtpfleet.inbound.syntax import (
    POSTMASTER,
    RepeatedParameter,
    parse_forward_path,
    parse_params,
    parse_path,
)

# -- RCPT TO:<Postmaster> (RFC 5321 §4.1.1.3, §4.5.1) -------------------------------------------


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<Postmaster>", (POSTMASTER, "")),
        ("<postmaster>", (POSTMASTER, "")),
        ("<POSTMASTER>", (POSTMASTER, "")),
        ("<pOsTmAsTeR> NOTIFY=NEVER", (POSTMASTER, "NOTIFY=NEVER")),
        ("<Postmaster@Example.NET>", ("Postmaster@Example.NET", "")),
        ("<u@example.net>", ("u@example.net", "")),
    ],
)
def test_rcpt_takes_postmaster_without_a_domain(arg: str, expected: tuple[str, str]) -> None:
    assert parse_forward_path(arg) == expected


@pytest.mark.parametrize(
    "arg", ["<Postmaster", "Postmaster", "<Post master>", "<abuse>", "<postmaster\x0b>"]
)
def test_no_other_path_goes_without_a_domain(arg: str) -> None:
    assert parse_forward_path(arg) is None


def test_mail_never_takes_postmaster_without_a_domain() -> None:
    # §4.1.1.2: the reverse-path is a Mailbox or <>; "<Postmaster>" is RCPT's alone.
    assert parse_path("<Postmaster>") is None


def test_postmaster_goes_to_the_first_accepted_domain() -> None:
    policy = RecipientPolicy([" Example.NET. ", "example.org"], [])
    assert policy.postmaster == "postmaster@example.net"
    # Ours whoever asks: no relay network, no AUTH.
    assert policy.check(policy.postmaster, "192.0.2.1") is None


@pytest.mark.parametrize("domains", [[], ["[192.0.2.1]"]])
def test_postmaster_has_no_domain_without_an_accepted_one(domains: list[str]) -> None:
    assert RecipientPolicy(domains, ["10.0.0.0/8"]).postmaster is None


# -- ESMTP parameters (§4.1.2) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([], {}),
        (["SIZE=100", "BODY=8BITMIME"], {"SIZE": "100", "BODY": "8BITMIME"}),
        (["X-FOO=bar"], {"X-FOO": "bar"}),
        (["x-foo-2=bar"], {"X-FOO-2": "bar"}),
        (["SMTPUTF8"], {"SMTPUTF8": True}),
        (["9X-=1"], {"9X-": "1"}),  # a leading digit and a trailing hyphen: the grammar's
        (["ORCPT=rfc822;a+2Bb@example.net"], {"ORCPT": "rfc822;a+2Bb@example.net"}),
    ],
)
def test_parameters_of_rfc_5321(params: list[str], expected: dict[str, str | bool]) -> None:
    assert parse_params(params) == expected


@pytest.mark.parametrize(
    "param", ["-FOO=1", "X_FOO=1", "FOO=", "=1", "FOO=a=b", "FO O=1", "FOO=\x7f", "É=1"]
)
def test_malformed_parameters(param: str) -> None:
    assert parse_params([param]) is None


@pytest.mark.parametrize(
    ("params", "keyword"),
    [
        (["SIZE=26214401", "SIZE=10"], "SIZE"),
        (["BODY=8BITMIME", "body=7BIT"], "BODY"),
        (["NOTIFY=NEVER", "SIZE=1", "NOTIFY=NEVER"], "NOTIFY"),
        (["SMTPUTF8", "SMTPUTF8"], "SMTPUTF8"),
        (["X-FOO", "x-foo=1"], "X-FOO"),
    ],
)
def test_a_parameter_given_twice_is_refused(params: list[str], keyword: str) -> None:
    with pytest.raises(RepeatedParameter) as refused:
        parse_params(params)
    assert refused.value.keyword == keyword


@given(
    st.lists(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,8}", fullmatch=True), unique_by=str.upper)
)
def test_distinct_keywords_are_all_kept(keywords: list[str]) -> None:
    parsed = parse_params([f"{k}=v" for k in keywords])
    assert parsed == {k.upper(): "v" for k in keywords}


# -- HELP (RFC 5321 §4.3.2, RFC 2034) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("aiosmtpd_says", "we_say"),
    [
        ("250 Supported commands: DATA EHLO", "214 2.0.0 Supported commands: DATA EHLO"),
        (
            "250 Syntax: MAIL FROM: <address> [SP <mail-parameters>]",
            "214 2.0.0 Syntax: MAIL FROM: <address> [SP <mail-parameters>]",
        ),
        (
            "501 Supported commands: DATA EHLO",
            "504 5.5.4 Unknown HELP topic; supported commands: DATA EHLO",
        ),
    ],
)
def test_help_replies(aiosmtpd_says: str, we_say: str) -> None:
    assert rewrite(aiosmtpd_says) == we_say


# -- One mailbox, one recipient (§2.4) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("u@example.net", "u@EXAMPLE.NET"),
        ('"u"@example.net', "u@example.net"),
        ('"u\\.v"@example.net', "u.v@example.net"),
        ("Postmaster@example.net", "postmaster@Example.Net"),
        ("u@[IPv6:2001:DB8::1]", "u@[ipv6:2001:db8::1]"),
    ],
)
def test_the_same_mailbox(one: str, other: str) -> None:
    assert recipient_key(one) == recipient_key(other)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("u@example.net", "U@example.net"),  # the local part is case-sensitive
        ('"u v"@example.net', "uv@example.net"),
        ('"a@b"@example.net', "a@b.example.net"),
        ("u@example.net", "u@example.org"),
        ("abuse@example.net", "Abuse@example.net"),  # only postmaster is case-insensitive
    ],
)
def test_different_mailboxes(one: str, other: str) -> None:
    assert recipient_key(one) != recipient_key(other)
