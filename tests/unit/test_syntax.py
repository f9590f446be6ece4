"""The plain-path fast path reads every path it takes exactly as aiosmtpd's parser does."""

from __future__ import annotations

from email._header_value_parser import get_angle_addr
from email.errors import HeaderParseError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpfleet.inbound.syntax import plain_path


def reference(arg: str) -> tuple[str, str] | None:
    try:
        address, rest = get_angle_addr(arg)
    except HeaderParseError:
        return None
    return address.addr_spec, rest


@pytest.mark.parametrize(
    "arg",
    [
        "<>",
        "<> ",
        "<> SIZE=100",
        "<user@example.com>",
        "<First.Last+tag@Mail.Example.COM> SIZE=2048 BODY=8BITMIME",
        "<o'neil{x}~@example.org>\tSMTPUTF8",
        "<user@example.com>   NOTIFY=FAILURE ",
    ],
)
def test_plain_paths_read_as_aiosmtpd_reads_them(arg: str) -> None:
    assert plain_path(arg) is not None
    assert plain_path(arg) == reference(arg)


@pytest.mark.parametrize(
    "arg",
    [
        '<"quoted user"@example.com>',
        "<user@[192.0.2.1]>",
        "<@relay.example:user@example.com>",
        "<user@example.com> (comment) SIZE=1",
        "<user@example.com",
        "user@example.com",
        "<user.@example.com>",
        "<user@example..com>",
        "<postmaster>",
        "<user@example.com>SIZE=1",
    ],
)
def test_anything_unusual_goes_to_the_full_parser(arg: str) -> None:
    assert plain_path(arg) is None


_PIECES = st.sampled_from(
    ["<", ">", "@", ".", " ", "\t", "a", "Z", "0", "-", "+", '"', "(", ")", "[", "]", ":", ","]
)


@settings(max_examples=2000, deadline=None)
@given(st.lists(_PIECES, max_size=24).map("".join))
def test_whenever_the_fast_path_answers_it_agrees_with_the_full_parser(arg: str) -> None:
    fast = plain_path(arg)
    if fast is not None:
        assert fast == reference(arg)


@settings(max_examples=2000, deadline=None)
@given(
    st.from_regex(
        r"<([a-z.+'-]{0,6}@[a-zA-Z0-9.-]{0,6})?>([ \t]{0,2}[A-Z=0-9 (]{0,8})?", fullmatch=True
    )
)
def test_near_plain_paths_agree_with_the_full_parser(arg: str) -> None:
    fast = plain_path(arg)
    if fast is not None:
        assert fast == reference(arg)
