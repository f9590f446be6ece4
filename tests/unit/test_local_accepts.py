"""This process's accepts handed to its own reader: only a confirmed accept's body, once."""

from __future__ import annotations

import asyncio

import pytest

from smtpfleet.queue.local_accepts import LocalAccepts

pytestmark = pytest.mark.timeout(10)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_confirmed_accept_is_taken_once_and_then_let_go() -> None:
    local = LocalAccepts()
    assert local.begin("q1", b"body")
    local.settle("q1", confirmed=True)
    assert await local.take("q1") == b"body"
    assert await local.take("q1") is None  # a second read goes to Redis
    assert len(local) == 0
    assert local.held_bytes == 0


async def test_a_failed_accept_is_never_handed_over() -> None:
    local = LocalAccepts()
    local.begin("q1", b"body")
    local.settle("q1", confirmed=False)
    assert await local.take("q1") is None
    assert local.held_bytes == 0


async def test_a_reader_ahead_of_the_outcome_waits_for_it() -> None:
    local = LocalAccepts()
    local.begin("ok", b"kept")
    local.begin("failed", b"dropped")
    ok = asyncio.create_task(local.take("ok"))
    failed = asyncio.create_task(local.take("failed"))
    await asyncio.sleep(0.01)
    assert not ok.done()  # neither outcome is known yet
    assert not failed.done()
    local.settle("ok", confirmed=True)
    local.settle("failed", confirmed=False)
    assert await ok == b"kept"
    assert await failed is None


async def test_a_cancelled_reader_leaves_the_outcome_for_the_next() -> None:
    local = LocalAccepts()
    local.begin("q1", b"body")
    reader = asyncio.create_task(local.take("q1"))
    await asyncio.sleep(0.01)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    local.settle("q1", confirmed=True)
    assert await local.take("q1") == b"body"


async def test_bodies_not_taken_in_time_are_let_go_and_their_waiters_sent_to_redis() -> None:
    clock = Clock()
    local = LocalAccepts(keep_s=3.0, clock=clock)
    local.begin("old", b"a" * 10)
    waiting = asyncio.create_task(local.take("old"))  # its accept never settles
    await asyncio.sleep(0.01)
    clock.now += 2.0
    local.begin("newer", b"b" * 10)
    assert len(local) == 2
    clock.now += 1.5  # "old" is 3.5 s old, "newer" 1.5 s
    local.begin("newest", b"c" * 10)
    assert await waiting is None
    assert len(local) == 2
    assert local.held_bytes == 20


async def test_no_more_than_max_bytes_are_held() -> None:
    local = LocalAccepts(max_bytes=100)
    assert local.begin("q1", b"x" * 60)
    assert not local.begin("q2", b"x" * 60)  # not held: its reader loads it from Redis
    assert await local.take("q2") is None
    local.settle("q1", confirmed=True)
    assert await local.take("q1") == b"x" * 60
    assert local.begin("q3", b"x" * 60)  # room again once taken


async def test_settling_an_accept_that_was_not_held_is_harmless() -> None:
    local = LocalAccepts()
    local.settle("never-held", confirmed=True)
    local.settle("never-held", confirmed=False)
    assert len(local) == 0
