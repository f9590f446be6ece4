"""Run one node as a process: uvloop, signals, drain, exit code.

The first SIGTERM or SIGINT drains (421 to new sessions, in-flight work finishes within the
grace period); a second one exits at once, as uvicorn does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

import uvloop

from smtpfleet.config import Config
from smtpfleet.errors import ConfigError, QueueUnavailable, RedisUnsuitable
from smtpfleet.memory import freeze_startup_objects, return_freed_memory, watch_collections
from smtpfleet.node import Node

log = logging.getLogger(__name__)

PARENT_PID_ENV = "SMTPFLEET_PARENT_PID"
EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
FORCED_EXIT = 130


async def _serve(config: Config) -> int:
    node = Node(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting without finishing in-flight work")
            raise SystemExit(FORCED_EXIT)
        log.info("received %s: draining", signal.Signals(signum).name)
        stop.set()

    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        started = await _started_unless_stopped(node, stop)
    except (RedisUnsuitable, QueueUnavailable, ConfigError, OSError) as exc:
        log.error("cannot start: %s", exc)
        await node.close()
        return EXIT_STARTUP_FAILED
    if not started:
        # Told to stop while it waited for Redis (up to node.startup_timeout_s): it took no
        # mail yet, so there is nothing to drain, and a supervisor is not kept waiting.
        log.info("stopped before it was ready")
        await node.close()
        return EXIT_OK
    frozen = freeze_startup_objects()
    log.info(
        "%d start-up objects kept out of garbage collection",
        frozen,
        extra={"event": "gc_frozen", "objects": frozen},
    )
    unwatch = watch_collections(node.metrics.gc_pause())
    watchers = [
        asyncio.create_task(watch_parent(stop.set)),
        asyncio.create_task(_relay_event(node.drain_requested, stop)),
    ]
    await stop.wait()
    for watcher in watchers:
        watcher.cancel()
    await node.drain()
    unwatch()
    log.info("node %s stopped", node.node_id)
    return EXIT_OK


async def _started_unless_stopped(node: Node, stop: asyncio.Event) -> bool:
    """node.start(), cut short by a signal: False when the signal came first."""
    starting = asyncio.ensure_future(node.start())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if starting.done():
        starting.result()  # its error, if it failed
        return True
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    return False


async def _relay_event(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def watch_parent(on_gone: Callable[[], None]) -> None:
    """Drain when the process that started us (`smtpfleet dev`, a test, a supervisor) is gone."""
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected:
        return
    while os.getppid() == int(expected):  # noqa: ASYNC110 - no event tells of a dead parent
        await asyncio.sleep(1.0)
    log.warning("parent process %s is gone: draining", expected)
    on_gone()


def serve(config: Config) -> int:
    return_freed_memory()
    return uvloop.run(_serve(config))
