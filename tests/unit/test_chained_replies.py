"""Which replies can be a carried envelope's (`pipelining.in_order`): a relay's own answers
pass, the same answers shifted by a stray second reply to the final dot before them do not."""

from __future__ import annotations

import pytest
from aiosmtplib import SMTPResponse

from smtpfleet.delivery.classify import Outcome
from smtpfleet.relays.pipelining import EnvelopeReplies, envelope, in_order, judge

OK, GO = "250 ok", "354 go ahead"
NO_MAIL, NO_USER, LATER = "550 5.7.1 sender refused", "550 5.1.1 no such user", "451 later"
NEED_MAIL, NO_RCPTS = "503 5.5.1 need MAIL command", "554 5.5.1 no valid recipients"
STRAY_NO, STRAY_OK = "550 5.1.1 stray refusal", "250 2.0.0 stray acceptance"


def replies(*lines: str) -> EnvelopeReplies:
    """MAIL, the RCPTs, DATA, as the relay's reply lines."""
    parsed = [SMTPResponse(int(line[:3]), line[4:]) for line in lines]
    return EnvelopeReplies(parsed[0], parsed[1:-1], parsed[-1])


def shifted(stray: str, *lines: str) -> EnvelopeReplies:
    """What a reader gets when a stray reply comes first: the last real one is left unread."""
    return replies(stray, *lines[:-1])


# A relay's own answers to MAIL, RCPT..., DATA.
ANSWERS = [
    (OK, OK, GO),
    (OK, OK, OK, GO),
    (OK, NO_USER, OK, GO),
    (OK, NO_USER, NO_RCPTS),
    (OK, LATER, LATER, "451 4.3.0 no valid recipients"),
    (NO_MAIL, NEED_MAIL, NEED_MAIL),
    (LATER, NEED_MAIL, NEED_MAIL, NEED_MAIL),
]


@pytest.mark.parametrize("answers", ANSWERS)
def test_a_relays_own_answers_are_in_order(answers: tuple[str, ...]) -> None:
    assert in_order(replies(*answers))


# Every shift but one: a stray acceptance before a refused MAIL of one recipient (below).
SHIFTS = [(s, a) for s in (STRAY_NO, STRAY_OK) for a in ANSWERS if (s, a) != (STRAY_OK, ANSWERS[5])]


@pytest.mark.parametrize(("stray", "answers"), SHIFTS)
def test_the_same_answers_after_a_stray_reply_are_not(stray: str, answers: tuple[str, ...]) -> None:
    assert not in_order(shifted(stray, *answers))


def test_the_one_shift_that_passes_gives_the_relays_own_verdict() -> None:
    """A stray acceptance before a refused MAIL of one recipient reads as that recipient
    refused with the MAIL's refusal: what the relay said of the message, 550 for good."""
    env = envelope("s@example.com", ["r@example.net"])
    read = shifted(STRAY_OK, *ANSWERS[5])
    assert in_order(read)
    verdict = judge(env, read)[0]["r@example.net"]
    assert (verdict.outcome, verdict.code) == (Outcome.PERMANENT, 550)
    assert "sender refused" in verdict.text


@pytest.mark.parametrize(
    "answers",
    [
        (OK, OK, "451 4.3.0 not now"),  # DATA refused after an accepted recipient: legal, rare
        (NO_MAIL, NO_USER, NEED_MAIL),  # RCPT after a refused MAIL answered other than 503
    ],
)
def test_legal_but_unusual_answers_send_the_message_to_another_session(
    answers: tuple[str, ...],
) -> None:
    assert not in_order(replies(*answers))
