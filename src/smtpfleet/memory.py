"""The process's memory: give it back after a burst of large messages; keep the garbage
collector's stalls short.

glibc serves large allocations from mmap and returns them on free, but it raises that
threshold each time such a block is freed (up to 32 MB on 64-bit), after which message
bodies come from the heap, where freed space is kept: a node that took four 20 MB messages
at once stayed 220 MB larger ten minutes later. Fixing the threshold stops the raise, so a
large body's buffer goes back to the system as soon as the message is queued or delivered;
and `trim_forever` hands back free heap pages that smaller allocations left between live ones.

Python's cyclic garbage collector stops the whole process while it runs, every SMTP session
included. `freeze_startup_objects` takes what start-up made out of its sight, and
`watch_collections` measures every collection it still makes (`smtpfleet_gc_pause_seconds`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import logging
import time
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD: Final = -1  # glibc malloc.h
M_MMAP_THRESHOLD: Final = -3
# Bodies and batches above this get their own mapping. It must stay above 256 KiB: every
# read of a TLS session asks OpenSSL for up to 256 KiB (uvloop's SSL_READ_MAX_SIZE) in a
# bytes object that is then cut to the record's size, and a mapping per read cost each TLS
# connection about 16 page faults and an mmap, mremap and munmap per record.
MMAP_THRESHOLD_BYTES: Final = 1024 * 1024
TRIM_THRESHOLD_BYTES: Final = 4 * 1024 * 1024  # free heap kept before giving the top back
TRIM_INTERVAL_S: Final = 5.0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def return_freed_memory() -> bool:
    """Tune glibc's allocator as above; False where it is not glibc (nothing to do there)."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)  # musl and others have none
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)
    done = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1) and done
    if not done:
        log.warning("could not tune the allocator; memory may stay high after large messages")
    return done


def trim() -> bool:
    """Give free heap pages back to the system now (glibc's malloc_trim); False elsewhere."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))


async def trim_forever(interval_s: float = TRIM_INTERVAL_S) -> None:
    """Trim now and then: a few milliseconds of work, only when there is something to free."""
    while True:
        await asyncio.sleep(interval_s)
        trim()


def freeze_startup_objects() -> int:
    """Keep what start-up made (modules, config, the node's own structures) out of every later
    collection of the cyclic garbage collector (`gc.freeze`); how many objects that is.

    A full collection walks every tracked object, and a node's start-up leaves about 60,000
    that will live as long as the process: each full collection stalled the event loop for
    20-50 ms, so every accept in flight waited that long (docs/performance.md). Objects freed
    by reference counting are freed as before; only cycles among these would now stay.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def watch_collections(observe: Callable[[int, float], None]) -> Callable[[], None]:
    """Tell `observe` (generation, seconds) of every collection the cyclic garbage collector
    makes: each one stalls the event loop, every session included. Returns the undo."""
    started = 0.0

    def callback(phase: str, info: dict[str, Any]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        else:
            observe(info["generation"], time.perf_counter() - started)

    gc.callbacks.append(callback)
    return lambda: gc.callbacks.remove(callback)
