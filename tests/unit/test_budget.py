"""The node-wide byte budget and the allocator tuning."""

from __future__ import annotations

import pytest

from smtpfleet import memory
from smtpfleet.inbound.budget import ByteBudget


def test_take_never_passes_the_limit_and_release_gives_back() -> None:
    budget = ByteBudget(100)
    assert budget.take(60)
    assert not budget.take(41)
    assert budget.held == 60
    assert budget.refusals == 1
    assert budget.take(40)
    assert budget.available == 0
    budget.release(100)
    assert budget.held == 0
    budget.release(5)  # more than held: never negative
    assert budget.held == 0


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ByteBudget(0)


def test_the_allocator_is_tuned_on_glibc() -> None:
    # Debian's Python runs on glibc: both calls must succeed there.
    assert memory.return_freed_memory()
    memory.trim()  # returns whether pages were freed; must not raise
