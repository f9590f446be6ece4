"""Concurrent callers' Redis commands go out together: one pipeline per batch (group commit).

Under load a node has dozens of SMTP sessions and deliveries that each want one or two
commands. redis-py spends more CPU on each pipeline or call (pool checkout, retry wrapper,
connection health check) than on each command, so a batch of N commands costs far less than
N calls. With a confirmation command (WAITAOF or WAIT), one closes each batch that asked for
it: it covers every write before it on the connection, so N accepts wait for one fsync.

Batches go out one at a time, in the order their commands arrived: a tombstone sent after an
enqueue never overtakes it. Replies come back per caller, error replies as exception values;
a connection failure fails every caller of the batch with the same exception.

An optional observer hears of each batch sent (its size in commands, whether it carried a
confirmation): the node feeds its metrics from it, so this module needs no metrics import.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

Command = tuple[Any, ...]
# The command that closes a confirmed batch, made when the batch goes out: WAIT's replica count
# follows the replicas a failover could promote (queue/replica_watch.py).
Confirmation = Callable[[], Command]


@dataclass(frozen=True)
class Confirmed:
    """A confirmation's reply with the command that got it: what a WAIT's reply is measured
    against is the replica count it asked for, not whatever is needed by the time it answers
    (a WAIT blocks up to its timeout, while the replicas that count may change)."""

    command: Command
    reply: Any


MAX_BATCH_COMMANDS = 512
# Hears of each batch sent: its commands (the confirmation not counted), and whether it
# carried a confirmation (one fsync or replica wait for the whole batch).
BatchObserver = Callable[[int, bool], None]


@dataclass
class _Call:
    commands: Sequence[Command]
    confirm: bool
    future: asyncio.Future[list[Any]] | None  # None: nobody waits for the replies


class Batcher:
    """Group commit: concurrent callers' commands share one pipeline per batch, batches in order."""

    def __init__(
        self,
        client: aioredis.Redis,
        confirmation: Confirmation | None = None,
        *,
        observe: BatchObserver | None = None,
    ) -> None:
        self._redis = client
        self._confirmation = confirmation
        self._observe = observe
        self._pending: list[_Call] = []
        self._flusher: asyncio.Task[None] | None = None

    async def call(self, *commands: Command, confirm: bool = False) -> list[Any]:
        """The replies to `commands`, and the confirmation's last (`Confirmed`) when `confirm`."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._add(_Call(commands, confirm and self._confirmation is not None, future))
        return await future

    def send(self, *commands: Command) -> None:
        """Queue commands whose replies nobody needs; they go out with the next batch."""
        self._add(_Call(commands, False, None))

    async def close(self) -> None:
        """Send what is queued, then stop."""
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher

    def _add(self, call: _Call) -> None:
        self._pending.append(call)
        if self._flusher is None:
            # Started, not run: every caller of this event-loop turn joins the first batch.
            self._flusher = asyncio.create_task(self._flush(), name="redis-batcher")

    async def _flush(self) -> None:
        batch: list[_Call] = []
        try:
            while self._pending:
                batch = self._take()
                try:
                    replies = await self._execute(batch)
                except Exception as exc:
                    _fail(batch, exc)
                else:
                    _deliver(batch, replies)
        except asyncio.CancelledError:
            _fail([*batch, *self._pending], ConnectionError("the Redis batcher was stopped"))
            self._pending = []
            raise
        finally:
            self._flusher = None

    def _take(self) -> list[_Call]:
        size = 0
        for taken, call in enumerate(self._pending):
            size += len(call.commands)
            if size > MAX_BATCH_COMMANDS and taken:
                batch, self._pending = self._pending[:taken], self._pending[taken:]
                return batch
        batch, self._pending = self._pending, []
        return batch

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        commands = 0
        confirmation = None
        if self._confirmation is not None and any(call.confirm for call in batch):
            confirmation = self._confirmation()
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in batch:
                commands += len(call.commands)
                for command in call.commands:
                    pipe.execute_command(*command)
            if confirmation is not None:
                pipe.execute_command(*confirmation)
            replies = await pipe.execute(raise_on_error=False)
        if self._observe is not None:
            self._observe(commands, confirmation is not None)
        if confirmation is not None:
            replies[-1] = Confirmed(confirmation, replies[-1])
        return replies


def _deliver(batch: list[_Call], replies: list[Any]) -> None:
    confirmation = replies[-1]
    at = 0
    for call in batch:
        mine = replies[at : at + len(call.commands)]
        at += len(call.commands)
        if call.confirm:
            mine.append(confirmation)
        if call.future is not None and not call.future.done():
            call.future.set_result(mine)


def _fail(batch: list[_Call], exc: Exception) -> None:
    for call in batch:
        if call.future is not None and not call.future.done():
            call.future.set_exception(exc)
