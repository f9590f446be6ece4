"""Background tasks: kept running through bugs, stopped even when a library swallowed the
cancellation."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

log = logging.getLogger(__name__)

RECANCEL_S = 1.0


async def cancel_all(tasks: Iterable[asyncio.Task[object]], recancel_s: float = RECANCEL_S) -> None:
    """Cancel the tasks and wait until every one has ended.

    A cancellation that lands inside a client library can come back as an ordinary error
    (seen with redis-py's Sentinel connections while a node closed): the loop catches that as
    "Redis away" and goes on, and a plain gather waits for it forever. Whatever still runs
    after `recancel_s` is cancelled again, now most likely in its own sleep.
    """
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=recancel_s)
        for task in pending:
            log.warning("task %s ignored its cancellation; cancelling it again", task.get_name())
            task.cancel()


def reraise_lost_cancellation(cause: BaseException | None = None) -> None:
    """Raise CancelledError if this task was cancelled while a client library had it.

    redis-py 8.1 (on Python 3.11) can lose a cancel that lands while it reconnects a pooled
    connection: the call returns, or fails with an ordinary error, as if nothing happened, and
    a loop that treats the error as "Redis away" goes on after its cancel. Nobody uncancelled
    the task, so `cancelling()` still says so.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from cause


RESTART_PAUSES_S = (0.5, 1.0, 2.0, 5.0, 10.0)
STEADY_S = 60.0  # a loop that ran this long before failing starts its pauses over


def background(
    name: str, loop: Callable[[], Awaitable[None]], on_restart: Callable[[str], None]
) -> asyncio.Task[None]:
    """A task running `loop` under `supervised`, named for logs and task dumps."""
    return asyncio.create_task(supervised(name, loop, on_restart), name=name)


async def supervised(
    name: str,
    loop: Callable[[], Awaitable[None]],
    on_restart: Callable[[str], None],
    pauses_s: Sequence[float] = RESTART_PAUSES_S,
) -> None:
    """Run a background loop for the node's life; a bug that escapes it restarts it.

    A loop that dies on an unexpected exception stops its work without a word: a dead reader
    delivers nothing while the node still takes mail, a dead heartbeat gets a working node
    declared dead. So the error is logged with its traceback, counted (`on_restart`), and the
    loop starts again after a pause that grows while it keeps failing. A loop that returns
    (the node is stopping) ends this too.
    """
    failures = 0
    while True:
        started = time.monotonic()
        try:
            await loop()
            return
        except Exception:
            if time.monotonic() - started >= STEADY_S:
                failures = 0
            pause = pauses_s[min(failures, len(pauses_s) - 1)]
            failures += 1
            log.exception("background task %s failed; restarting it in %.1fs", name, pause)
            on_restart(name)
            await asyncio.sleep(pause)
