"""Deadlines that almost never fire, kept cheaply.

The hot path arms several deadlines per message: the session's idle timer (reset at every
command), the accept's own bound, each reply awaited from a relay. Nearly all of them are
disarmed long before they fire. On uvloop an `asyncio.timeout` block costs about 9 us (a
loop timer armed and cancelled, two coroutines, the task lookups) and `call_later` plus
`cancel` about 3 us; py-spy put the timeouts at 6 % of a node's CPU.

These deadlines share one loop timer per event loop, armed for the earliest tick that holds
any. A deadline fires at most `TICK_S` late, never early. Moving a deadline later (the idle
timer, at every command) only stores a number: the tick that finds it not yet due files it
again.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import weakref
from collections.abc import Callable
from types import TracebackType

TICK_S = 0.05
_FIRING = -1  # the slot of a deadline its tick has taken out and not yet fired


class Deadline:
    """One callback due at `when` (the loop's clock); `cancel()` and `reset()` as a loop's
    TimerHandle would have them."""

    __slots__ = ("_callback", "_slot", "_wheel", "when")

    def __init__(self, wheel: _Wheel, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self._callback = callback
        self._wheel = wheel
        self._slot: int | None = None
        wheel.add(self)

    def cancel(self) -> None:
        if self._slot is not None:
            self._wheel.remove(self)

    def cancelled(self) -> bool:
        return self._slot is None

    def reset(self, when: float) -> None:
        """Due at `when` instead, armed again if it was cancelled. Later is one store."""
        previous = self.when
        self.when = when
        if self._slot is None or when < previous:
            self.cancel()
            self._wheel.add(self)

    def _fire(self) -> None:
        try:
            self._callback()
        except Exception as exc:  # as a loop's own timer would: reported, the rest still fire
            asyncio.get_running_loop().call_exception_handler(
                {"message": "exception in a deadline's callback", "exception": exc}
            )


class _Wheel:
    # No reference to its loop: _wheels maps each loop to its wheel weakly, and a value that
    # held its key would keep every loop (a test's, say) alive for good.
    def __init__(self) -> None:
        self._slots: dict[int, dict[Deadline, None]] = {}  # in filing order
        self._due: list[int] = []  # a heap of the slots in _slots
        self._armed: int | None = None  # the slot the loop timer is set for
        self._ticking = False

    def add(self, deadline: Deadline) -> None:
        slot = math.ceil(deadline.when / TICK_S)
        deadline._slot = slot
        bucket = self._slots.get(slot)
        if bucket is None:
            self._slots[slot] = bucket = {}
            heapq.heappush(self._due, slot)
            if not self._ticking and (self._armed is None or slot < self._armed):
                self._arm(slot)
        bucket[deadline] = None

    def remove(self, deadline: Deadline) -> None:
        if deadline._slot is not None and deadline._slot != _FIRING:
            del self._slots[deadline._slot][deadline]
        deadline._slot = None

    def _arm(self, slot: int) -> None:
        # The timer it replaces is left to fire and find itself superseded: keeping its handle
        # here would keep its loop too (see above).
        self._armed = slot
        asyncio.get_running_loop().call_at(slot * TICK_S, self._tick, slot)

    def _tick(self, slot: int) -> None:
        if slot != self._armed:
            return  # an earlier deadline set the timer for an earlier slot meanwhile
        self._armed = None
        now = asyncio.get_running_loop().time()
        late: list[Deadline] = []
        while self._due and self._due[0] * TICK_S <= now:
            for deadline in self._slots.pop(heapq.heappop(self._due), ()):
                deadline._slot = _FIRING
                late.append(deadline)
        self._ticking = True  # one arm at the end, for whatever is left or filed meanwhile
        try:
            for deadline in late:
                if deadline._slot != _FIRING:  # cancelled or moved by an earlier callback
                    continue
                if deadline.when > now:  # moved later since it was filed
                    self.add(deadline)
                    continue
                deadline._slot = None
                deadline._fire()
        finally:
            self._ticking = False
            if self._due:
                self._arm(self._due[0])


_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Wheel] = weakref.WeakKeyDictionary()


def call_later(delay_s: float, callback: Callable[[], object]) -> Deadline:
    """`loop.call_later` for a callback that is usually cancelled first."""
    loop = asyncio.get_running_loop()
    wheel = _wheels.get(loop)
    if wheel is None:
        _wheels[loop] = wheel = _Wheel()
    return Deadline(wheel, loop.time() + delay_s, callback)


class timeout:  # noqa: N801  # used as asyncio.timeout is, in a plain `with`
    """`asyncio.timeout(delay_s)` for the hot path: raises TimeoutError out of the block when
    the deadline passes while the block runs (the task is cancelled, as asyncio's does)."""

    __slots__ = ("__weakref__", "_cancelling", "_deadline", "_delay_s", "_expired", "_task")

    def __init__(self, delay_s: float) -> None:
        self._delay_s = delay_s
        self._expired = False
        self._deadline: Deadline | None = None

    def __enter__(self) -> timeout:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("timeout() must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._deadline = call_later(self._delay_s, self._expire)
        return self

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._deadline is not None
        self._deadline.cancel()
        self._deadline = None  # it holds our _expire: no cycle left for the collector
        # Only our own cancel becomes a TimeoutError; one from outside goes on as it came.
        if (
            self._expired
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    def expired(self) -> bool:
        return self._expired
