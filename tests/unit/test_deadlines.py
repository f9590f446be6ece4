"""Cheap deadlines: never early, at most a tick late, quiet once cancelled, and a timeout
block that behaves as asyncio.timeout does."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from smtpfleet import deadlines
from smtpfleet.deadlines import TICK_S

pytestmark = pytest.mark.timeout(10)

SLACK_S = 0.03  # a loop turn on a busy CI machine


async def _fired_at(delay_s: float) -> float:
    loop = asyncio.get_running_loop()
    fired = loop.create_future()
    started = loop.time()
    deadlines.call_later(delay_s, lambda: fired.set_result(loop.time()))
    return await fired - started


async def test_a_deadline_fires_never_early_and_at_most_a_tick_late() -> None:
    for delay_s in (0.0, 0.01, 0.07, 0.2):
        waited = await _fired_at(delay_s)
        assert delay_s <= waited <= delay_s + TICK_S + SLACK_S


async def test_a_cancelled_deadline_stays_quiet() -> None:
    fired: list[str] = []
    quiet = deadlines.call_later(0.05, lambda: fired.append("quiet"))
    deadlines.call_later(0.05, lambda: fired.append("loud"))
    quiet.cancel()
    assert quiet.cancelled()
    await asyncio.sleep(0.05 + TICK_S + SLACK_S)
    assert fired == ["loud"]


async def test_a_deadline_moved_later_fires_at_its_new_time_only() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    started = loop.time()
    deadline = deadlines.call_later(0.05, lambda: fired.append(loop.time() - started))
    for _ in range(5):  # an idle timer reset at every command
        await asyncio.sleep(0.04)
        deadline.reset(loop.time() + 0.1)
    await asyncio.sleep(0.1 + TICK_S + SLACK_S)
    assert len(fired) == 1
    assert fired[0] >= 0.3


async def test_a_deadline_moved_earlier_or_rearmed_after_cancel_fires() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    earlier = deadlines.call_later(60, lambda: fired.append("earlier"))
    earlier.reset(loop.time() + 0.02)
    rearmed = deadlines.call_later(0.02, lambda: fired.append("rearmed"))
    rearmed.cancel()
    rearmed.reset(loop.time() + 0.03)
    await asyncio.sleep(0.03 + TICK_S + SLACK_S)
    assert sorted(fired) == ["earlier", "rearmed"]


async def test_a_callback_may_cancel_another_deadline_of_its_own_tick() -> None:
    fired: list[str] = []
    second = None

    def first() -> None:
        fired.append("first")
        assert second is not None
        second.cancel()

    deadlines.call_later(0.0, first)
    second = deadlines.call_later(0.0, lambda: fired.append("second"))
    await asyncio.sleep(TICK_S + SLACK_S)
    assert fired == ["first"]


async def test_a_failing_callback_is_reported_and_the_others_still_fire() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    fired: list[str] = []

    def boom() -> None:
        raise ValueError("boom")

    deadlines.call_later(0.0, boom)
    deadlines.call_later(0.0, lambda: fired.append("after"))
    await asyncio.sleep(TICK_S + SLACK_S)
    assert fired == ["after"]
    assert isinstance(reported[0]["exception"], ValueError)


async def test_timeout_raises_timeout_error_out_of_a_block_that_overruns() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError), deadlines.timeout(0.05) as bound:
        await asyncio.sleep(5)
    assert bound.expired()
    assert 0.05 <= loop.time() - started <= 0.05 + TICK_S + SLACK_S
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_timeout_leaves_a_block_that_ends_in_time_alone() -> None:
    with deadlines.timeout(0.05) as bound:
        await asyncio.sleep(0)
    await asyncio.sleep(0.05 + TICK_S + SLACK_S)  # the task was not cancelled afterwards
    assert not bound.expired()


async def test_a_cancel_from_outside_stays_a_cancel() -> None:
    async def bounded() -> None:
        with deadlines.timeout(5):
            await asyncio.sleep(5)

    task = asyncio.create_task(bounded())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_timeout_needs_a_task() -> None:
    def outside() -> None:
        with deadlines.timeout(1):
            pass

    loop = asyncio.get_running_loop()
    handle_error: list[BaseException] = []

    def run() -> None:
        try:
            outside()
        except RuntimeError as exc:
            handle_error.append(exc)

    loop.call_soon(run)  # a callback of the loop, not a task
    await asyncio.sleep(0.01)
    assert handle_error


async def test_a_finished_timeout_is_freed_without_the_cycle_collector() -> None:
    # A cycle per bounded call would be garbage for the collector at every accept and relay
    # reply, the pauses test_session_cycles.py keeps sessions out of.
    gc.disable()
    try:
        with deadlines.timeout(5) as bound:
            await asyncio.sleep(0)
        gone = weakref.ref(bound)
        del bound
        assert gone() is None
    finally:
        gc.enable()


def test_a_closed_loop_is_not_kept_alive_by_its_deadlines() -> None:
    async def arm() -> None:
        deadlines.call_later(60, lambda: None)  # left armed, as a stopping node may

    loop = asyncio.new_event_loop()
    loop.run_until_complete(arm())
    loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None
