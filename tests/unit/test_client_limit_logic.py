"""Per-client limits with plain values: what a client counts as, the sliding minute, the
refusals, this node's own counter, one session's gate, and the DATA rate meter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpfleet import replies
from smtpfleet.config import InboundLimitsConfig
from smtpfleet.inbound import client_gate
from smtpfleet.inbound.client_gate import ClientGates
from smtpfleet.inbound.limits import (
    MINUTE_MS,
    ClientLimits,
    DataRate,
    Limit,
    LocalClientCounter,
    Usage,
    client_key,
    mail_refusal,
    minute_of,
    rcpt_refusal,
    session_refusal,
    sliding,
)
from smtpfleet.inbound.proxy import in_networks, networks
from smtpfleet.metrics import Metrics
from smtpfleet.testing.memory import Clock

LIMITS = ClientLimits(sessions=2, messages_per_minute=3, recipients_per_minute=5)
REFUSALS = "smtpfleet_client_limit_refusals_total"


# -- what a client counts as -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 client on a dual-stack listener
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # the same /64: the same client
        ("unknown", "unknown"),
    ],
)
def test_a_client_is_its_ipv4_address_or_its_ipv6_network(address: str, key: str) -> None:
    assert client_key(address, 64) == key


def test_the_ipv6_prefix_length_is_configurable() -> None:
    assert client_key("2001:db8::1", 128) == "2001:db8::1/128"
    assert client_key("2001:db8:ffff::1", 32) == "2001:db8::/32"


# -- the sliding minute ------------------------------------------------------------------------


def test_minute_of_splits_time_into_fixed_minutes() -> None:
    assert minute_of(5 * MINUTE_MS) == (5, 0.0)
    assert minute_of(5 * MINUTE_MS + 15_000) == (5, 0.25)


def test_sliding_weighs_the_previous_minute_by_what_is_left_of_it() -> None:
    assert sliding(100, 10, 0.0) == 110  # at the boundary: all of the previous minute
    assert sliding(100, 10, 0.75) == 35
    assert sliding(100, 10, 1.0) == 10


@given(
    previous=st.integers(0, 10_000),
    current=st.integers(0, 10_000),
    elapsed=st.floats(0, 1),
)
def test_sliding_lies_between_this_minute_and_both(
    previous: int, current: int, elapsed: float
) -> None:
    assert current <= sliding(previous, current, elapsed) <= previous + current + 1e-9


# -- refusals ----------------------------------------------------------------------------------


def test_the_session_over_the_limit_is_refused() -> None:
    assert session_refusal(2, LIMITS) is None
    assert session_refusal(3, LIMITS) == replies.CLIENT_TOO_MANY_SESSIONS
    assert session_refusal(10_000, ClientLimits()) is None  # 0: unlimited


def test_mail_is_refused_past_the_messages_or_with_the_recipients_spent() -> None:
    assert mail_refusal(Usage(3, 4), LIMITS) is None
    assert mail_refusal(Usage(4, 0), LIMITS) == (Limit.MESSAGES, replies.CLIENT_TOO_MANY_MESSAGES)
    assert mail_refusal(Usage(1, 5), LIMITS) == (
        Limit.RECIPIENTS,
        replies.CLIENT_TOO_MANY_RECIPIENTS,
    )
    assert mail_refusal(Usage(10_000, 10_000), ClientLimits()) is None


def test_rcpt_counts_what_this_transaction_accepted_since_mail() -> None:
    assert rcpt_refusal(3, 1, LIMITS) is None  # the fifth recipient of the minute
    assert rcpt_refusal(3, 2, LIMITS) == replies.CLIENT_TOO_MANY_RECIPIENTS
    assert rcpt_refusal(3.5, 1, LIMITS) is None
    assert rcpt_refusal(4.2, 1, LIMITS) == replies.CLIENT_TOO_MANY_RECIPIENTS


def test_every_limit_off_means_disabled() -> None:
    assert not ClientLimits().enabled
    assert ClientLimits(recipients_per_minute=1).enabled
    assert ClientLimits.from_config(InboundLimitsConfig()) == ClientLimits(20, 120, 1000)


# -- this node's own counter ---------------------------------------------------------------------


async def test_local_sessions_are_counted_until_they_close() -> None:
    counter = LocalClientCounter(Clock())
    assert await counter.open_session("a", "1") == 1
    assert await counter.open_session("a", "2") == 2
    assert await counter.open_session("b", "3") == 1
    await counter.close_session("a", "1", 0)
    assert await counter.open_session("a", "4") == 2


async def test_local_minutes_slide_and_take_late_recipients() -> None:
    clock = Clock(ms=100 * MINUTE_MS)
    counter = LocalClientCounter(clock)
    assert await counter.add_message("a", 0) == Usage(1, 0)
    assert await counter.add_message("a", 3) == Usage(2, 3)
    await counter.close_session("a", "1", 2)  # recipients counted when the session ends
    clock.advance(45)  # three quarters into the minute
    assert await counter.add_message("a", 0) == Usage(3, 5)
    clock.advance(30)  # a quarter into the next: three quarters of the last one still count
    assert await counter.add_message("a", 0) == Usage(3 * 0.75 + 1, 5 * 0.75)
    clock.advance(120)
    assert await counter.add_message("a", 0) == Usage(1, 0)
    assert await counter.add_message("b", 0) == Usage(1, 0)


# -- one session's gate ----------------------------------------------------------------------


def gates(config: InboundLimitsConfig, clock: Clock) -> tuple[ClientGates, Metrics]:
    metrics = Metrics()
    counter = LocalClientCounter(clock)
    return ClientGates(config, counter, networks(["10.0.0.0/8"]), metrics), metrics


async def test_the_gate_admits_up_to_the_session_limit() -> None:
    server, metrics = gates(InboundLimitsConfig(sessions=2), Clock())
    first, second, third = server.new(), server.new(), server.new()
    assert await first.admit("192.0.2.1") is None
    assert await second.admit("192.0.2.1") is None
    assert await third.admit("192.0.2.1") == replies.CLIENT_TOO_MANY_SESSIONS
    assert await server.new().admit("192.0.2.2") is None  # another client
    await third.close()
    await first.close()
    assert await server.new().admit("192.0.2.1") is None
    assert metrics.registry.get_sample_value(REFUSALS, {"limit": "sessions"}) == 1


async def test_relay_networks_are_exempt_unless_configured_otherwise() -> None:
    server, _ = gates(InboundLimitsConfig(sessions=1), Clock())
    for _ in range(3):
        gate = server.new()
        assert await gate.admit("10.1.2.3") is None
        assert not gate.counted
    strict, _ = gates(InboundLimitsConfig(sessions=1, exempt_relay_networks=False), Clock())
    assert await strict.new().admit("10.1.2.3") is None
    assert await strict.new().admit("10.1.2.3") == replies.CLIENT_TOO_MANY_SESSIONS


async def test_a_client_address_is_parsed_once_not_at_every_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[str] = []

    def counting(address: str, nets: object) -> bool:
        parsed.append(address)
        return in_networks(address, nets)  # type: ignore[arg-type]

    monkeypatch.setattr(client_gate, "in_networks", counting)
    server, _ = gates(InboundLimitsConfig(sessions=2), Clock())
    addresses = ("10.1.2.3", "192.0.2.1", "10.1.2.3", "192.0.2.1", "192.0.2.1")
    answers = [await server.new().admit(address) for address in addresses]
    assert parsed == ["10.1.2.3", "192.0.2.1"]
    assert answers == [None, None, None, None, replies.CLIENT_TOO_MANY_SESSIONS]


async def test_the_gate_counts_messages_at_mail_and_recipients_at_rcpt() -> None:
    config = InboundLimitsConfig(messages_per_minute=2, recipients_per_minute=3)
    server, metrics = gates(config, Clock())
    gate = server.new()
    await gate.admit("192.0.2.1")
    assert await gate.mail() is None
    assert gate.rcpt() is None
    gate.accepted()
    assert gate.rcpt() is None
    gate.accepted()
    assert await gate.mail() is None  # the two recipients are counted now
    assert gate.rcpt() is None
    gate.accepted()
    assert gate.rcpt() == replies.CLIENT_TOO_MANY_RECIPIENTS  # a fourth in the minute
    assert await gate.mail() == replies.CLIENT_TOO_MANY_MESSAGES  # a third MAIL
    labels = {"messages": 1, "recipients": 1, "sessions": 0, "data_rate": 0}
    for limit, count in labels.items():
        assert metrics.registry.get_sample_value(REFUSALS, {"limit": limit}) == count


async def test_a_gate_whose_recipients_are_spent_refuses_mail() -> None:
    server, _ = gates(InboundLimitsConfig(recipients_per_minute=1), Clock())
    gate, other = server.new(), server.new()
    await gate.admit("192.0.2.1")
    await other.admit("192.0.2.1")
    assert await gate.mail() is None
    gate.accepted()
    await gate.close()  # its recipient is counted as it leaves
    assert await other.mail() == replies.CLIENT_TOO_MANY_RECIPIENTS


async def test_the_gate_puts_the_limits_in_front_of_the_handler_hooks() -> None:
    server, _ = gates(InboundLimitsConfig(recipients_per_minute=1), Clock())
    gate = server.new()
    await gate.admit("192.0.2.1")
    called: list[str] = []

    async def mail(*args: object) -> str:
        called.append("MAIL")
        return replies.SENDER_OK

    async def rcpt(*args: object) -> str:
        called.append("RCPT")
        return replies.RCPT_OK if args[0] == "ok" else replies.RELAY_DENIED

    hooks = {"MAIL": mail, "RCPT": rcpt}
    gate.guard(hooks)
    assert await hooks["MAIL"]() == replies.SENDER_OK
    assert await hooks["RCPT"]("denied") == replies.RELAY_DENIED  # refused: not counted
    assert await hooks["RCPT"]("ok") == replies.RCPT_OK
    assert await hooks["RCPT"]("ok") == replies.CLIENT_TOO_MANY_RECIPIENTS
    assert called == ["MAIL", "RCPT", "RCPT"]  # the refused one never reached the handler


# -- the DATA rate ------------------------------------------------------------------------------


def test_data_rate_waits_a_whole_window_before_judging() -> None:
    rate = DataRate(min_bps=100, window_s=5, started_s=1000.0)
    assert not rate.too_slow(1004.9)  # nothing yet, but the grace is not over
    assert rate.too_slow(1005.0)


def test_data_rate_judges_the_last_window_only() -> None:
    rate = DataRate(min_bps=100, window_s=5, started_s=1000.0)
    rate.add(1000.5, 10_000)  # a fast start...
    assert not rate.too_slow(1005.0)
    for second in range(1, 10):
        rate.add(1000.5 + second, 50)  # ...then a trickle of 50 bytes a second
    assert rate.too_slow(1010.0)


def test_a_steady_client_at_the_minimum_is_fine() -> None:
    rate = DataRate(min_bps=100, window_s=5, started_s=0.0)
    for second in range(60):
        rate.add(second + 0.5, 100)
        assert not rate.too_slow(second + 1.0)
