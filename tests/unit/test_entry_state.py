"""Entry states are one enum; the CLI's choices (kept import-free) spell the same values."""

from __future__ import annotations

from smtpfleet.cli.parser import STATES
from smtpfleet.envelope import EntryState


def test_the_cli_offers_exactly_the_entry_states() -> None:
    assert tuple(state.value for state in EntryState) == STATES


def test_a_state_reads_as_its_value() -> None:
    assert f"{EntryState.IN_FLIGHT}" == "in_flight"
    assert EntryState("dead") is EntryState.DEAD
