"""gc.freeze after start-up: what exists now leaves the collector's sight, new cycles do not."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from smtpfleet.memory import freeze_startup_objects, watch_collections


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test run collects as before


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_objects_alive_at_start_up_are_frozen(unfrozen: None) -> None:
    before = _Node()
    frozen = freeze_startup_objects()
    assert frozen == gc.get_freeze_count()
    assert frozen > 1000  # the interpreter and pytest alone hold far more
    assert not any(o is before for o in gc.get_objects())  # out of every generation


def test_a_cycle_made_after_start_up_is_still_collected(unfrozen: None) -> None:
    freeze_startup_objects()
    later = _Node()
    gone = weakref.ref(later)
    del later
    gc.collect()
    assert gone() is None


def test_every_collection_is_reported_with_its_generation_until_undone() -> None:
    seen: list[tuple[int, float]] = []
    undo = watch_collections(lambda generation, seconds: seen.append((generation, seconds)))
    try:
        gc.collect(2)
        gc.collect(0)
    finally:
        undo()
    assert [generation for generation, _ in seen] == [2, 0]
    assert all(0 <= seconds < 5 for _, seconds in seen)
    gc.collect()
    assert len(seen) == 2  # undone: no longer told
