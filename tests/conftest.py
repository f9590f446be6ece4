from __future__ import annotations

import ast
import asyncio
import fcntl
import gc
import os
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import redis

from smtpfleet.testing.redis_server import RedisServer
from smtpfleet.testing.sink import Sink
from smtpfleet.testing.tls import TlsFiles, make_tls_files

TASK_DUMP_LEAD_S = 3.0


def _parse_without_gc(*args: Any, **kwargs: Any) -> Any:
    """ast.parse with the collector held off. CPython before 3.11.8 can fail with "SystemError:
    AST constructor recursion depth mismatch" when a collection runs finalizers mid-parse
    (gh-106905); pytest parses while it rewrites asserts and formats tracebacks, and a session
    full of sockets and transports makes such a collection likely (seen once here)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _ast_parse(*args, **kwargs)
    finally:
        if enabled:
            gc.enable()


if sys.version_info < (3, 11, 8):
    _ast_parse = ast.parse
    ast.parse = _parse_without_gc


def _dump_asyncio_tasks(signum: int, frame: FrameType | None) -> None:
    """Print every task of the loop running in this (the main) thread, with its stack.

    pytest-timeout shows the threads' stacks only, and an async test that hangs is always
    "in select()": this says which await it is.
    """
    loop = asyncio._get_running_loop()
    if loop is None:
        return
    print(f"\n--- asyncio tasks {TASK_DUMP_LEAD_S:.0f} s before the timeout ---", file=sys.stderr)
    for task in asyncio.all_tasks(loop):
        print(f"{task!r}", file=sys.stderr)
        for where in _awaiting(task.get_coro()):
            print(f"    {where}", file=sys.stderr)


def _awaiting(coro: object) -> Iterator[str]:
    """The chain of awaits under a coroutine, outermost first (Task.print_stack shows one)."""
    for _ in range(40):
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            yield f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        nested = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        if nested is None:
            yield repr(coro)
            return
        coro = nested


class _SoloLock:
    """Keeps a `solo` test alone when the suite runs in several processes (pytest-xdist).

    Such a test measures time or rates (a failover's length, a per-second limit) that a test
    in the other process, on the same two cores, would stretch. Every test holds a shared
    lock on one file, a solo test an exclusive one. A turnstile in front lets a waiting solo
    test in before the other process's next test: without it, that process could take the
    shared lock again the moment it let go, test after test, and starve the solo one.
    """

    def __init__(self, run_id: str) -> None:
        base = Path(tempfile.gettempdir()) / f"smtpfleet-tests-{run_id}"
        self._turnstile = open(f"{base}.turnstile", "a+b")  # noqa: SIM115 - held for the run
        self._room = open(f"{base}.room", "a+b")  # noqa: SIM115

    def enter(self, solo: bool) -> None:
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        fcntl.flock(self._room, fcntl.LOCK_EX if solo else fcntl.LOCK_SH)
        if not solo:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)

    def remove(self) -> None:
        for held in (self._turnstile, self._room):
            Path(held.name).unlink(missing_ok=True)
            held.close()

    def leave(self, solo: bool) -> None:
        fcntl.flock(self._room, fcntl.LOCK_UN)
        if solo:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)


_SOLO_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_solo_lock = _SoloLock(_SOLO_RUN) if _SOLO_RUN else None


def pytest_unconfigure(config: pytest.Config) -> None:
    # Every process opened the lock files when it imported this file, before any test ran,
    # so whichever ends first can remove them: the other keeps its open files.
    if _solo_lock is not None:
        _solo_lock.remove()


# tryfirst: outside pytest-timeout's wrapper, so the wait for the lock is not the test's time.
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    if _solo_lock is None:
        yield
        return
    solo = item.get_closest_marker("solo") is not None
    _solo_lock.enter(solo)
    try:
        yield
    finally:
        _solo_lock.leave(solo)


@pytest.fixture(autouse=True)
def _tasks_dumped_before_timeout(request: pytest.FixtureRequest) -> Iterator[None]:
    marker = request.node.get_closest_marker("timeout")
    limit = (
        float(marker.args[0])
        if marker and marker.args
        else float(request.config.getini("timeout") or 0)
    )
    if limit <= TASK_DUMP_LEAD_S or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGUSR1, _dump_asyncio_tasks)
    timer = threading.Timer(limit - TASK_DUMP_LEAD_S, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real Redis for the session; tests keep apart by key prefix."""
    with RedisServer(appendfsync="always") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def certs(tmp_path: Path) -> TlsFiles:
    """A throwaway CA and a loopback certificate (trustme): clients trust that CA only."""
    return make_tls_files(tmp_path / "tls")


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with Sink(name="sink-a") as server:
        yield server


@pytest.fixture
async def sink_b() -> AsyncIterator[Sink]:
    async with Sink(name="sink-b") as server:
        yield server
