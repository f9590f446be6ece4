"""Stopping background tasks when a library may have swallowed the cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

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
