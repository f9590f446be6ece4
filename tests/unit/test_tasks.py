"""cancel_all ends tasks even when a library turned the first cancellation into an error."""

from __future__ import annotations

import asyncio

import pytest

from smtpfleet.tasks import background, cancel_all, reraise_lost_cancellation, supervised

pytestmark = pytest.mark.timeout(10)


async def swallows_one_cancellation(log: list[str]) -> None:
    """A loop like Membership.run whose I/O turns CancelledError into a caught error."""
    while True:
        try:
            await asyncio.sleep(3600)  # the client library's read
        except asyncio.CancelledError:
            if log:
                raise
            log.append("swallowed")  # "Redis away": the loop goes on
        await asyncio.sleep(0)


async def test_a_task_that_swallowed_its_cancellation_is_cancelled_again() -> None:
    log: list[str] = []
    task = asyncio.create_task(swallows_one_cancellation(log))
    plain = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    await cancel_all([task, plain], recancel_s=0.05)
    assert log == ["swallowed"]
    assert task.cancelled()
    assert plain.cancelled()


async def test_finished_tasks_are_left_as_they_are() -> None:
    done = asyncio.create_task(asyncio.sleep(0, result="ok"))
    await done
    await cancel_all([done])
    assert done.result() == "ok"


async def test_a_lost_cancellation_is_raised_again() -> None:
    """A call that returned as if nothing happened while its task was being cancelled."""

    async def caller(log: list[str]) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            log.append("the library swallowed it")
        reraise_lost_cancellation()
        log.append("went on")

    log: list[str] = []
    task = asyncio.create_task(caller(log))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["the library swallowed it"]


async def test_no_cancellation_nothing_raised() -> None:
    reraise_lost_cancellation()


async def test_a_loop_that_fails_is_restarted_counted_and_ends_when_it_returns() -> None:
    runs: list[int] = []
    restarted: list[str] = []

    async def loop() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError("a bug")

    await asyncio.wait_for(supervised("reader", loop, restarted.append, pauses_s=(0.0,)), 5)
    assert runs == [0, 1, 2]
    assert restarted == ["reader", "reader"]


async def test_a_supervised_loop_still_stops_when_cancelled() -> None:
    restarted: list[str] = []

    async def forever() -> None:
        await asyncio.sleep(3600)

    task = background("forever", forever, restarted.append)
    await asyncio.sleep(0)
    await cancel_all([task])
    assert task.cancelled()
    assert restarted == []
