"""Which verdicts are the relay's trouble (passive health checks count them), and the verdicts
we make up ourselves, which carry no invented SMTP reply code."""

from __future__ import annotations

import pytest

from smtpfleet.delivery.classify import (
    Outcome,
    Verdict,
    classify_exception,
    classify_reply,
    is_relay_trouble,
    limit_reached,
    no_session,
    unsendable,
)


def test_our_own_verdicts_carry_no_invented_reply_code() -> None:
    limited, gone = limit_reached(), no_session()
    assert limited.code is None
    assert gone.code is None
    assert limited.outcome is Outcome.TEMPORARY
    assert gone.outcome is Outcome.TEMPORARY
    assert limited.status == "4.4.5"
    assert not is_relay_trouble(limited)  # our own limit says nothing about the relay
    assert is_relay_trouble(gone)


@pytest.mark.parametrize(
    ("verdict", "trouble"),
    [
        (classify_reply(421, "4.3.2 closing"), True),
        (classify_reply(451, "4.3.0 later"), False),
        (classify_reply(550, "5.1.1 unknown"), False),
        (classify_exception(TimeoutError()), True),
        (classify_exception(ConnectionResetError()), True),
        (unsendable("a\r\n@x", sender=False), False),
    ],
    ids=["421", "451", "550", "timeout", "reset", "unsendable"],
)
def test_relay_trouble_is_the_relay_failing_to_talk(verdict: Verdict, trouble: bool) -> None:
    assert is_relay_trouble(verdict) is trouble
